"""Per-class accuracy and its long-tail summaries (METHODS.md B.1, B.5).

The block every long-tail result reports, for clean inputs and for each attack:
``{"per_class", "overall", "balanced", "many", "medium", "few", "tail"}`` where the
groups come from the *training* counts (``data.longtail.class_groups``): Many (> 100),
Medium (20–100), Few (< 20), Tail (the rarest 30% of classes). A group with no class
(e.g. Few on CIFAR-10-LT) is reported as ``None``, not as 0.0 (the reference's
misleading 0.0 for an empty tail).
"""
from __future__ import annotations

import numpy as np

from uatmc_jax.longtail.data.longtail import class_groups


def per_class_counts(predictions: np.ndarray, labels: np.ndarray, mask: np.ndarray | None,
                     num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """(correct (C,), total (C,)) int64 counts over the rows with ``mask`` = 1."""
  predictions, labels = np.asarray(predictions), np.asarray(labels)
  weights = np.ones(labels.shape, np.int64) if mask is None else (np.asarray(mask) > 0)
  correct = np.bincount(labels, weights=(predictions == labels) * weights,
                        minlength=num_classes).astype(np.int64)
  total = np.bincount(labels, weights=weights, minlength=num_classes).astype(np.int64)
  return correct, total


def accuracy_block(correct: np.ndarray, total: np.ndarray,
                   train_counts: np.ndarray) -> dict:
  """The long-tail accuracy block from per-class correct/total counts.

  Args:
    correct, total: (C,) counts on the evaluation set.
    train_counts: (C,) training images per class (defines the groups).

  Returns:
    ``per_class`` (list, None for a class absent from the evaluation set),
    ``overall`` (Σcorrect/Σtotal), ``balanced`` (mean of per-class accuracies) and the
    mean per-class accuracy of ``many`` / ``medium`` / ``few`` / ``tail`` (None when
    the group is empty).
  """
  correct = np.asarray(correct, np.float64)
  total = np.asarray(total, np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    acc = np.where(total > 0, correct / np.maximum(total, 1), np.nan)
  groups = class_groups(np.asarray(train_counts))

  def group_mean(mask):
    vals = acc[np.asarray(mask) & ~np.isnan(acc)]
    return float(vals.mean()) if vals.size else None

  present = ~np.isnan(acc)
  return {
      "per_class": [None if np.isnan(a) else float(a) for a in acc],
      "overall": float(correct.sum() / total.sum()) if total.sum() else None,
      "balanced": float(acc[present].mean()) if present.any() else None,
      "many": group_mean(groups.many),
      "medium": group_mean(groups.medium),
      "few": group_mean(groups.few),
      "tail": group_mean(groups.tail),
  }
