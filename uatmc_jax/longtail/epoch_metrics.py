"""The training loop's epoch scalars on the host (METHODS.md B.1 groups, B.5).

``epoch_sums`` reduces the per-step metrics of ``trainer.LongTailTrainer.train_step``
(fetched once per epoch) to float64 sums in step order and per-class count sums;
``group_scalars`` names an accuracy block's overall / balanced / Many / Medium / Few /
Tail numbers as ``{prefix}/{group}`` scalars for the TensorBoard event files.
"""
from __future__ import annotations

import numpy as np


def epoch_sums(step_metrics: list) -> tuple[dict, dict, dict, int]:
  """Per-step host metrics -> (sum of each scalar, per-class count sums, sum of each
  diagnostic scalar, steps), summed in the order of the steps (float64 sums of the
  float32 step values)."""
  sums: dict[str, float] = {}
  diag_sums: dict[str, float] = {}
  class_sums = {"adv_correct": 0, "seen": 0}
  for metrics in step_metrics:
    metrics = dict(metrics)
    per_class = metrics.pop("per_class")
    for k in class_sums:
      class_sums[k] = class_sums[k] + np.asarray(per_class[k], np.int64)
    for k, v in metrics.pop("diag", {}).items():
      diag_sums[k] = diag_sums.get(k, 0.0) + float(v)
    for k, v in metrics.items():
      sums[k] = sums.get(k, 0.0) + float(v)
  return sums, class_sums, diag_sums, len(step_metrics)


def group_scalars(prefix: str, block: dict) -> dict[str, float]:
  """``{prefix}/{overall,balanced,many,medium,few,tail}`` of an accuracy block (empty
  groups, i.e. None, are left out)."""
  return {f"{prefix}/{k}": block[k] for k in ("overall", "balanced", "many", "medium",
                                               "few", "tail") if block.get(k) is not None}
