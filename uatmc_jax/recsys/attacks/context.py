"""Clean-model quantities of the promotion attack, computed once per (model, anchors).

``build_context`` scores the anchors against every item once and keeps their clean
top-(K+1) lists, sorted rows (for exact ranks, METHODS.md A.4) and, on graph models, the
clean per-layer cache of the local path (``graph_local``).
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from uatmc_jax.core import errors, ops
from uatmc_jax.recsys.attacks.surface import AttackSurface

class PromotionContext(NamedTuple):
  """Clean-model quantities computed once per (model, anchor set).

  anchors: (n_A,) int32 anchor user ids.
  anchor_vectors: (n_A, D) clean user vectors of the anchors.
  scores: (n_A, n_items) clean scores (the target's own clean score is read here, so
    rank comparisons against the sorted rows are exact, not off by rounding).
  topk_values, topk_indices: (n_A, k+1) clean top-(k+1) scores over all items.
  sorted_scores: (n_A, n_items) clean scores, ascending per user (ranks).
  masked_sorted_scores: (n_A, n_items) same with each user's train items at −∞, or None.
  train_mask: (n_A, n_items) bool, True for (anchor, train item) pairs, or None.
  Graph models with a local path (``surface.graph``) only, else None:
  desc_values, desc_indices: (n_A, W) clean top-W scores and their items, W = min(n_items,
    k + the largest number of items one target's features move).
  anchor_row: (n_users,) int32 each user's anchor row, n_A for non-anchors.
  graph_cache: ``graph_local.GraphCache``, the clean activations of every layer.
  """
  anchors: jax.Array
  anchor_vectors: jax.Array
  scores: jax.Array
  topk_values: jax.Array
  topk_indices: jax.Array
  sorted_scores: jax.Array
  masked_sorted_scores: jax.Array | None
  train_mask: jax.Array | None
  desc_values: jax.Array | None = None
  desc_indices: jax.Array | None = None
  anchor_row: jax.Array | None = None
  graph_cache: Any = None


def anchor_train_mask(anchors: np.ndarray, n_users: int, n_items: int,
                      train_pairs: np.ndarray) -> np.ndarray:
  """Dense (n_A, n_items) bool of the anchors' train interactions."""
  row_of = np.full(n_users, -1, np.int64)
  row_of[np.asarray(anchors)] = np.arange(len(anchors))
  rows = row_of[train_pairs[:, 0]]
  keep = rows >= 0
  mask = np.zeros((len(anchors), n_items), bool)
  mask[rows[keep], train_pairs[keep, 1]] = True
  return mask


@functools.partial(jax.jit, static_argnames=("k", "masked"))
def _context_arrays(anchor_vectors, item_vectors, train_mask, *, k, masked):
  scores = anchor_vectors @ item_vectors.T
  values, indices = ops.top_k(scores, k + 1)
  sorted_scores = jnp.sort(scores, axis=1)
  masked_sorted = None
  if masked:
    masked_sorted = jnp.sort(jnp.where(train_mask, -jnp.inf, scores), axis=1)
  return scores, values, indices.astype(jnp.int32), sorted_scores, masked_sorted


def build_context(surface: AttackSurface, anchors: np.ndarray, *, k: int = 50,
                  train_pairs: np.ndarray | None = None) -> PromotionContext:
  """Clean scores of the anchors, their top-(k+1) and sorted rows (once per model).

  Args:
    surface: the attacked model.
    anchors: (n_A,) anchor user ids.
    k: the objective's K.
    train_pairs: optional (n, 2) (user, item) train interactions; enables the masked
      metrics.
  """
  cache = None
  if surface.graph is not None:
    cache = jax.jit(surface.graph.clean_fn)(surface.params, surface.projected_table)
    users, items = cache.users, cache.items
  else:
    users, items = surface.clean_vectors()
  anchors = np.asarray(anchors, np.int32)
  anchor_vectors = jnp.take(users, jnp.asarray(anchors), axis=0)
  n_items = items.shape[0]
  if k + 1 > n_items:
    raise errors.ConfigError(f"attack k={k} needs at least k+1 items, have {n_items}")
  mask = None
  if train_pairs is not None:
    mask = jnp.asarray(anchor_train_mask(anchors, users.shape[0], n_items, train_pairs))
  scores, values, indices, sorted_scores, masked_sorted = _context_arrays(
      anchor_vectors, items, mask if mask is not None else jnp.zeros((1, 1), bool), k=k,
      masked=mask is not None)
  ctx = PromotionContext(jnp.asarray(anchors), anchor_vectors, scores, values, indices,
                         sorted_scores, masked_sorted, mask)
  if cache is not None:
    width = min(n_items, k + surface.graph.neighbourhoods.max_changed_items())
    desc_values, desc_indices = jax.jit(jax.lax.top_k, static_argnums=1)(scores, width)
    anchor_row = np.full(users.shape[0], len(anchors), np.int32)
    anchor_row[anchors] = np.arange(len(anchors), dtype=np.int32)
    ctx = ctx._replace(desc_values=desc_values, desc_indices=desc_indices.astype(jnp.int32),
                       anchor_row=jnp.asarray(anchor_row), graph_cache=cache)
  return jax.block_until_ready(ctx)  # so attack timings do not absorb this set-up


def count_greater(sorted_rows: jax.Array, values: jax.Array) -> jax.Array:
  """Per row, the number of entries of an ascending row strictly above ``values``."""
  n = sorted_rows.shape[1]
  pos = jax.vmap(functools.partial(jnp.searchsorted, side="right"))(sorted_rows, values)
  return (n - pos).astype(jnp.int32)

