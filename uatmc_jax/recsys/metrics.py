"""Full-ranking evaluation (METHODS.md A.3) and the most-popular baseline.

Protocol: score every item for every evaluated user; mask the user's train items (and
valid items when testing) to −inf; take the top max(K) with ``jax.lax.top_k`` (no full
sort); average per-user metrics over users with at least one held-out item.

Per-user metrics at cut-off K, with rel_k ∈ {0,1} the relevance of the k-th ranked item,
hits@K = Σ_{k≤K} rel_k and T = |test(u)| (the user's held-out items):

* Recall@K    = hits@K / T
* Precision@K = hits@K / K
* HR@K        = 1[hits@K > 0]
* NDCG@K      = DCG@K / IDCG@K, DCG@K = Σ_{k≤K} rel_k / log2(k+1),
                IDCG@K = Σ_{k≤min(T,K)} 1 / log2(k+1)          (binary gains)
* MAP@K       = AP@K averaged over users, AP@K = Σ_{k≤K} P@k · rel_k / min(T, K),
                P@k = hits@k / k.

Scores are computed at float32 "highest" matmul precision on every backend
(``uatmc_jax.core.parallel.precision.EVAL_MATMUL_PRECISION``).

Batches of users are scored by one jitted function that takes the users' rows of the
user table, the item table, each user's excluded items and held-out items as padded id
lists (pad = n_items, dropped by the scatter), so all arrays are row-local and the
batch can be sharded over the mesh's data axis.
"""
from __future__ import annotations

import functools
from typing import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from uatmc_jax.core.parallel import mesh as mesh_lib
from uatmc_jax.core.parallel import multihost
from uatmc_jax.recsys.data.interactions import InteractionData

METRICS = ("recall", "ndcg", "precision", "map", "hr")
DEFAULT_KS = (5, 10, 20, 50)


def metrics_from_hits(hits: jax.Array, n_relevant: jax.Array,
                      ks: Sequence[int]) -> dict[str, jax.Array]:
  """Per-user metrics from the relevance of the ranked list.

  Args:
    hits: (B, L) float 0/1, relevance of the top-L items in rank order (L >= max(ks);
      positions past the catalogue are 0).
    n_relevant: (B,) number of held-out items T of each user (> 0 for real users).
    ks: cut-offs.

  Returns:
    {"recall@K", "ndcg@K", "precision@K", "map@K", "hr@K": (B,)} for every K.
  """
  b, length = hits.shape
  chex.assert_shape(n_relevant, (b,))
  hits = hits.astype(jnp.float32)
  t = jnp.maximum(n_relevant.astype(jnp.float32), 1.0)
  ranks = jnp.arange(1, length + 1, dtype=jnp.float32)
  discounts = 1.0 / jnp.log2(ranks + 1.0)
  cum_hits = jnp.cumsum(hits, axis=1)
  cum_dcg = jnp.cumsum(hits * discounts, axis=1)
  ideal = jnp.cumsum(discounts)
  cum_ap = jnp.cumsum(hits * cum_hits / ranks, axis=1)
  out = {}
  for k in ks:
    h = cum_hits[:, k - 1]
    ideal_len = jnp.minimum(n_relevant, k).astype(jnp.int32)
    idcg = ideal[jnp.maximum(ideal_len, 1) - 1]
    out[f"recall@{k}"] = h / t
    out[f"ndcg@{k}"] = cum_dcg[:, k - 1] / idcg
    out[f"precision@{k}"] = h / k
    out[f"map@{k}"] = cum_ap[:, k - 1] / jnp.maximum(ideal_len, 1)
    out[f"hr@{k}"] = (h > 0).astype(jnp.float32)
  return out


def batch_metric_sums(user_rows: jax.Array, item_vecs: jax.Array, excluded: jax.Array,
                      relevant: jax.Array, weight: jax.Array,
                      ks: Sequence[int]) -> dict[str, jax.Array]:
  """Weighted sums over a user batch of every metric (jit with ``ks`` static).

  Args:
    user_rows: (B, D) user vectors.
    item_vecs: (n_items, D) item vectors.
    excluded: int (B, Le) item ids masked to −inf (padding = n_items).
    relevant: int (B, Lr) held-out item ids (padding = n_items).
    weight: (B,) 1 for real users, 0 for padding rows.
    ks: cut-offs.
  """
  n_items = item_vecs.shape[0]
  b = user_rows.shape[0]
  # Full float32 scores whatever the caller's matmul precision (A.3 ranks ~10^4 items:
  # a TF32 / bf16 pass reorders near-ties at the top-K cut).
  scores = jnp.matmul(user_rows, item_vecs.T, precision=jax.lax.Precision.HIGHEST)
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], excluded.shape)
  scores = scores.at[rows, excluded].set(-jnp.inf, mode="drop")
  top = min(max(ks), n_items)
  _, idx = jax.lax.top_k(scores, top)
  valid = relevant < n_items
  hits = jnp.any((idx[:, :, None] == relevant[:, None, :]) & valid[:, None, :], axis=-1)
  if top < max(ks):
    hits = jnp.pad(hits, ((0, 0), (0, max(ks) - top)))
  n_rel = jnp.sum(valid, axis=1)
  per_user = metrics_from_hits(hits, n_rel, ks)
  return {k: jnp.sum(v * weight) for k, v in per_user.items()}


