"""Promotion attacks on one trained recommender: run, aggregate, report (METHODS.md A.4-A.6).

The pipeline behind ``experiments.attack_recsys``: every configured attacker x budget x
seed through the one A.4 protocol (``attacks.protocol``), aggregated over all targets of
all seeds, written as ``attack_results.json`` / ``.md`` / ``attack_cosines.png``.

``attack_results.json``: ``protocol`` (what was measured and how) and, per attacker
(``fgsm``, ``pgd``, ``pgd_aligned``, ``pgd_pcgrad_groups``, ``pgd_shared_groups``,
``fgsm_<m>``, ``pgd_<m>``), a block with ``hit@K_before`` / ``hit@K_after`` and
``avg_rank_before`` / ``avg_rank_after`` (``{"mean", "std"}`` over all targets of all
seeds, sample std with ddof 1; ranking over all items without masking train items, the
reference's; the masked variant under ``masked``), ``n_targets`` (per seed), ``seeds``,
``targets_per_second``, and ``mismatch`` (A.5 at δ = 0: ``cosine_mean``,
``cosine_quantiles``, ``dominant_group_differs_share``, ``gain_correlation``) plus
``mismatch_after`` (the same at the attacker's final δ). With several budgets the
attacker's entry holds one block per budget, keyed ``"epsilon=<ε>"``.
"""
from __future__ import annotations

import os
import time
import warnings

import jax
import numpy as np
from absl import logging

from uatmc_jax.core import reporting
from uatmc_jax.recsys.attacks import mismatch as mismatch_lib
from uatmc_jax.recsys.attacks import protocol
from uatmc_jax.recsys.attacks.protocol import RANKING_NOTE
from uatmc_jax.recsys.attacks.surface import surface_from_recommender


def load_trained(workdir: str):
  """(model, data) of the best checkpoint of an ``experiments.train_recsys`` workdir."""
  from uatmc_jax.recsys.train_job import load_trained_recommender

  model, data, _ = load_trained_recommender(workdir, best=True)
  return model, data


# ----------------------------------------------------------------------------------
# Aggregation.


def _ms(x) -> dict:
  x = np.asarray(x, np.float64).ravel()
  x = x[np.isfinite(x)]
  if x.size == 0:
    return {"mean": None, "std": None}
  return reporting.mean_std(x)


def _hit_rank_block(runs, prefix: str, ks) -> dict:
  block = {}
  for tag in ("before", "after"):
    hits = np.concatenate([r[f"{prefix}hit_{tag}"] for r in runs])
    for j, k in enumerate(ks):
      block[f"hit@{k}_{tag}"] = _ms(hits[:, j])
    block[f"avg_rank_{tag}"] = _ms(np.concatenate([r[f"{prefix}rank_{tag}"] for r in runs]))
  return block


def _mismatch_block(diags, pairs) -> dict:
  with warnings.catch_warnings():  # all-NaN rows (no shared space / no active user)
    warnings.simplefilter("ignore", RuntimeWarning)
    return _mismatch_summary(diags, pairs)


def _mismatch_summary(diags, pairs) -> dict:
  cos = np.concatenate([d.cosine for d in diags])            # (T, P)
  corr = np.concatenate([d.gain_correlation for d in diags])  # (T, P)
  differs = np.concatenate([d.dominant_differs for d in diags])
  shares = np.concatenate([d.shares for d in diags])          # (T, M, G)
  per_target_cos = mismatch_lib.per_target_mean(cos)
  finite = per_target_cos[np.isfinite(per_target_cos)]
  qs = (0.1, 0.25, 0.5, 0.75, 0.9)
  return {
      "pairs": [f"{a}~{b}" for a, b in pairs],
      "cosine_mean": float(finite.mean()) if finite.size else None,
      "cosine_quantiles": ({f"q{int(q * 100)}": float(np.quantile(finite, q)) for q in qs}
                           if finite.size else None),
      "dominant_group_differs_share": float(differs.mean()),
      "gain_correlation": (float(np.nanmean(corr)) if np.isfinite(corr).any() else None),
      "group_share_mean": np.nanmean(shares, axis=0).tolist() if shares.size else None,
      "active_users_mean": float(np.concatenate([d.active_users for d in diags]).mean()),
      "per_target_cosine": per_target_cos.tolist(),
  }


