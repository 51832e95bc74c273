"""Clean-model quantities of the promotion attack, computed once per (model, anchors).

``build_context`` scores the anchors against every item once and keeps their clean
top-(K+1) lists (the objective, METHODS.md A.4), what the exact ranks need and, on graph
models, the clean top-W lists and per-layer cache of the local path (``graph_local``).

Two layouts, the same numbers (tests/test_attack_scale.py):

* dense (``dense=True``; the default while anchors × items ≤ ``DENSE_CONTEXT_ELEMENTS``):
  the (anchors × items) clean scores and their sorted rows are stored; a rank is a
  ``searchsorted`` per anchor.
* top-k (``dense=False``; the default above it): only each anchor's top-(K+1) (and
  top-W) values and indices, computed in anchor chunks (sharded over a mesh's devices
  when one is given), plus the clean item vectors and, for the masked metrics, each
  anchor's train items and their clean scores. Memory grows with anchors × (K + W + the
  largest train degree), not anchors × items. A rank (items scored strictly higher,
  A.4) is exact still: the anchors' clean rows are recomputed on the fly, item chunk by
  item chunk (``anchor vectors @ item chunkᵀ``, count greater), at anchors × items × D
  multiply-adds per evaluated point and no storage.

Every score here is a float32 matmul at full precision (``evaluation_precision``).
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from uatmc_jax.core import errors, ops
from uatmc_jax.core.parallel import precision
from uatmc_jax.recsys.attacks.surface import AttackSurface

class PromotionContext(NamedTuple):
  """Clean-model quantities computed once per (model, anchor set).

  anchors: (n_A,) int32 anchor user ids.
  anchor_vectors: (n_A, D) clean user vectors of the anchors.
  scores: (n_A, n_items) clean scores (the target's own clean score is read here, so
    rank comparisons against the sorted rows are exact, not off by rounding); None in
    the top-k layout (``clean_column``, ``count_clean_above`` recompute scores).
  topk_values, topk_indices: (n_A, k+1) clean top-(k+1) scores over all items.
  sorted_scores: (n_A, n_items) clean scores, ascending per user (ranks); None in the
    top-k layout.
  masked_sorted_scores: (n_A, n_items) same with each user's train items at −∞, or None.
  train_mask: (n_A, n_items) bool, True for (anchor, train item) pairs, or None (always
    None in the top-k layout, which has ``train_items``).
  Graph models with a local path (``surface.graph``) only, else None:
  desc_values, desc_indices: (n_A, W) clean top-W scores and their items, W = min(n_items,
    k + the largest number of items one target's features move).
  anchor_row: (n_users,) int32 each user's anchor row, n_A for non-anchors.
  graph_cache: ``graph_local.GraphCache``, the clean activations of every layer.
  scores_t, train_mask_t: dense layout of a graph model only, else None: ``scores`` and
    ``train_mask`` item-major, (n_items, n_A). A graph target's exact ranks read the
    clean entries of every item its features move (hundreds to thousands on TikTok):
    rows of these are contiguous, where columns of ``scores`` are strided and made XLA
    transpose the (n_A, |I_c|) comparisons (docs/results/performance.md).
  Top-k layout only, else None:
  item_vectors: (n_items, D) clean item vectors (ranks recompute rows from them).
  train_items: (n_A, T) int32 each anchor's train items, ascending, padded with n_items
    (T = the largest anchor train degree), or None without ``train_pairs``.
  train_scores: (n_A, T) their clean scores (−∞ at padding), or None.
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
  scores_t: jax.Array | None = None
  train_mask_t: jax.Array | None = None
  item_vectors: jax.Array | None = None
  train_items: jax.Array | None = None
  train_scores: jax.Array | None = None

  @property
  def dense(self) -> bool:
    """True for the dense layout (stored score rows), False for the top-k layout."""
    return self.sorted_scores is not None

  @property
  def masked(self) -> bool:
    """Whether the masked metrics (train items removed) are available."""
    return self.masked_sorted_scores is not None or self.train_items is not None

  @property
  def n_items(self) -> int:
    return int(self.scores.shape[1] if self.dense else self.item_vectors.shape[0])


def check_anchors(anchors: np.ndarray, n_users: int) -> None:
  """Raises ConfigError unless ``anchors`` is a 1-D array of distinct ids in [0, n_users).

  Each anchor is one row of the context; a repeated id would give two rows for one user,
  and the graph local path (one ``anchor_row`` per user) would score the earlier copy
  with its clean vector.
  """
  anchors = np.asarray(anchors)
  if anchors.ndim != 1 or len(anchors) == 0:
    raise errors.ConfigError(f"anchors must be a non-empty 1-D array of user ids, got shape "
                             f"{anchors.shape}")
  if anchors.min() < 0 or anchors.max() >= n_users:
    raise errors.ConfigError(f"anchors must be user ids in [0, {n_users}), got range "
                             f"[{anchors.min()}, {anchors.max()}]")
  ids, counts = np.unique(anchors, return_counts=True)
  repeated = ids[counts > 1]
  if len(repeated):
    raise errors.ConfigError(
        f"anchors must be distinct user ids: {len(repeated)} id(s) repeat "
        f"({int(np.sum(counts[counts > 1]) - len(repeated))} extra copies), e.g. "
        f"{repeated[:10].tolist()}")


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


# Above this many anchor × item scores build_context defaults to the top-k layout
# (2^28 float32 = 1 GiB per stored matrix; TikTok / Baby at 40 % anchors are below).
DENSE_CONTEXT_ELEMENTS = 1 << 28
# Scores per anchor chunk of the top-k context program / item chunk of a rank pass.
CHUNK_ELEMENTS = 1 << 24


@functools.partial(jax.jit, static_argnames=("k", "masked"))
def _context_arrays(anchor_vectors, item_vectors, train_mask, *, k, masked):
  with precision.evaluation_precision():
    scores = anchor_vectors @ item_vectors.T
  values, indices = ops.top_k(scores, k + 1)
  sorted_scores = jnp.sort(scores, axis=1)
  masked_sorted = None
  if masked:
    masked_sorted = jnp.sort(jnp.where(train_mask, -jnp.inf, scores), axis=1)
  return scores, values, indices.astype(jnp.int32), sorted_scores, masked_sorted


def anchor_train_items(anchors: np.ndarray, n_users: int, n_items: int,
                       train_pairs: np.ndarray) -> np.ndarray:
  """(n_A, T) int32 each anchor's distinct train items, ascending, padded with n_items."""
  row_of = np.full(n_users, -1, np.int64)
  row_of[np.asarray(anchors)] = np.arange(len(anchors))
  pairs = np.unique(np.asarray(train_pairs, np.int64), axis=0)
  rows = row_of[pairs[:, 0]]
  keep = rows >= 0
  rows, items = rows[keep], pairs[keep, 1]
  order = np.lexsort((items, rows))
  rows, items = rows[order], items[order]
  counts = np.bincount(rows, minlength=len(anchors))
  width = max(1, int(counts.max(initial=0)))
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  out = np.full((len(anchors), width), n_items, np.int32)
  out[rows, np.arange(len(rows)) - starts[rows]] = items
  return out


def topk_context_arrays(anchor_vectors, item_vectors, train_items, *, k: int, width: int,
                        chunk_elements: int = CHUNK_ELEMENTS):
  """The top-k layout's arrays, anchor chunk by anchor chunk (jit it; no dense rows kept).

  Args:
    anchor_vectors: (n_A, D); item_vectors: (n_items, D).
    train_items: (n_A, T) int32 padded with n_items, or None.
    k: the objective's K (top-(k+1) kept); width: top-W of the local graph path (0: none).
    chunk_elements: anchor rows per chunk × items.

  Returns:
    (top-(k+1) values, indices, top-W values or None, indices or None, train scores or
    None); one chunk's (rows × items) scores is the largest temporary.
  """
  n_a, n_items = anchor_vectors.shape[0], item_vectors.shape[0]
  rows = int(max(1, min(n_a, chunk_elements // max(n_items, 1))))
  n_chunks = -(-n_a // rows)
  pad = n_chunks * rows - n_a
  a = jnp.pad(anchor_vectors, ((0, pad), (0, 0))).reshape(n_chunks, rows, -1)
  keep = max(k + 1, width)
  has_train = train_items is not None
  tr = (jnp.pad(train_items, ((0, pad), (0, 0)), constant_values=n_items)
        .reshape(n_chunks, rows, -1) if has_train else jnp.zeros((n_chunks, 0), jnp.int32))

  def one(args):
    block, items_of = args
    with precision.evaluation_precision():
      scores = block @ item_vectors.T
    values, indices = jax.lax.top_k(scores, keep)
    out = (values, indices.astype(jnp.int32))
    if has_train:
      got = jnp.take_along_axis(scores, jnp.minimum(items_of, n_items - 1), axis=1)
      out += (jnp.where(items_of < n_items, got, -jnp.inf),)
    return out

  res = jax.lax.map(one, (a, tr))
  res = [r.reshape((n_chunks * rows,) + r.shape[2:])[:n_a] for r in res]
  values, indices = res[0], res[1]
  train_scores = res[2] if has_train else None
  desc_v = desc_i = None
  if width:
    desc_v, desc_i = values[:, :width], indices[:, :width]
  return values[:, :k + 1], indices[:, :k + 1], desc_v, desc_i, train_scores


def topk_context_program(*, k: int, width: int, mesh: jax.sharding.Mesh | None = None,
                         chunk_elements: int = CHUNK_ELEMENTS):
  """The jitted top-k context program (anchor_vectors, item_vectors, train_items) -> arrays.

  With a mesh of several devices the anchors are split over all its axes
  (``shard_map``: each device scores its own anchors against the replicated item table,
  chunk by chunk; anchors padded to a multiple of the device count); the outputs stay
  split the same way.
  """
  one = functools.partial(topk_context_arrays, k=k, width=width,
                          chunk_elements=chunk_elements)
  if mesh is None or mesh.size == 1:
    return jax.jit(one)
  P = jax.sharding.PartitionSpec
  split = P(tuple(mesh.axis_names))

  def program(anchor_vectors, item_vectors, train_items):
    n_a, pad = anchor_vectors.shape[0], -anchor_vectors.shape[0] % mesh.size
    a = jnp.pad(anchor_vectors, ((0, pad), (0, 0)))
    n_items = item_vectors.shape[0]
    tr = None if train_items is None else jnp.pad(train_items, ((0, pad), (0, 0)),
                                                  constant_values=n_items)
    n_out = 5
    out_specs = tuple(split for _ in range(n_out))
    body = lambda av, iv, ti: one(av, iv, ti)  # noqa: E731
    res = jax.shard_map(body, mesh=mesh, in_specs=(split, P(), split if tr is not None
                                                   else None),
                        out_specs=out_specs, check_vma=False)(a, item_vectors, tr)
    return tuple(None if r is None else r[:n_a] for r in res)

  return jax.jit(program)


def build_context(surface: AttackSurface, anchors: np.ndarray, *, k: int = 50,
                  train_pairs: np.ndarray | None = None, dense: bool | None = None,
                  mesh: jax.sharding.Mesh | None = None) -> PromotionContext:
  """Clean scores of the anchors, their top-(k+1) and what ranks need (once per model).

  Args:
    surface: the attacked model.
    anchors: (n_A,) distinct anchor user ids.
    k: the objective's K.
    train_pairs: optional (n, 2) (user, item) train interactions; enables the masked
      metrics.
    dense: the layout (module notes); None: dense while anchors × items ≤
      ``DENSE_CONTEXT_ELEMENTS``.
    mesh: top-k layout: the anchor chunks are split over this mesh's devices (all axes)
      and the results gathered; None: one device.
  """
  with precision.evaluation_precision():
    cache = None
    if surface.graph is not None:
      cache = jax.jit(surface.graph.clean_fn)(surface.params, surface.projected_table)
      users, items = cache.users, cache.items
    else:
      users, items = surface.clean_vectors()
  anchors = np.asarray(anchors, np.int32)
  check_anchors(anchors, users.shape[0])
  anchor_vectors = jnp.take(users, jnp.asarray(anchors), axis=0)
  n_items = items.shape[0]
  if k + 1 > n_items:
    raise errors.ConfigError(f"attack k={k} needs at least k+1 items, have {n_items}")
  if dense is None:
    dense = len(anchors) * n_items <= DENSE_CONTEXT_ELEMENTS
  width = 0
  if cache is not None:
    width = min(n_items, k + surface.graph.neighbourhoods.max_changed_items())
  if dense:
    ctx = _dense_context(anchors, anchor_vectors, items, users.shape[0], n_items, k,
                         train_pairs, width)
  else:
    train_items = None
    if train_pairs is not None:
      train_items = jnp.asarray(anchor_train_items(anchors, users.shape[0], n_items,
                                                   train_pairs))
    fn = topk_context_program(k=k, width=width, mesh=mesh)
    values, indices, desc_v, desc_i, train_scores = fn(anchor_vectors, items, train_items)
    ctx = PromotionContext(jnp.asarray(anchors), anchor_vectors, None, values, indices,
                           None, None, None, desc_v, desc_i, item_vectors=items,
                           train_items=train_items, train_scores=train_scores)
  if cache is not None:
    anchor_row = np.full(users.shape[0], len(anchors), np.int32)
    anchor_row[anchors] = np.arange(len(anchors), dtype=np.int32)
    ctx = ctx._replace(anchor_row=jnp.asarray(anchor_row), graph_cache=cache)
    if ctx.dense:
      transpose = jax.jit(jnp.transpose)
      ctx = ctx._replace(scores_t=transpose(ctx.scores), train_mask_t=(
          None if ctx.train_mask is None else transpose(ctx.train_mask)))
  return jax.block_until_ready(ctx)  # so attack timings do not absorb this set-up


def _dense_context(anchors, anchor_vectors, items, n_users, n_items, k, train_pairs, width):
  mask = None
  if train_pairs is not None:
    mask = jnp.asarray(anchor_train_mask(anchors, n_users, n_items, train_pairs))
  scores, values, indices, sorted_scores, masked_sorted = _context_arrays(
      anchor_vectors, items, mask if mask is not None else jnp.zeros((1, 1), bool), k=k,
      masked=mask is not None)
  ctx = PromotionContext(jnp.asarray(anchors), anchor_vectors, scores, values, indices,
                         sorted_scores, masked_sorted, mask)
  if width:
    desc_values, desc_indices = jax.jit(jax.lax.top_k, static_argnums=1)(scores, width)
    ctx = ctx._replace(desc_values=desc_values, desc_indices=desc_indices.astype(jnp.int32))
  return ctx


def count_greater(sorted_rows: jax.Array, values: jax.Array) -> jax.Array:
  """Per row, the number of entries of an ascending row strictly above ``values``."""
  n = sorted_rows.shape[1]
  pos = jax.vmap(functools.partial(jnp.searchsorted, side="right"))(sorted_rows, values)
  return (n - pos).astype(jnp.int32)


# ----------------------------------------------------------------------------------
# Clean-score queries that work on either layout (used inside the attack programs).


def _item_major(ctx: PromotionContext, item_ids: jax.Array, train: bool = False) -> jax.Array:
  """Dense layout: (P, n_A) clean scores (or train-mask entries) of ``item_ids``.

  Rows of the item-major copies where the context has them (graph models), else columns
  of the anchor-major tables."""
  table_t, table = ((ctx.train_mask_t, ctx.train_mask) if train
                    else (ctx.scores_t, ctx.scores))
  if table_t is not None:
    return jnp.take(table_t, item_ids, axis=0)
  return jnp.take(table, item_ids, axis=1).T


def clean_column(ctx: PromotionContext, target: jax.Array) -> jax.Array:
  """(n_A,) clean scores of item ``target`` for every anchor."""
  if ctx.dense:
    return _item_major(ctx, jnp.reshape(target, (1,)))[0]
  with precision.evaluation_precision():
    return ctx.anchor_vectors @ ctx.item_vectors[target]


def _count_rows_above(ctx: PromotionContext, values: jax.Array,
                      exclude: jax.Array) -> jax.Array:
  """Per anchor, items ∉ ``exclude`` with clean score > values; rows by item chunks."""
  items = ctx.item_vectors
  n_items, n_a = items.shape[0], ctx.anchor_vectors.shape[0]
  chunk = int(max(1, min(n_items, CHUNK_ELEMENTS // max(n_a, 1))))
  n_chunks = -(-n_items // chunk)
  local = jnp.arange(chunk)

  def body(c, total):
    first = c * chunk
    start = jnp.minimum(first, n_items - chunk)  # the last chunk overlaps: mask repeats
    block = jax.lax.dynamic_slice_in_dim(items, start, chunk)
    with precision.evaluation_precision():
      scores = ctx.anchor_vectors @ block.T
    ids = start + local
    keep = (ids >= first) & ~jnp.any(ids[:, None] == exclude[None, :], axis=1)
    return total + jnp.sum((scores > values[:, None]) & keep[None, :], axis=1,
                           dtype=jnp.int32)

  return jax.lax.fori_loop(0, n_chunks, body, jnp.zeros(n_a, jnp.int32))


def count_clean_above(ctx: PromotionContext, values: jax.Array, exclude: jax.Array, *,
                      masked: bool = False) -> jax.Array:
  """Per anchor, the items outside ``exclude`` whose clean score is strictly above ``values``.

  Args:
    ctx: either layout.
    values: (n_A,) scores to compare with.
    exclude: (P,) distinct item ids left out (ids ≥ n_items: padding, ignored); the
      target (and, on the graph path, every item whose vector moved) is counted by the
      caller from its new score.
    masked: count only each anchor's non-train items (train items are −∞).

  Returns:
    (n_A,) int32. The dense layout counts its sorted row and subtracts the excluded
    items' stored entries; the top-k layout recomputes the rows and skips them, so the
    two agree exactly whenever the recomputed rows equal the stored ones.
  """
  exclude = jnp.asarray(exclude, jnp.int32).reshape(-1)
  if ctx.dense:
    valid = exclude < ctx.n_items
    cols = _item_major(ctx, exclude)  # (P, n_A)
    rows = ctx.sorted_scores
    if masked:
      cols = jnp.where(_item_major(ctx, exclude, train=True), -jnp.inf, cols)
      rows = ctx.masked_sorted_scores
    return (count_greater(rows, values)
            - jnp.sum(valid[:, None] & (cols > values[None, :]), axis=0, dtype=jnp.int32))
  count = _count_rows_above(ctx, values, exclude)
  if masked:
    kept = ~jnp.any(ctx.train_items[:, :, None] == exclude[None, None, :], axis=2)
    count = count - jnp.sum(kept & (ctx.train_scores > values[:, None]), axis=1,
                            dtype=jnp.int32)
  return count


def train_seen(ctx: PromotionContext, item_ids: jax.Array) -> jax.Array:
  """(n_A, P) bool: is item ``item_ids[p]`` a train item of the anchor (masked metrics)."""
  if ctx.dense:
    return _item_major(ctx, item_ids, train=True).T
  return jnp.any(ctx.train_items[:, :, None] == item_ids[None, None, :], axis=1)


def train_rows(ctx: PromotionContext, rows: jax.Array) -> jax.Array:
  """(P, n_items) bool: the train-item rows of anchor rows ``rows`` (P,)."""
  if ctx.dense:
    return jnp.take(ctx.train_mask, rows, axis=0)
  ids = jnp.take(ctx.train_items, rows, axis=0)
  n_items = ctx.item_vectors.shape[0]
  return jnp.zeros((rows.shape[0], n_items), bool).at[
      jnp.arange(rows.shape[0])[:, None], ids].set(True, mode="drop")