@functools.partial(jax.jit, static_argnums=4, donate_argnums=0)
def _add_user_batch_sums(totals, user_vecs, item_vecs, batch, ks):
  """``totals`` plus one batch's metric sums.

  The running totals are an input, so batch i+1's program waits for batch i's: the
  evaluation is one dependency chain. Independent multi-device programs left in flight
  together on the CPU backend deadlocked in their collectives (a 2-process evaluation
  hung after ~50 back-to-back evaluations on a loaded 2-core host; docs/scale.md).
  """
  rows = jnp.take(user_vecs, batch["users"], axis=0)
  sums = batch_metric_sums(rows, item_vecs, batch["excluded"], batch["relevant"],
                           batch["weight"], ks)
  return {k: totals[k] + v for k, v in sums.items()}


def zero_totals(ks: Sequence[int]) -> dict[str, np.ndarray]:
  """Float32 zero of every metric@K: the start of ``_add_user_batch_sums``' chain."""
  return {f"{m}@{k}": np.zeros((), np.float32) for m in METRICS for k in ks}


def padded_item_lists(pairs: np.ndarray, users: np.ndarray, n_items: int) -> np.ndarray:
  """int32 (len(users), L): each user's items from ``pairs``, padded with ``n_items``.

  Vectorised (argsort + ranks within user), L = the largest list (at least 1).
  """
  pairs = np.asarray(pairs, np.int64)
  lookup = np.full(max(int(users.max(initial=0)), int(pairs[:, 0].max(initial=0))) + 1, -1,
                   np.int64)
  lookup[users] = np.arange(users.size)
  rows = lookup[pairs[:, 0]]
  keep = rows >= 0
  rows, items = rows[keep], pairs[keep, 1]
  order = np.argsort(rows, kind="stable")
  rows, items = rows[order], items[order]
  counts = np.bincount(rows, minlength=users.size)
  width = max(int(counts.max(initial=0)), 1)
  starts = np.cumsum(counts) - counts
  col = np.arange(rows.size) - starts[rows]
  out = np.full((users.size, width), n_items, np.int32)
  out[rows, col] = items
  return out


def _next_pow2(n: np.ndarray) -> np.ndarray:
  """Smallest power of two >= n (>= 1), elementwise."""
  n = np.maximum(np.asarray(n, np.int64), 1)
  return (1 << np.ceil(np.log2(n)).astype(np.int64)).astype(np.int64)


def _list_counts(pairs: np.ndarray, users: np.ndarray) -> np.ndarray:
  """Number of ``pairs`` of each of ``users`` (vectorised)."""
  pairs = np.asarray(pairs, np.int64)
  size = max(int(users.max(initial=0)), int(pairs[:, 0].max(initial=0))) + 1
  return np.bincount(pairs[:, 0], minlength=size)[users]