def aggregate(runs, seeds, n_targets, ks, pairs, with_mismatch, first_compiled) -> dict:
  block = _hit_rank_block(runs, "", ks)
  if "masked_hit_before" in runs[0]:
    block["masked"] = _hit_rank_block(runs, "masked_", ks)
  block["loss_before"] = _ms(np.concatenate([r["loss_before"] for r in runs]))
  block["loss_after"] = _ms(np.concatenate([r["loss_after"] for r in runs]))
  seconds = [r["seconds"] for r in runs]
  timed = seconds[1:] if len(seconds) > 1 and first_compiled else seconds
  block.update(n_targets=n_targets, seeds=list(seeds),
               targets_per_second=n_targets * len(timed) / max(sum(timed), 1e-9),
               seconds_per_seed=seconds,
               timing_note=("first seed (compile) excluded" if timed is not seconds
                            else "compile included"),
               ranking=RANKING_NOTE)
  block["per_seed_hit@50_after"] = [float(r["hit_after"][:, list(ks).index(50)].mean())
                                    for r in runs] if 50 in ks else None
  if with_mismatch:
    block["mismatch"] = _mismatch_block([r["mismatch"] for r in runs], pairs)
    block["mismatch_after"] = _mismatch_block([r["mismatch_at_delta"] for r in runs], pairs)
  return block


# ----------------------------------------------------------------------------------
# Running and outputs.


def attack_mesh(mesh_data: int):
  """The attack's mesh: ``mesh_data`` devices over all processes (-1 = all), model 1."""
  from uatmc_jax.core.parallel import mesh as mesh_lib
  return mesh_lib.make_mesh(data=int(mesh_data), model=1)


def run_attacks(cfg, model, data, mesh=None):
  """Every configured attacker x budget x seed on one trained model.

  Returns ``(results, runs, runner)``: the aggregated results, ``runs[(ε, name)]`` the
  per-seed per-target outputs of ``PromotionAttackRunner.run``, and the runner.

  The model and data must be the same on every process (process-local copies:
  ``protocol.local_copy``). With a ``mesh`` each chunk of targets is split over its
  devices (``cfg.chunk_size`` targets per device, capped so that one chunk holds about
  ``cfg.targets``), so every process attacks only its share and the per-target results
  are gathered on every process; the numbers do not depend on the mesh.
  """
  surface = surface_from_recommender(model, data.features, space=cfg.space)
  modalities = surface.modalities
  names = cfg.attacks or protocol.attacker_names(modalities, surface.shared_space)
  attacks = {eps: {n: protocol.make_attacker(n, eps, cfg, modalities) for n in names}
             for eps in cfg.epsilons}
  planted = protocol.use_planted_groups(data, cfg.groups)
  from uatmc_jax.recsys.attacks import user_groups
  grouping = user_groups.grouping_description(data, planted, cfg.n_groups)
  logging.info("user groups (A.5 diagnostics, group alignments): %s", grouping)
  graph_path = cfg.get("graph_path", "local")
  runner = protocol.make_runner(surface, chunk_size=cfg.chunk_size, n_targets=cfg.targets,
                                mesh=mesh, graph_path=graph_path, with_mismatch=cfg.mismatch,
                                log=lambda m: print(f"[attack] {m}", flush=True))
  runs = {(eps, n): [] for eps in cfg.epsilons for n in names}
  t_start = time.perf_counter()
  for seed in cfg.seeds:
    setup = protocol.seed_setup(surface, data, seed, anchor_share=cfg.anchor_share,
                                n_targets=cfg.targets, k=cfg.k, target_set=cfg.target_set,
                                planted=planted, n_groups=cfg.n_groups,
                                train_pairs=data.train)
    for eps in cfg.epsilons:
      for n in names:
        out = runner.run(attacks[eps][n], setup.ctx, setup.targets, setup.groups)
        runs[(eps, n)].append(out)
        logging.info("seed %d eps %g %s: hit@50 %.4f -> %.4f (%.1f targets/s)", seed, eps, n,
                     out["hit_before"][:, 2].mean(), out["hit_after"][:, 2].mean(),
                     len(setup.targets) / out["seconds"])
  ks = runner.ks
  results = {"protocol": {
      "dataset": data.name, "model": type(model).__name__, "modalities": list(modalities),
      "space": cfg.space, "k": cfg.k, "anchor_share": cfg.anchor_share,
      "target_set": cfg.target_set, "targets_per_seed": cfg.targets, "seeds": list(cfg.seeds),
      "epsilons": list(cfg.epsilons), "ranking": RANKING_NOTE,
      "groups": grouping,
      "fgsm": "one sign step, eps_m = eps*||x_t^m||_2, margin 10",
      "pgd": "10 sign steps of 1.25*eps/10, ||delta^m||_inf <= eps, no random start, margin 1",
      "align_weight": cfg.align_weight, "group_temperature": cfg.group_temperature,
      "surrogate": cfg.get("surrogate", "relu"),
      **({"temperature": cfg.temperature} if cfg.get("surrogate", "relu") != "relu" else {}),
      "chunk_size": runner.chunk_size, "chunk_targets": runner.targets_per_chunk,
      "graph_path": ("local (exact neighbourhood recomputation)" if runner.uses_local_graph_path
                     else "full re-encode" if surface.is_graph else "n/a (row-wise model)"),
      "devices": 1 if runner.mesh is None else runner.mesh.size,
      "processes": jax.process_count(), "total_seconds": time.perf_counter() - t_start}}
  from uatmc_jax.recsys.attacks.mismatch import modality_pairs
  for n in names:
    blocks = {}
    for eps in cfg.epsilons:
      a = attacks[eps][n]
      pairs = modality_pairs(tuple(a.modalities or modalities))
      b = aggregate(runs[(eps, n)], cfg.seeds, cfg.targets, ks, pairs, cfg.mismatch, True)
      b["epsilon"] = eps
      b["attack"] = {"method": a.method, "budget": a.budget, "steps": a.steps,
                     "margin": a.margin, "alignment": a.alignment,
                     "modalities": list(a.modalities or modalities)}
      blocks[f"epsilon={eps}"] = b
    results[n] = blocks[f"epsilon={cfg.epsilons[0]}"] if len(blocks) == 1 else blocks
  return results, runs, runner


