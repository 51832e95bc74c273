"""Long-tail runs aggregated into one Markdown table (mean ± sample std over seeds; METHODS.md B.5).

The library behind ``experiments.longtail_table``. Each workdir is a ``train_longtail`` run (``results.json``: clean and PGD-20 blocks,
method, imbalance ratio, seed, class counts) optionally followed by ``eval_robust``
(``eval_results.json``: cw / autoattack_apgd / autoattack / pgd20 blocks). Runs are
grouped by (imbalance ratio, method); every accuracy is averaged over the group's runs
(seeds) as ``mean ± std`` (sample std, ddof 1, i.e. |a − b| / √2 for two seeds). An
evaluation present in only some runs of a group is averaged over those runs and the
``seeds`` column says how many. PGD-20 comes from eval_results.json when eval_robust
ran it, else from results.json (the trainer's PGD-20: same ε 8/255, step 2/255, random
start, 20 steps).

``markdown`` renders
  1. a compact table: rows (IR, method), columns clean / PGD-20 / CW / AA x overall /
     balanced / tail;
  2. the long table: rows (IR, method, evaluation), columns overall / balanced / many /
     medium / few / tail;
and ``per_class_plot`` draws per-class accuracy under the strongest evaluation present (per
IR), classes sorted by training frequency (head left, tail right), one panel per IR,
one line per method (mean over seeds). A run that overrode a method weight is its own
row, e.g. ``mcat (manifold_weight=0)`` (MCAT without the manifold term); the long table's
``test images`` column gives each evaluation's test-set size (eval_robust's
``--autoattack_per_class`` runs AutoAttack on fewer images).

Runs that wrote ``diagnostics.json`` (``longtail.diagnostics``) add a third table, what
the MCAT terms did in the last epoch (mean ± std over the seeds that have the number;
"n/a" where the method has no such term): the median per-example ratio
‖∇_δ λ_man·d_My‖ / ‖∇_δ CE‖ in MS-PGD, the share of sign flips it causes, the mean L2
distance between MS-PGD's and PGD's x' (the L∞ distance of sign-PGD iterates is nearly
always 2ε) and the share of differing predictions on the monitor batch,
‖∇_W λ_geom·L_ETF‖ / ‖∇_W CE‖, the ETF distance of W and NC1.
"""
from __future__ import annotations

import glob
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from uatmc_jax.core import reporting
from uatmc_jax.core.errors import ConfigError


EVALS = ("clean", "pgd20", "cw", "autoattack_apgd", "autoattack")
EVAL_LABELS = {"clean": "clean", "pgd20": "PGD-20", "cw": "CW", "autoattack_apgd": "AA-apgd",
               "autoattack": "AA"}
METRICS = ("overall", "balanced", "many", "medium", "few", "tail")
COMPACT_METRICS = ("overall", "balanced", "tail")
# Row order within an IR: baselines first, then the long-tail methods (others after).
METHOD_ORDER = ("pgd_at", "trades", "mart", "at_bsl", "robal", "mcat")


def expand_workdirs(patterns: Sequence[str]) -> List[str]:
  """Glob patterns -> sorted unique directories holding a results.json."""
  dirs = []
  for p in patterns:
    matches = sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
    dirs += [d for d in matches if os.path.isdir(d)]
  dirs = sorted(set(dirs))
  if not dirs:
    raise ConfigError(f"--workdirs: no directory matches {list(patterns)}")
  return dirs


_OVERRIDABLE = ("etf_weight", "manifold_weight", "beta")
DIAGNOSTICS_FILE = "diagnostics.json"
# (group, key, column label) of a diagnostics entry shown in the third table.
DIAGNOSTIC_COLUMNS = (
    ("inner", "grad_ratio_median", "∇man/∇CE (median)"),
    ("inner", "sign_flip_share", "sign flips"),
    ("ms_pgd_vs_pgd", "l2", "L2(x'_MS − x'_PGD)"),
    ("ms_pgd_vs_pgd", "pred_differs", "pred. differs"),
    ("outer", "grad_ratio_w", "∇_W ETF/∇_W CE"),
    ("geometry", "etf_distance", "ETF dist. of W"),
    ("geometry", "nc1", "NC1 (monitor)"),
)


