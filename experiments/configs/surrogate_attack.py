"""Naive vs aligned PGD promotion attack under the hinge or its softplus surrogate (A.4, A.6).

  python -m experiments.surrogate_attack \\
    --config=experiments/configs/surrogate_attack.py:epsilon=0.05;0.1;0.2,temperature=0.1 \\
    --workdir=<dir of a model trained by experiments.train_recsys>

Arguments (``k=v`` joined by ``,``; lists joined by ``;`` or ``+``):
  targets: random targets per seed (100); seeds: count n (1..n) or a list (1).
  epsilon: PGD budgets (0.05;0.1;0.2). k: the objective's top-K (50).
  anchor_share: share of users that are anchors (0.4).
  surrogate: hinges compared, any of relu / softplus ("relu;softplus").
  temperature: τ of the softplus surrogate, one value or a list (0.1).
  align_weight: λ_align of the aligned attacker (1.0).
  chunk_size: targets per vmapped chunk (64).
  runlocal: smoke variant (10 targets, 1 seed).
"""
from __future__ import annotations

import ml_collections

from experiments.configs import common
from uatmc_jax.core.errors import ConfigError

DEFAULTS = dict(targets=100, seeds=1, epsilon="0.05;0.1;0.2", k=50, anchor_share=0.4,
                surrogate="relu;softplus", temperature=0.1, align_weight=1.0, chunk_size=64,
                runlocal=False)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, **DEFAULTS)
  cfg = ml_collections.ConfigDict()
  cfg.targets = int(a["targets"])
  seeds = a["seeds"]
  cfg.seeds = list(range(1, seeds + 1)) if isinstance(seeds, int) else common.as_list(seeds, int)
  cfg.epsilons = common.as_list(a["epsilon"], float)
  cfg.k = int(a["k"])
  cfg.anchor_share = float(a["anchor_share"])
  cfg.surrogates = common.as_list(a["surrogate"], str)
  if not cfg.surrogates or set(cfg.surrogates) - {"relu", "softplus"}:
    raise ConfigError(f"surrogate: expected a list of relu / softplus, got {a['surrogate']!r}")
  cfg.temperatures = common.as_list(a["temperature"], float)
  cfg.align_weight = float(a["align_weight"])
  cfg.chunk_size = int(a["chunk_size"])
  cfg.runlocal = common.as_bool(a["runlocal"], "runlocal")
  if cfg.runlocal:
    cfg.targets = min(cfg.targets, 10)
    cfg.seeds = cfg.seeds[:1]
  return cfg
