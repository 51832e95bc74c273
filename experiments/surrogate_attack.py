"""Naive vs aligned PGD promotion attack under the hinge or its softplus surrogate (A.4, A.6).

  python -m experiments.surrogate_attack \\
    --config=experiments/configs/surrogate_attack.py:epsilon=0.05;0.1;0.2,temperature=0.1 \\
    --workdir=<dir of a model trained by experiments.train_recsys>

Same anchors, targets and budgets as ``experiments.attack_recsys`` (``protocol.seed_setup``;
projected space, planted groups when the data has them); for each hinge (``relu``: A.4,
``softplus``: τ·softplus(x/τ), see ``uatmc_jax.recsys.attacks.objective``) runs the naive
PGD and the aligned PGD (the cosine reward, λ_align) and prints Hit@50 before / after,
and the aligned − naive Hit@50 after attack, paired over targets, with a 95% interval.
Writes ``surrogate_attack.json`` into the workdir.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np

from experiments import launch
from uatmc_jax.recsys import inner_max
from uatmc_jax.recsys.attack_eval import load_trained
from uatmc_jax.recsys.attacks import protocol
from uatmc_jax.recsys.attacks.attackers import pgd_attack
from uatmc_jax.recsys.attacks.surface import surface_from_recommender

_CONFIG = launch.define_config_flag("Surrogate attack config file.")
HIT50 = 2  # column of K = 50 in METRIC_KS (10, 20, 50, 100)


def main(argv):
  del argv
  cfg, workdir = launch.start(_CONFIG, "experiments/configs/surrogate_attack.py:runlocal=True",
                              "the directory of a model trained by experiments.train_recsys")
  model, data = load_trained(workdir)
  model = protocol.local_copy(model)
  surface = surface_from_recommender(model, data.features, space="projected")
  runner = protocol.make_runner(surface, chunk_size=cfg.chunk_size, n_targets=cfg.targets,
                                with_mismatch=False)
  hinges = [("relu", None)] * ("relu" in cfg.surrogates) + [
      ("softplus", t) for t in cfg.temperatures if "softplus" in cfg.surrogates]
  hits = {}
  for seed in cfg.seeds:
    setup = protocol.seed_setup(surface, data, seed, anchor_share=cfg.anchor_share,
                                n_targets=cfg.targets, k=cfg.k,
                                planted=protocol.use_planted_groups(data, "auto"),
                                train_pairs=data.train)
    for eps in cfg.epsilons:
      for sur, tau in hinges:
        for align in ("none", "cosine"):
          attack = pgd_attack(eps, k=cfg.k, alignment=align, align_weight=cfg.align_weight,
                              surrogate=sur, temperature=tau or 0.1)
          out = runner.run(attack, setup.ctx, setup.targets, setup.groups)
          key = (eps, sur if tau is None else f"softplus(tau={tau})", align)
          hits.setdefault(key, {"before": [], "after": []})
          hits[key]["before"].append(np.asarray(out["hit_before"])[:, HIT50])
          hits[key]["after"].append(np.asarray(out["hit_after"])[:, HIT50])
  rows, lines = [], [
      f"{data.name} {type(model).__name__}: PGD (10 sign steps, L∞ ε, margin 1), "
      f"{cfg.targets} targets x seeds {list(cfg.seeds)}, λ_align={cfg.align_weight}", "",
      "| ε | hinge | Hit@50 before | naive after | aligned after | aligned − naive [95% CI] |",
      "|---|---|---|---|---|---|"]
  for eps in cfg.epsilons:
    for sur, tau in hinges:
      name = sur if tau is None else f"softplus(tau={tau})"
      naive = np.concatenate(hits[(eps, name, "none")]["after"])
      aligned = np.concatenate(hits[(eps, name, "cosine")]["after"])
      before = np.concatenate(hits[(eps, name, "none")]["before"])
      d = inner_max.paired_interval(aligned - naive)
      rows.append({"epsilon": eps, "hinge": name, "hit50_before": float(before.mean()),
                   "hit50_naive": float(naive.mean()), "hit50_aligned": float(aligned.mean()),
                   "aligned_minus_naive": d})
      lines.append(f"| {eps} | {name} | {before.mean():.4f} | {naive.mean():.4f} | "
                   f"{aligned.mean():.4f} | {d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}] |")
  print("\n".join(lines), flush=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "surrogate_attack.json"), "w") as f:
      json.dump({"config": cfg.to_dict(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
  launch.run(main)