def method_label(run: dict) -> str:
  """The run's method name, plus the weights it overrode (ablations get their own rows).

  ``method=mcat,manifold_weight=0`` -> ``"mcat (manifold_weight=0)"``; a run whose
  ``method_spec`` matches its name's defaults (or that has none) keeps the bare name."""
  from uatmc_jax.longtail import methods as longtail_methods
  name, spec = run["method"], run.get("method_spec")
  if not isinstance(spec, dict):
    return name
  default = longtail_methods.resolve_method(name)
  diffs = [f"{k}={float(spec[k]):g}" for k in _OVERRIDABLE
           if k in spec and float(spec[k]) != float(getattr(default, k))]
  return f"{name} ({', '.join(diffs)})" if diffs else name


def _base_method(label: str) -> str:
  return label.split(" (", 1)[0].split("+", 1)[0]


def load_run(workdir: str) -> dict:
  """{ir, method, seed, class_counts, class_names, blocks: {eval: block}, settings}."""
  path = os.path.join(workdir, "results.json")
  if not os.path.exists(path):
    raise ConfigError(f"{path}: not found; each --workdirs entry must be a finished "
                      f"train_longtail run")
  run = reporting.read_json(path)
  def sized(block, n_test):  # older files have no per-block n_test
    return block if "n_test" in block or n_test is None else {**block, "n_test": n_test}

  blocks = {k: sized(run[k], run.get("n_test")) for k in ("clean", "pgd20")
            if isinstance(run.get(k), dict)}
  settings = None
  eval_path = os.path.join(workdir, "eval_results.json")
  if os.path.exists(eval_path):
    ev = reporting.read_json(eval_path)
    settings = ev.get("settings")
    n_eval = settings.get("n_test") if isinstance(settings, dict) else None
    blocks.update({k: sized(ev[k], n_eval) for k in EVALS if isinstance(ev.get(k), dict)})
  diagnostics = None
  diag_path = os.path.join(workdir, DIAGNOSTICS_FILE)
  if os.path.exists(diag_path):
    history = reporting.read_json(diag_path)
    diagnostics = history[-1] if history else None
  return {"workdir": workdir, "ir": float(run["imbalance_ratio"]), "method": method_label(run),
          "seed": int(run["seed"]), "class_counts": list(run["class_counts"]),
          "class_names": run.get("class_names"), "blocks": blocks, "settings": settings,
          "diagnostics": diagnostics}


def _mean_std_or_none(values: Sequence[Optional[float]]) -> Optional[dict]:
  vals = [v for v in values if v is not None]
  return {**reporting.mean_std(vals), "n": len(vals)} if vals else None


def aggregate(runs: Sequence[dict]) -> Dict[tuple, dict]:
  """{(ir, method): {"seeds": [...], "counts": [...], eval: {"n": k, metric: mean_std,
  "per_class": (C,) mean}}} in order IR descending, then METHOD_ORDER (other names
  after it, alphabetically)."""
  def order(r):
    m, b = r["method"], _base_method(r["method"])
    return (-r["ir"], METHOD_ORDER.index(b) if b in METHOD_ORDER else len(METHOD_ORDER),
            m != b, m)

  groups: Dict[tuple, List[dict]] = {}
  for r in sorted(runs, key=order):
    groups.setdefault((r["ir"], r["method"]), []).append(r)
  out = {}
  for key, rs in groups.items():
    counts = rs[0]["class_counts"]
    for r in rs[1:]:
      if r["class_counts"] != counts:
        raise ConfigError(f"runs {rs[0]['workdir']} and {r['workdir']} share IR and method "
                          f"but not the training class counts; they cannot be averaged")
    seeds = [r["seed"] for r in rs]
    if len(set(seeds)) != len(seeds):
      raise ConfigError(f"IR {key[0]:g} {key[1]}: seed listed twice ({seeds}) in "
                        f"{[r['workdir'] for r in rs]}")
    agg = {"seeds": sorted(seeds), "counts": counts}
    for e in EVALS:
      have = [r["blocks"][e] for r in rs if e in r["blocks"]]
      if not have:
        continue
      entry = {"n": len(have),
               "n_test": sorted({int(b["n_test"]) for b in have if "n_test" in b})}
      for m in METRICS:
        entry[m] = _mean_std_or_none([b.get(m) for b in have])
      pc = np.array([[np.nan if v is None else v for v in b["per_class"]] for b in have])
      entry["per_class"] = np.nanmean(pc, axis=0) if pc.size else None
      agg[e] = entry
    diags = [r["diagnostics"] for r in rs if r.get("diagnostics")]
    if diags:
      agg["diagnostics"] = {
          "n": len(diags),
          **{f"{g}/{k}": _mean_std_or_none([(d.get(g) or {}).get(k) for d in diags])
             for g, k, _ in DIAGNOSTIC_COLUMNS}}
    out[key] = agg
  return out


