"""Long-tailed training subsets and class groups (METHODS.md B.1).

CIFAR-10-LT / CIFAR-100-LT (Cao et al. 2019, the field's construction):
``n_c = floor(n_max · IR^(−c/(C−1)))`` for class ``c = 0 .. C−1`` (class 0 the head,
class C−1 gets ``floor(n_max / IR)``), each class subsampled without replacement with
a seed; the test set stays balanced.

Class groups from the *training* counts: Many (> 100 images), Medium (20–100), Few
(< 20), and Tail = the rarest 30% of classes, i.e. ``ceil(0.3 · C)`` classes (3 of 10,
30 of 100), ties broken towards the higher class index.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from uatmc_jax.core.errors import ConfigError
from uatmc_jax.longtail.data.image_dataset import ImageDataset

DEFAULT_N_MAX = {10: 5000, 100: 500}
MANY_THRESHOLD = 100  # Many: n > 100
FEW_THRESHOLD = 20    # Few: n < 20; Medium: 20 <= n <= 100
TAIL_FRACTION = 0.3


def longtail_class_counts(num_classes: int, imbalance_ratio: float,
                          n_max: int) -> np.ndarray:
  """Per-class training counts of the exponential profile (B.1).

  Args:
    num_classes: C >= 2.
    imbalance_ratio: IR = n_0 / n_{C-1} (> 0; 10, 20, 50, 100 in the papers; 1 =
      balanced).
    n_max: images of the head class 0.

  Returns:
    ``(C,)`` int64, ``n_c = floor(n_max · IR^(−c/(C−1)))``, evaluated as
    ``n_max · (1/IR)^(c/(C−1))`` like the reference construction.
  """
  if num_classes < 2:
    raise ConfigError(f"longtail: num_classes must be >= 2, got {num_classes}")
  if not imbalance_ratio > 0 or not math.isfinite(imbalance_ratio):
    raise ConfigError(f"longtail: imbalance_ratio must be a positive number, got "
                      f"{imbalance_ratio}")
  if n_max < 1:
    raise ConfigError(f"longtail: n_max must be >= 1, got {n_max}")
  c = np.arange(num_classes, dtype=np.float64)
  counts = np.floor(n_max * (1.0 / imbalance_ratio) ** (c / (num_classes - 1)))
  return counts.astype(np.int64)


# The test subset (``test_per_class``) is drawn with this fixed seed, whatever the
# training run's data_seed, so every run of a comparison is evaluated on the same images.
EVAL_SUBSET_SEED = 0


def class_sample(n_available: int, n_take: int, seed: int, class_index: int) -> np.ndarray:
  """Positions (sorted, int64) of the ``n_take`` of a class's ``n_available`` items
  (rows or files, in their sorted order) drawn from ``default_rng([seed, c])``.

  The one seeded draw behind ``longtail_indices`` and the image-folder reader's
  ``max_per_class`` with a seed, so both pick the same items of the same data.
  """
  perm = np.random.default_rng([int(seed), int(class_index)]).permutation(int(n_available))
  return np.sort(perm[:int(n_take)])


def longtail_indices(labels: np.ndarray, counts: np.ndarray, seed: int) -> np.ndarray:
  """Seeded per-class subsample: ``counts[c]`` rows of each class ``c``.

  Each class draws from its own generator ``default_rng([seed, c])`` (`class_sample`),
  so one class's draw does not depend on the others'. Returns the chosen row indices
  sorted ascending (int64).

  Raises:
    ConfigError: a class has fewer images than requested.
  """
  labels = np.asarray(labels)
  counts = np.asarray(counts, np.int64)
  chosen = []
  for c, n_c in enumerate(counts):  # C iterations (classes), not rows
    rows = np.flatnonzero(labels == c)
    if rows.size < n_c:
      raise ConfigError(f"longtail: class {c} has {rows.size} images but the profile asks "
                        f"for {n_c}; lower n_max or the imbalance ratio, or use a larger "
                        f"training set")
    chosen.append(rows[class_sample(rows.size, n_c, seed, c)])
  return np.sort(np.concatenate(chosen)) if chosen else np.zeros((0,), np.int64)


def balanced_subset(dataset: ImageDataset, per_class: int | None,
                    seed: int = EVAL_SUBSET_SEED) -> ImageDataset:
  """A seeded subsample of ``min(per_class, n_c)`` images of every class (the test
  subset of ``test_per_class``); ``dataset`` itself when per_class is None / 0."""
  if not per_class:
    return dataset
  counts = np.minimum(dataset.class_counts(), int(per_class))
  return dataset.subset(longtail_indices(dataset.labels, counts, seed))


def make_longtail(dataset: ImageDataset, imbalance_ratio: float, *, n_max: int | None = None,
                  seed: int = 0) -> tuple[ImageDataset, np.ndarray]:
  """The long-tailed training subset of a balanced ``dataset`` (B.1).

  Args:
    dataset: the (balanced) training set.
    imbalance_ratio: IR (> 0).
    n_max: head-class count; default 5000 for 10 classes, 500 for 100 classes,
      otherwise the smallest class count of ``dataset``.
    seed: subsampling seed.

  Returns:
    ``(subset, counts)``: the subset (rows in ascending original order) and its
    ``(C,)`` int64 per-class counts (the formula's).
  """
  if n_max is None:
    n_max = DEFAULT_N_MAX.get(dataset.num_classes, int(dataset.class_counts().min()))
  counts = longtail_class_counts(dataset.num_classes, imbalance_ratio, n_max)
  idx = longtail_indices(dataset.labels, counts, seed)
  return dataset.subset(idx), counts


@dataclasses.dataclass(frozen=True)
class ClassGroups:
  """Boolean ``(C,)`` masks of the class groups of B.1 (from training counts)."""
  many: np.ndarray
  medium: np.ndarray
  few: np.ndarray
  tail: np.ndarray

  def indices(self, group: str) -> np.ndarray:
    """Class indices (int64, ascending) of ``group`` in many|medium|few|tail."""
    if group not in ("many", "medium", "few", "tail"):
      raise ConfigError(f"class group: expected many|medium|few|tail, got {group!r}")
    return np.flatnonzero(getattr(self, group))

  def as_dict(self) -> dict[str, list[int]]:
    return {g: self.indices(g).tolist() for g in ("many", "medium", "few", "tail")}


def class_groups(train_counts: np.ndarray, *, many_threshold: int = MANY_THRESHOLD,
                 few_threshold: int = FEW_THRESHOLD,
                 tail_fraction: float = TAIL_FRACTION) -> ClassGroups:
  """Many (> 100), Medium (20–100), Few (< 20) and Tail (rarest ``ceil(0.3·C)``).

  Args:
    train_counts: ``(C,)`` training images per class.
    many_threshold, few_threshold: the group bounds (defaults of B.1).
    tail_fraction: share of classes in Tail; the count is rounded *up*
      (``ceil``, at least 1), so CIFAR-10 has 3 tail classes and CIFAR-100 30.

  Returns:
    ``ClassGroups`` with boolean masks; an empty group is an all-False mask (e.g. Few
    on CIFAR-10-LT, whose rarest class has 50 images at IR 100).
  """
  counts = np.asarray(train_counts, np.int64)
  if counts.ndim != 1 or counts.size == 0:
    raise ConfigError(f"class_groups: train_counts must be a non-empty vector, got "
                      f"shape {counts.shape}")
  if not 0 < tail_fraction <= 1:
    raise ConfigError(f"class_groups: tail_fraction must be in (0, 1], got {tail_fraction}")
  num = counts.size
  # round() first so that 0.3 * 10 = 3.0000000000000004 counts as 3, not 4.
  n_tail = max(1, math.ceil(round(tail_fraction * num, 9)))
  # Rarest first; among equal counts the higher class index is rarer.
  order = np.lexsort((-np.arange(num), counts))
  tail = np.zeros(num, bool)
  tail[order[:n_tail]] = True
  return ClassGroups(many=counts > many_threshold,
                     medium=(counts >= few_threshold) & (counts <= many_threshold),
                     few=counts < few_threshold, tail=tail)