class RankingEvaluator:
  """Full-ranking metrics of one split for any (user table, item table).

  Users are grouped by the next power of two of their excluded-item list length and
  each group is cut into batches padded to that width (not the split's longest list:
  on TikTok the longest is ~94x the mean); wide groups take fewer users per batch
  (about ``cells_per_batch`` id cells, default batch_size x 64), held-out lists are
  padded to the batch's own power of two. A split compiles one program per distinct
  batch shape (``n_programs``, about log2 of the longest list), once per evaluator; the
  id cells held per real cell are ``padding_ratio``. ``bucket=False`` pads every batch
  to the split's longest lists (one program). Batches stay on the host and are placed
  one at a time, so device memory holds one batch, not the split.

  Args:
    data: the dataset.
    split: "valid" (train items excluded) or "test" (train and valid excluded).
    ks: cut-offs.
    batch_size: users per jitted call (rounded up to a multiple of the mesh data axis).
    mesh: optional mesh; user batches are sharded over its data axis.
    bucket: per-batch power-of-two widths (default) or one width for the split.
  """

  def __init__(self, data: InteractionData, split: str, ks: Sequence[int] = DEFAULT_KS,
               batch_size: int = 1024, mesh: jax.sharding.Mesh | None = None,
               bucket: bool = True, cells_per_batch: int | None = None):
    if split not in ("valid", "test"):
      raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    self.split, self.ks, self.mesh = split, tuple(int(k) for k in ks), mesh
    self.n_items = data.n_items
    held_out = data.valid if split == "valid" else data.test
    exclude = data.train if split == "valid" else np.concatenate([data.train, data.valid])
    self.users = np.unique(held_out[:, 0]).astype(np.int32)
    multiple = mesh_lib.data_axis_size(mesh) if mesh is not None else 1
    batch_size = min(batch_size, self.users.size)
    self.batch_size = -(-batch_size // multiple) * multiple
    cells_per_batch = cells_per_batch or self.batch_size * 64
    n_excl = _list_counts(exclude, self.users)
    n_rel = _list_counts(held_out, self.users)
    excluded = padded_item_lists(exclude, self.users, data.n_items)
    relevant = padded_item_lists(held_out, self.users, data.n_items)
    full_e, full_r = excluded.shape[1], relevant.shape[1]
    if bucket:
      # width bucket of each user: next power of two of its excluded list (capped)
      width = np.minimum(_next_pow2(n_excl), full_e)
      order = np.lexsort((np.arange(width.size), -width))  # widest first, stable
    else:
      width = np.full(self.users.size, full_e)
      order = np.arange(self.users.size)
    self._batches = []
    padded_cells = 0
    # one pass over the (few) width buckets and their batches, never over users
    bounds = np.flatnonzero(np.diff(width[order])) + 1
    for group in np.split(order, bounds):
      we = int(width[group[0]])
      rows = self.batch_size
      if bucket:  # wide buckets take fewer rows per batch: ~batch_size x 64 id cells
        rows = min(rows, max(cells_per_batch // we, 1))
        n_chunks = -(-group.size // rows)  # equal chunks: little row padding per group
        rows = -(-group.size // n_chunks)
        rows = -(-rows // multiple) * multiple
      for start in range(0, group.size, rows):
        idx = group[start:start + rows]
        pad = rows - idx.size  # padding rows score user 0 with weight 0
        wr = int(min(_next_pow2(n_rel[idx].max(initial=1)), full_r)) if bucket else full_r
        take = lambda a, w: np.pad(a[idx, :w], ((0, pad), (0, 0)),
                                   constant_values=data.n_items)
        self._batches.append({
            "users": np.pad(self.users[idx], (0, pad)),
            "excluded": take(excluded, we), "relevant": take(relevant, wr),
            "weight": np.pad(np.ones(idx.size, np.float32), (0, pad))})
        padded_cells += rows * (we + wr)
    real_cells = max(int(n_excl.sum() + n_rel.sum()), 1)
    # id-list cells held (and scattered / compared) per real cell
    self.padding_ratio = padded_cells / real_cells
    self.n_programs = len({(b["excluded"].shape, b["relevant"].shape) for b in self._batches})
    self._sharding = mesh_lib.data_sharding(mesh) if mesh is not None else None

  def _device_batch(self, batch):
    if self._sharding is not None:
      # every process holds all users; each feeds its own block of every batch
      return multihost.put_global(batch, self._sharding)
    return jax.tree.map(jnp.asarray, batch)

  @property
  def n_users(self) -> int:
    return int(self.users.size)

  def evaluate(self, user_vecs: jax.Array, item_vecs: jax.Array) -> dict[str, float]:
    """Mean of every metric@K over the split's users (floats, keys like "recall@20")."""
    chex.assert_rank([user_vecs, item_vecs], 2)
    chex.assert_axis_dimension(item_vecs, 0, self.n_items)
    if self.mesh is not None:
      # A user table already placed on this mesh (e.g. split over the `model` axis) stays
      # as it is: the jitted gather takes each batch's rows, no device holds it whole.
      on_mesh = (isinstance(user_vecs, jax.Array)
                 and getattr(user_vecs.sharding, "mesh", None) == self.mesh)
      if not on_mesh:
        user_vecs = mesh_lib.replicate(user_vecs, self.mesh)
      item_vecs = mesh_lib.replicate(item_vecs, self.mesh)
    order = [f"{m}@{k}" for m in METRICS for k in self.ks]
    totals = zero_totals(self.ks)
    totals = (mesh_lib.replicate(totals, self.mesh) if self.mesh is not None
              else jax.tree.map(jnp.asarray, totals))
    for batch in self._batches:
      totals = _add_user_batch_sums(totals, user_vecs, item_vecs, self._device_batch(batch),
                                    self.ks)
    totals = jax.device_get(totals)
    return {name: float(totals[name]) / self.n_users for name in order}


def popularity_tables(data: InteractionData) -> tuple[jax.Array, jax.Array]:
  """User/item tables whose dot product ranks items by train popularity for everyone."""
  pop = data.item_popularity().astype(np.float32)
  return jnp.ones((data.n_users, 1), jnp.float32), jnp.asarray(pop[:, None])


def most_popular_metrics(data: InteractionData, split: str = "test",
                         ks: Sequence[int] = DEFAULT_KS,
                         mesh: jax.sharding.Mesh | None = None) -> dict[str, float]:
  """Metrics of the most-popular baseline (train interaction counts), same protocol."""
  evaluator = RankingEvaluator(data, split, ks, mesh=mesh)
  return evaluator.evaluate(*popularity_tables(data))
