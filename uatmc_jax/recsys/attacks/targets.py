"""Target items and anchor users of the promotion attack protocol (METHODS.md A.4).

* random: a seeded uniform sample of items;
* cold: items with few train interactions (≤ ``cold_max_interactions``, 5 in the
  paper), sampled; falls back to the least popular items when there are too few;
* hot: the most popular items (ties broken by the seed);
* anchors: a seeded random share (40%) of users.
All are plain numpy, deterministic for a seed.
"""
from __future__ import annotations

import numpy as np

from uatmc_jax.core import errors

TARGET_SETS = ("random", "cold", "hot")


def select_targets(kind: str, n_targets: int, item_popularity: np.ndarray, seed: int, *,
                   cold_max_interactions: int = 5) -> np.ndarray:
  """(n_targets,) int32 distinct target item ids.

  Args:
    kind: "random", "cold" or "hot".
    n_targets: how many (at most the number of items).
    item_popularity: (n_items,) train interactions per item.
    seed: sampling seed.
    cold_max_interactions: the cold threshold.
  """
  pop = np.asarray(item_popularity)
  n_items = pop.shape[0]
  if kind not in TARGET_SETS:
    raise errors.ConfigError(f"target_set must be one of {TARGET_SETS}, got {kind!r}")
  if not 0 < n_targets <= n_items:
    raise errors.ConfigError(f"targets must be in [1, {n_items}], got {n_targets}")
  rng = np.random.default_rng(seed)
  if kind == "random":
    return np.sort(rng.choice(n_items, n_targets, replace=False)).astype(np.int32)
  tiebreak = rng.random(n_items)
  if kind == "hot":
    order = np.lexsort((tiebreak, -pop))
    return np.sort(order[:n_targets]).astype(np.int32)
  cold = np.flatnonzero(pop <= cold_max_interactions)
  if cold.size >= n_targets:
    return np.sort(rng.choice(cold, n_targets, replace=False)).astype(np.int32)
  order = np.lexsort((tiebreak, pop))
  return np.sort(order[:n_targets]).astype(np.int32)


def select_anchors(n_users: int, share: float, seed: int) -> np.ndarray:
  """A seeded random ``share`` of users (at least one), sorted int32 ids."""
  if not 0 < share <= 1:
    raise errors.ConfigError(f"anchor share must be in (0, 1], got {share}")
  n = max(1, int(round(share * n_users)))
  rng = np.random.default_rng(seed + 7919)
  return np.sort(rng.choice(n_users, n, replace=False)).astype(np.int32)
