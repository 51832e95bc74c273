"""Aggregation and outputs of the UAT-MC experiment (METHODS.md A.5, A.8).

``aggregate`` turns the per-seed stage results into results.json's blocks (mean and
sample std over seeds, ddof 1), ``mismatch_summary`` pools the A.5 per-target
diagnostics, ``markdown`` renders the paper's table layout, and the two plots show the
defence-accuracy trade-off and the cross-modal gradient cosines. Every defence block
lists the seeds whose model ended at or below the most-popular baseline
(``below_popularity``), and ``markdown`` puts a warning above the table when any did.
Plots are written through ``etils.epath`` (local or ``gs://`` paths).
"""
from __future__ import annotations

import io

import numpy as np
from etils import epath

from uatmc_jax.core.reporting import markdown_table, mean_std
from uatmc_jax.recsys.attacks.protocol import ATTACKER_LABELS, ATTACKERS, SWEEP_ATTACKERS

ROW_NAMES = {"vanilla": "Vanilla", "apr": "APR", "amr": "AMR",
             "uat_mc_no_align": "UAT-MC w/o align", "uat_mc": "UAT-MC"}


def _ms(values) -> dict:
  return mean_std([float(v) for v in values])


def aggregate(cfg, per_seed: dict, sweep_runs: dict, attackers=ATTACKERS,
              sweep_attackers=SWEEP_ATTACKERS) -> dict:
  seeds = list(per_seed)
  k = int(cfg.attack["k"])
  defences = {}
  for name in [d for d in per_seed[seeds[0]]]:
    runs = [per_seed[s][name] for s in seeds]
    block = {m: _ms([r["train"]["test"][m] for r in runs])
             for m in ("recall@20", "ndcg@10", "ndcg@20")}
    block["attacks"] = {
        a: {key: _ms([r["attacks"][a][key] for r in runs])
            for key in (f"hit@{k}_before", f"hit@{k}_after", "avg_rank_change")}
        for a in attackers}
    block["train_seconds"] = _ms([r["train"]["train_seconds"] for r in runs])
    # Seeds whose model ended at or below the most-popular baseline (valid Recall@20).
    block["below_popularity"] = [s for s in seeds
                                 if per_seed[s][name]["train"].get("below_popularity")]
    block["per_seed"] = {str(s): {"ndcg@10": per_seed[s][name]["train"]["test"]["ndcg@10"],
                                  **{f"{a}_hit@{k}_after":
                                     per_seed[s][name]["attacks"][a][f"hit@{k}_after"]
                                     for a in attackers}} for s in seeds}
    defences[name] = block
  out = {"defences": defences, "attackers": list(attackers), "hit_k": k,
         "epsilon": float(cfg.attack["epsilon"])}
  # Every budget (the first is the main one above): {ε: {defence: {attacker: stats}}}.
  budgets = [float(e) for e in cfg.attack.get("epsilons", [cfg.attack["epsilon"]])]
  if all("attacks_by_epsilon" in per_seed[s][n] for s in seeds for n in per_seed[s]):
    out["by_epsilon"] = {
        f"{eps:g}": {name: {a: {key: _ms([per_seed[s][name]["attacks_by_epsilon"][eps][a][key]
                                          for s in seeds])
                                for key in (f"hit@{k}_before", f"hit@{k}_after",
                                            "avg_rank_change")}
                            for a in attackers}
                     for name in defences}
        for eps in budgets}
  out["mismatch"] = mismatch_summary(per_seed, attackers)
  if "vanilla" in defences:
    base = defences["vanilla"]["ndcg@10"]["mean"]
    out["relative_ndcg@10_drop"] = {n: (base - b["ndcg@10"]["mean"]) / base if base else None
                                    for n, b in defences.items()}
  if sweep_runs:
    values = sorted({v for runs in sweep_runs.values() for v in runs})
    out["sweep"] = {"parameter": cfg.sweep, "seeds": list(sweep_runs),
                    "below_popularity": [
                        {"seed": s, "value": v} for s in sweep_runs for v in sorted(sweep_runs[s])
                        if sweep_runs[s][v]["train"].get("below_popularity")],
                    "points": [
        {"value": v,
         "ndcg@10": _ms([sweep_runs[s][v]["train"]["test"]["ndcg@10"] for s in sweep_runs]),
         **{f"{a}_hit@{k}_after":
            _ms([sweep_runs[s][v]["attacks"][a][f"hit@{k}_after"] for s in sweep_runs])
            for a in sweep_attackers}}
        for v in values]}
  return out


def _finite(values) -> np.ndarray:
  v = np.asarray([np.nan if x is None else x for x in values], np.float64)
  return v[np.isfinite(v)]


