"""Inner-maximisation strength of UAT-MC with and without alignment (METHODS.md A.6-A.7).

  python -m experiments.inner_max \\
    --config=experiments/configs/inner_max.py:batches=1000,epsilon=0.05,align_weight=4.0 \\
    --workdir=<dir of a model trained by experiments.train_recsys>

Arguments (``k=v`` joined by ``,``; lists joined by ``;`` or ``+``):
  batches: BPR training batches measured (1000), drawn with the trainer's sampler
    (epochs ``seed``, ``seed``+1, ... of the training data, in order).
  batch_size: rows per batch (2048, A.7's).
  epsilon: the defence's relative budget ε (0.05, the vbpr_baby preset).
  align_weight: λ_align of the aligned variant; one value or a list (4.0).
  pgd_steps: step counts of the multi-step inner maximisation ("5;10").
  step_scale: PGD step = step_scale · ε_i^m / k (2.5).
  seed: sampling seed (0).
  chunk: batches per jitted call (100; results are identical for any chunk).
  runlocal: smoke variant (20 batches).
"""
from __future__ import annotations

import ml_collections

from experiments.configs import common

DEFAULTS = dict(batches=1000, batch_size=2048, epsilon=0.05, align_weight=4.0,
                pgd_steps="5;10", step_scale=2.5, seed=0, chunk=100, runlocal=False)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, **DEFAULTS)
  cfg = ml_collections.ConfigDict()
  cfg.batches = int(a["batches"])
  cfg.batch_size = int(a["batch_size"])
  cfg.epsilon = float(a["epsilon"])
  cfg.align_weights = common.as_list(a["align_weight"], float)
  cfg.pgd_steps = common.as_list(a["pgd_steps"], int)
  cfg.step_scale = float(a["step_scale"])
  cfg.seed = int(a["seed"])
  cfg.chunk = int(a["chunk"])
  cfg.runlocal = common.as_bool(a["runlocal"], "runlocal")
  if cfg.runlocal:
    cfg.batches = min(cfg.batches, 20)
  return cfg
