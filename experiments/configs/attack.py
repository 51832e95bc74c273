"""Promotion attacks on a trained recommender (METHODS.md A.4-A.6).

  python -m experiments.attack_recsys \\
    --config=experiments/configs/attack.py:targets=100,seeds=3,epsilon=0.05;0.1 \\
    --workdir=<dir of a model trained by experiments.train_recsys>

Arguments (``k=v`` joined by ``,``; lists joined by ``;`` or ``+``):
  targets: targets per seed (100).
  seeds: a count n (seeds 1..n) or an explicit list "1;5;9" (3).
  epsilon: one budget or a list "0.025;0.05;0.1" (0.05).
  attack: one attacker or a list; empty = every attacker: fgsm, pgd, pgd_aligned
    (the paper's cosine reward), pgd_pcgrad_groups, pgd_shared_groups and the
    single-modal baselines fgsm_<m>, pgd_<m> for every modality m. Also by name (not
    in the default list): pgd_cosine_pushforward / fgsm_cosine_pushforward, the cosine
    reward on the projected-space displacements of the raw steps (space=raw; equals
    pgd_aligned in the projected space; see uatmc_jax.recsys.attacks.alignment).
  target_set: random | cold | hot (random).
  anchor_share: share of users that are anchors (0.4).
  k: the objective's top-K (50).
  space: projected (reference) | raw.
  groups: auto (planted groups when the data has them, else k-means) | planted | kmeans.
  n_groups: k-means groups (4).
  align_weight: λ_align of the cosine reward (1.0).
  group_temperature: τ of pgd_shared_groups (0.1).
  surrogate: the objective's hinge for every attacker: relu (A.4, the reference) |
    softplus (τ·softplus(margin/τ): the cosine reward of pgd_aligned has a gradient on
    models linear in the projected features; row-wise models and graph_path=full only).
  temperature: τ of the softplus surrogate (0.1; relu is its τ → 0 limit).
  chunk_size: targets per vmapped chunk (64; graph models on the full path use
    min(chunk_size, 4), on the local path a memory cap per neighbourhood size bucket).
  graph_path: graph models (MMGCN): local (exact neighbourhood-local recomputation, the
    default) | full (re-encode the whole graph every step: the slow reference).
  mismatch: compute the A.5 diagnostics (True).
  mesh_data: devices (over all processes) that share the targets of each chunk (-1 =
    all); chunk_size is then per device. The model is replicated for the attack.
  runlocal: smoke variant (at most 10 targets, 1 seed).
"""
from __future__ import annotations

import ml_collections

from experiments.configs import common

DEFAULTS = dict(targets=100, seeds=3, epsilon=0.05, attack=None, target_set="random",
                anchor_share=0.4, k=50, space="projected", groups="auto", n_groups=4,
                align_weight=1.0, group_temperature=0.1, surrogate="relu", temperature=0.1,
                chunk_size=64, graph_path="local", mismatch=True, mesh_data=-1, runlocal=False)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, **DEFAULTS)
  seeds = a["seeds"]
  if isinstance(seeds, int):
    seeds = list(range(1, seeds + 1))
  else:
    seeds = common.as_list(seeds, int)
  cfg = ml_collections.ConfigDict()
  cfg.targets = int(a["targets"])
  cfg.seeds = seeds
  cfg.epsilons = common.as_list(a["epsilon"], float)
  cfg.attacks = common.as_list(a["attack"], str)
  for key in ("target_set", "space", "groups"):
    cfg[key] = str(a[key])
  cfg.anchor_share = float(a["anchor_share"])
  cfg.k = int(a["k"])
  cfg.n_groups = int(a["n_groups"])
  cfg.align_weight = float(a["align_weight"])
  cfg.group_temperature = float(a["group_temperature"])
  cfg.surrogate = str(a["surrogate"])
  cfg.temperature = float(a["temperature"])
  cfg.chunk_size = int(a["chunk_size"])
  cfg.graph_path = str(a["graph_path"])
  cfg.mismatch = bool(a["mismatch"])
  cfg.mesh_data = int(a["mesh_data"])
  cfg.runlocal = bool(a["runlocal"])
  if cfg.runlocal:
    cfg.targets = min(cfg.targets, 10)
    cfg.seeds = cfg.seeds[:1]
  return cfg