def mismatch_summary(per_seed: dict, attackers) -> dict:
  """The A.5 diagnostics at the main budget, per defence and attacker.

  Per-target values are pooled over seeds and targets: how many targets have a
  gradient at δ = 0 (the hinge is inactive for the rest: no cosine), the 10/50/90 %
  quantiles of the clean cross-modal cosine, the median cosine and median gain
  correlation at the attacker's final δ; the dominant-group-differs shares are means
  over targets, then mean ± sample std over seeds. Stages without the per-target
  values (older files) are left out.
  """
  seeds = list(per_seed)
  out = {}
  for name in per_seed[seeds[0]]:
    for a in attackers:
      runs = [per_seed[s][name]["attacks"][a] for s in seeds]
      if not all("per_target_cosine_clean" in r for r in runs):
        continue
      clean = _finite([x for r in runs for x in r["per_target_cosine_clean"]])
      after = _finite([x for r in runs for x in r["per_target_cosine_after"]])
      corr = _finite([x for r in runs for x in r["per_target_gain_correlation_after"]])
      q = np.quantile(clean, [0.1, 0.5, 0.9]).tolist() if clean.size else [None] * 3
      out.setdefault(name, {})[a] = {
          "targets": int(sum(len(r["per_target_cosine_clean"]) for r in runs)),
          "targets_with_gradient": int(clean.size),
          "cosine_clean_quantiles_10_50_90": q,
          "cosine_after_median": float(np.median(after)) if after.size else None,
          "gain_correlation_after_median": float(np.median(corr)) if corr.size else None,
          "dominant_group_differs_share": _ms([r["dominant_group_differs_share"]
                                               for r in runs]),
          "dominant_group_differs_share_after": _ms(
              [r["dominant_group_differs_share_after"] for r in runs]),
      }
  return out


def mismatch_markdown(summary: dict) -> str:
  def f(x):
    return "–" if x is None else f"{x:+.2f}"

  header = ["Defence", "Attacker", "targets with a cosine", "clean cosine 10/50/90 %",
            "cosine at δ (median)", "dominant group differs (clean)",
            "dominant group differs (at δ)", "gain correlation at δ (median)"]
  rows = [[ROW_NAMES.get(name, name), ATTACKER_LABELS.get(a, a),
           f"{m['targets_with_gradient']} / {m['targets']}",
           " / ".join(f(x) for x in m["cosine_clean_quantiles_10_50_90"]),
           f(m["cosine_after_median"]), m["dominant_group_differs_share"],
           m["dominant_group_differs_share_after"], f(m["gain_correlation_after_median"])]
          for name, by_attacker in summary.items() for a, m in by_attacker.items()]
  return markdown_table(header, rows)


def popularity_warning(results: dict) -> str:
  """A warning line naming every defence (and sweep point) at or below most-popular."""
  def seeds(s):
    return f"seed{'s' if len(s) > 1 else ''} {', '.join(map(str, s))}"

  flagged = [f"{ROW_NAMES.get(n, n)} ({seeds(b['below_popularity'])})"
             for n, b in results["defences"].items() if b.get("below_popularity")]
  flagged += [f"UAT-MC {results['sweep']['parameter']}={p['value']:g} (seed {p['seed']})"
              for p in (results.get("sweep") or {}).get("below_popularity", [])]
  if not flagged:
    return ""
  return ("**Warning: below the most-popular baseline.** These models ended at or below "
          "the most-popular ranking on valid Recall@20, so their rows (and any robustness "
          "read from them) say little: " + "; ".join(flagged) + ". Try the learning rate "
          "(larger if the loss stays near log 2, smaller if it diverges), a smaller "
          "reg_weight, more epochs / patience, or check the data split; each stage's "
          "train_results.json has the numbers and advice (below_popularity).")