def _pct(v: Optional[dict]):
  """mean ± std in percent, one decimal ("—" for an empty group; the mean alone when
  one seed has the number: a spread of one value is not 0)."""
  if v is None:
    return "—"
  if v.get("n", 2) < 2:
    return f"{100 * v['mean']:.1f}"
  return f"{100 * v['mean']:.1f} ± {100 * v['std']:.1f}"


def markdown(agg: Dict[tuple, dict]) -> str:
  present = [e for e in EVALS if any(e in a for a in agg.values())]
  header = ["IR", "method", "seeds"] + [f"{EVAL_LABELS[e]} {m}" for e in present
                                         for m in COMPACT_METRICS]
  rows = []
  for (ir, method), a in agg.items():
    rows.append([f"{ir:g}", method, len(a["seeds"])] +
                [_pct(a[e][m]) if e in a else "n/a" for e in present for m in COMPACT_METRICS])
  compact = reporting.markdown_table(header, rows)
  rows = []
  for (ir, method), a in agg.items():
    for e in present:
      if e in a:
        n_test = "/".join(str(n) for n in a[e]["n_test"]) or "?"
        rows.append([f"{ir:g}", method, EVAL_LABELS[e], a[e]["n"], n_test] +
                    [_pct(a[e][m]) for m in METRICS])
  long = reporting.markdown_table(["IR", "method", "eval", "seeds", "test images"]
                                  + list(METRICS), rows)
  n_seeds = sorted({len(a["seeds"]) for a in agg.values()})
  seeds = str(n_seeds[0]) if len(n_seeds) == 1 else f"{n_seeds[0]}–{n_seeds[-1]}"
  note = (f"Accuracy in %, {reporting.std_header(seeds)} (column seeds). Groups from "
          "the training counts: Many > 100, Medium 20–100, Few < 20 images, Tail = rarest "
          "30% of classes; — = empty group; a number without ± comes from one seed.")
  parts = [note, compact, long]
  if any("diagnostics" in a for a in agg.values()):
    rows = []
    for (ir, method), a in agg.items():
      d = a.get("diagnostics")
      if d is None:
        continue
      rows.append([f"{ir:g}", method, d["n"]] +
                  [_num(d[f"{g}/{k}"]) for g, k, _ in DIAGNOSTIC_COLUMNS])
    parts.append(f"What the MCAT terms did in the last epoch "
                 f"({reporting.std_header(seeds)}; longtail.diagnostics):")
    parts.append(reporting.markdown_table(
        ["IR", "method", "seeds"] + [label for _, _, label in DIAGNOSTIC_COLUMNS], rows))
  return "\n\n".join(parts)


def _num(v: Optional[dict]) -> str:
  """mean ± std with 3 significant digits ("n/a": the method has no such term; the mean
  alone from one seed)."""
  if v is None:
    return "n/a"
  if v.get("n", 2) < 2:
    return f"{v['mean']:.3g}"
  return f"{v['mean']:.3g} ± {v['std']:.2g}"


def per_class_plot(path: str, agg: Dict[tuple, dict]) -> Dict[float, str]:
  """One panel per IR: per-class accuracy under the strongest evaluation present for
  that IR, one line per method (mean over its runs). Returns {ir: evaluation}."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  irs = sorted({ir for ir, _ in agg}, reverse=True)
  fig, axes = plt.subplots(1, len(irs), figsize=(5.5 * len(irs), 4.), squeeze=False)
  used = {}
  for ax, ir in zip(axes[0], irs):
    groups = {m: a for (ir2, m), a in agg.items() if ir2 == ir}
    strongest = next(e for e in reversed(EVALS) if any(e in a for a in groups.values()))
    used[ir] = strongest
    for method, a in groups.items():
      if strongest not in a:
        continue
      counts = np.asarray(a["counts"])
      order = np.argsort(-counts, kind="stable")
      ax.plot(np.arange(len(order)), a[strongest]["per_class"][order], marker="o", ms=3,
              label=f"{method} (n={a[strongest]['n']})")
      ax.set_xticks(np.arange(len(order)), [str(c) for c in counts[order]], fontsize=7)
    ax.set_title(f"IR {ir:g}: {EVAL_LABELS[strongest]} accuracy per class")
    reporting.finish_accuracy_axes(ax, "class training count (head → tail)")
  reporting.save_figure(fig, path)
  return used