def write_outputs(workdir: str, results: dict, cfg, data_name: str, model_name: str) -> None:
  """attack_results.json / .md / attack_cosines.png, by process 0 only."""
  if jax.process_index() != 0:
    return
  reporting.write_json(os.path.join(workdir, "attack_results.json"), results)
  if cfg.mismatch:
    write_plot(os.path.join(workdir, "attack_cosines.png"), results)
  table = markdown(results)
  with open(os.path.join(workdir, "attack_results.md"), "w") as f:
    f.write(f"Promotion attacks on {data_name} / {model_name} ({cfg.target_set} "
            f"targets, {cfg.targets}/seed x seeds {list(cfg.seeds)}; {RANKING_NOTE}; "
            f"Hit@K after unless stated; user groups: {results['protocol']['groups']}; "
            f"{reporting.std_header(cfg.targets * len(cfg.seeds), 'targets (all seeds)')})"
            f"\n\n{table}\n")
  print(f"user groups: {results['protocol']['groups']}\n{table}", flush=True)


def write_plot(path: str, results: dict) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4))
  bins = np.linspace(-1, 1, 41)
  drawn = False
  for name, entry in results.items():
    if name == "protocol":
      continue
    blocks = entry.items() if "hit@50_after" not in entry else [("", entry)]
    for eps_key, block in blocks:
      if not str(name).startswith("pgd") or "mismatch" not in block:
        continue
      if name == "pgd" and not drawn:  # δ = 0: the same for every budget
        c = np.asarray(block["mismatch"]["per_target_cosine"], float)
        ax.hist(c[np.isfinite(c)], bins=bins, alpha=0.5, label="clean (δ = 0), PGD margin")
        drawn = True
      if name in ("pgd", "pgd_aligned", "pgd_shared_groups"):
        c = np.asarray(block["mismatch_after"]["per_target_cosine"], float)
        if np.isfinite(c).any():
          ax.hist(c[np.isfinite(c)], bins=bins, histtype="step", lw=1.5,
                  label=f"after {name} {eps_key}")
          drawn = True
  ax.set_xlabel("cos(∇_{δ^m} L, ∇_{δ^m'} L) per target")
  ax.set_ylabel("targets")
  ax.set_title("Cross-modal gradient cosine of the promotion objective (A.5)")
  if drawn:
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def markdown(results: dict) -> str:
  header = ["attacker", "ε", "Hit@10", "Hit@20", "Hit@50 before", "Hit@50 after",
            "Hit@100", "avg rank before → after", "cos(g^m,g^m')", "dominant differs",
            "gain corr", "targets/s"]
  rows = []
  for name, entry in results.items():
    if name == "protocol":
      continue
    blocks = [(None, entry)] if "hit@50_after" in entry else list(entry.items())
    for _, b in blocks:
      mm = b.get("mismatch") or {}
      rows.append([
          name, b["epsilon"], b["hit@10_after"], b["hit@20_after"], b["hit@50_before"],
          b["hit@50_after"], b["hit@100_after"],
          f"{b['avg_rank_before']['mean']:.1f} → {b['avg_rank_after']['mean']:.1f}",
          mm.get("cosine_mean"), mm.get("dominant_group_differs_share"),
          mm.get("gain_correlation"), b["targets_per_second"]])
  return reporting.markdown_table(header, rows)