def markdown(results: dict) -> str:
  attackers = results.get("attackers", ATTACKERS)
  k = results["hit_k"]
  header = (["Defence", "Recall@20", "NDCG@10", "NDCG@20", f"Hit@{k} clean"]
            + [f"Hit@{k} {ATTACKER_LABELS[a]}" for a in attackers]
            + [f"Δrank {ATTACKER_LABELS[a]}" for a in attackers])
  rows = []
  for name, b in results["defences"].items():
    at = b["attacks"]
    rows.append([ROW_NAMES.get(name, name), b["recall@20"], b["ndcg@10"], b["ndcg@20"],
                 at["pgd"][f"hit@{k}_before"],
                 *[at[a][f"hit@{k}_after"] for a in attackers],
                 *[at[a]["avg_rank_change"] for a in attackers]])
  table = markdown_table(header, rows)
  warning = popularity_warning(results)
  if warning:
    table = f"{warning}\n\n{table}"
  drops = results.get("relative_ndcg@10_drop")
  if drops:
    table += "\n\nRelative clean NDCG@10 drop vs Vanilla (negative = gain): " + ", ".join(
        f"{ROW_NAMES.get(n, n)} {100 * d:.1f}%" for n, d in drops.items()
        if d is not None and n != "vanilla")
  main = f"{results.get('epsilon', 0.0):g}"
  for eps, block in (results.get("by_epsilon") or {}).items():
    if eps == main:
      continue
    header = ([f"ε = {eps}", f"Hit@{k} clean"]
              + [f"Hit@{k} {ATTACKER_LABELS[a]}" for a in attackers]
              + [f"Δrank {ATTACKER_LABELS[a]}" for a in attackers])
    rows = [[ROW_NAMES.get(name, name), at["pgd"][f"hit@{k}_before"],
             *[at[a][f"hit@{k}_after"] for a in attackers],
             *[at[a]["avg_rank_change"] for a in attackers]] for name, at in block.items()]
    table += f"\n\nAttack budget ε = {eps}:\n\n" + markdown_table(header, rows)
  if results.get("mismatch"):
    table += (f"\n\nCross-modal gradient mismatch (A.5) at ε = {main}, per-target values "
              "pooled over seeds and targets (shares: mean ± std over seeds):\n\n"
              + mismatch_markdown(results["mismatch"]))
  return table


def tradeoff_plot(path: str, results: dict) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  k = results["hit_k"]
  fig, ax = plt.subplots(figsize=(6, 4.2))
  for name, b in results["defences"].items():
    x = b["attacks"]["pgd"][f"hit@{k}_after"]
    y = b["ndcg@10"]
    ax.errorbar(x["mean"], y["mean"], xerr=x["std"], yerr=y["std"], fmt="o", capsize=3,
                label=ROW_NAMES.get(name, name))
  sweep = results.get("sweep")
  if sweep:
    pts = sweep["points"]
    xs = [p[f"pgd_hit@{k}_after"]["mean"] for p in pts]
    ys = [p["ndcg@10"]["mean"] for p in pts]
    ax.plot(xs, ys, "k--", marker="s", ms=4, lw=1,
            label=f"UAT-MC sweep over {sweep['parameter']}")
    for p, x, y in zip(pts, xs, ys):
      ax.annotate(f"{p['value']:g}", (x, y), textcoords="offset points", xytext=(4, 4),
                  fontsize=7)
  ax.set_xlabel(f"Hit@{k} after PGD (lower = more robust)")
  ax.set_ylabel("clean NDCG@10")
  ax.set_title("Defence–accuracy trade-off")
  ax.legend(fontsize=7)
  fig.tight_layout()
  _save(fig, path)
  plt.close(fig)


def _save(fig, path: str) -> None:
  """Saves a figure as PNG to a local or remote (``gs://...``) path."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=120)
  p = epath.Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  p.write_bytes(buf.getvalue())


def mismatch_plot(path: str, per_seed: dict) -> None:
  """Per-target cross-modal gradient cosine histograms (A.5), before/after alignment."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  def collect(name, attacker, key):
    vals = [per_seed[s][name]["attacks"][attacker][key] for s in per_seed
            if name in per_seed[s] and attacker in per_seed[s][name]["attacks"]]
    v = np.asarray([x for run in vals for x in run], np.float64)
    return v[np.isfinite(v)]

  bins = np.linspace(-1, 1, 41)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for name in ("vanilla", "uat_mc_no_align", "uat_mc"):
    c = collect(name, "pgd", "per_target_cosine_clean")
    if c.size:
      axes[0].hist(c, bins=bins, histtype="step", lw=1.5,
                   label=f"{ROW_NAMES[name]} (mean {c.mean():+.2f})")
  axes[0].set_title("Model trained without / with aligned UAT-MC (δ = 0)")
  for attacker, label in (("pgd", "naive PGD"), ("pgd_aligned", "aligned PGD")):
    c = collect("vanilla", attacker, "per_target_cosine_after")
    if c.size:
      axes[1].hist(c, bins=bins, histtype="step", lw=1.5,
                   label=f"{label} final δ (mean {c.mean():+.2f})")
  axes[1].set_title("Vanilla model, attacker without / with alignment")
  for ax in axes:
    ax.set_xlabel("per-target cos(∇_{δ^m} L, ∇_{δ^m'} L)")
    ax.set_ylabel("targets")
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
    else:  # e.g. a backbone without a shared projected space has no cosines
      ax.text(0.5, 0.5, "no per-target cosines recorded", ha="center", va="center",
              transform=ax.transAxes)
  fig.suptitle("Cross-modal gradient mismatch of the promotion objective (A.5)")
  fig.tight_layout()
  _save(fig, path)
  plt.close(fig)
