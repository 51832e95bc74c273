"""Exact local recomputation of a graph recommender (MMGCN) when one item's features move.

In an L-layer message-passing model over the user–item graph, layer l's output at a node
depends on the node's and its neighbours' layer-(l−1) values. So when only item t's
input row changes (x_0 at node t), layer l's output changes only on S_l, the nodes within
l hops of t, and the final user/item vectors change only on S_L. With the clean model's
activations of every layer cached once per model (``clean_activations``), the perturbed
vectors are recomputed on S_L alone (``local_vectors``), layer by layer:

  agg_l(v)  = agg_l^clean(v) + Σ_{(v←u), u∈S_{l−1}} w_vu · conv(x_{l−1}(u) − x_{l−1}^clean(u))
  x_l(v)    = layer output(agg_l(v), x_{l−1}(v))      for v ∈ S_l, clean elsewhere,

exact because the aggregation Σ_u w_vu conv(x_{l−1}(u)) is linear in x_{l−1} (``conv`` has no
bias) and only the neighbours u ∈ S_{l−1} changed. The edges needed at layer l are the
out-edges of S_{l−1} (their heads lie in S_l); listed by the level of their source they
form a prefix per layer. The layer output reuses the model's own sublayers (``conv``,
``self_linear``, ``combine`` of ``MMGCNLayer``), its preference vectors and ID table, so the
math stays the model's; a test checks the cache against ``model.encode`` and the local
vectors against a full re-encode.

Fixed shapes. Every target's neighbourhood is padded to the shape of its size bucket
(``GraphNeighbourhoods``): items are bucketed by their node count |S_L| in powers of
``growth`` and every dimension (nodes, changed items, changed users, edges per layer) is
padded to its maximum over all of the graph's items in that bucket, so a bucket's shape
depends on the graph only (one compile per bucket, reused across seeds and models of the
same graph). Padding nodes carry level L+1 (never changed), padding edges weight 0.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from uatmc_jax.core import errors
from uatmc_jax.recsys.models import base as base


class BucketShape(NamedTuple):
  """Static padded sizes of one neighbourhood bucket (hashable: keys compiled code).

  nodes: |S_L| slots; items / users: slots of changed item / user nodes;
  edges: per layer l = 1..L, the out-edges of S_{l−1} (cumulative, so edges[-1] = all);
  levels: per layer l = 1..L, the slots of S_l (nodes are listed by hop level, so S_l is
    a prefix; levels[-1] = nodes): layer l is recomputed on that prefix only.
  """
  nodes: int
  items: int
  users: int
  edges: tuple[int, ...]
  levels: tuple[int, ...]


class Neighbourhood(NamedTuple):
  """One target's padded L-hop neighbourhood (a leading chunk axis when batched).

  nodes: (P,) int32 global node ids (users 0..U−1, items U..U+I−1), by hop level; slot 0
    is the target's node.
  level: (P,) int32 hop distance from the target; L+1 on padding.
  edge_dst, edge_src: (E,) int32 local slots of each edge's head / tail, sorted by the
    tail's level (layer l uses the first edges[l−1]); edge_weight: (E,) float32, 0 on padding.
  item_slots, user_slots: (P_i,), (P_u,) int32 local slots of the item / user nodes (item
    slot 0 = the target); item_valid, user_valid: bool masks of the real ones.
  """
  nodes: np.ndarray
  level: np.ndarray
  edge_dst: np.ndarray
  edge_src: np.ndarray
  edge_weight: np.ndarray
  item_slots: np.ndarray
  item_valid: np.ndarray
  user_slots: np.ndarray
  user_valid: np.ndarray


def _csr_positions(indptr: np.ndarray, rows: np.ndarray) -> np.ndarray:
  """Positions of all entries of ``rows`` in a CSR layout, row by row (vectorised)."""
  starts, counts = indptr[rows], indptr[rows + 1] - indptr[rows]
  total = int(counts.sum())
  offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
  return offsets + np.arange(total)


def _next_bucket(sizes: np.ndarray, growth: int) -> np.ndarray:
  """Bucket index ceil(log_growth(size)) (size 1 -> 0)."""
  return np.ceil(np.log(np.maximum(sizes, 1)) / np.log(growth) - 1e-9).astype(np.int64)


@dataclasses.dataclass(eq=False)
class GraphNeighbourhoods:
  """The L-hop neighbourhoods of a graph's items, bucketed by size (host-side, numpy).

  Args:
    dst, src: (E,) int edge heads / tails over nodes 0..n_users+n_items−1 (users first).
    weight: (E,) edge weights.
    n_users, n_items: node counts.
    num_layers: L.
    growth: bucket growth factor of the changed-item count (4).
    user_growth: bucket growth factor of the changed-user count (4). Items are bucketed
      by the pair (items, users): the users' full score rows cost |U_c| x n_items per
      step, and on TikTok a bucket keyed by node count alone padded a median of 11
      changed users to 315. Finer buckets pad less but compile more (one compile per
      bucket and attacker, 6–9 s each for MMGCN PGD-10 on TikTok, docs/results/performance.md).
    cache_bytes: padded neighbourhoods are kept (least recently used first out) up to
      this many bytes: every attacker of a model sets up the same targets
      (docs/results/performance.md).
  """
  dst: np.ndarray
  src: np.ndarray
  weight: np.ndarray
  n_users: int
  n_items: int
  num_layers: int
  growth: int = 4
  user_growth: int = 4
  cache_bytes: int = 256 << 20

  def __post_init__(self):
    if self.growth < 2 or self.user_growth < 2:
      raise errors.ConfigError(f"neighbourhood bucket growth must be >= 2, got "
                               f"{self.growth} (items) / {self.user_growth} (users)")
    n = self.n_users + self.n_items
    order = np.argsort(self.src, kind="stable")  # out-edges of a node, contiguous
    self._out_dst = np.asarray(self.dst)[order].astype(np.int64)
    self._out_w = np.asarray(self.weight)[order].astype(np.float32)
    self._out_ptr = np.concatenate([[0], np.cumsum(np.bincount(self.src, minlength=n))])
    self._cache: collections.OrderedDict = collections.OrderedDict()
    self._cached_bytes = 0
    self._sizes_and_buckets()

  def _sizes_and_buckets(self):
    """Every item's padded dimensions, by sparse reachability (no loop over items)."""
    n, u, L = self.n_users + self.n_items, self.n_users, self.num_layers
    adj = sp.csr_matrix((np.ones(len(self.src), np.float32), (self.src, self.dst)),
                        shape=(n, n))
    adj.data[:] = 1.0
    out_deg = np.diff(self._out_ptr).astype(np.int64)
    reach = sp.csr_matrix((np.ones(self.n_items, np.float32),
                           (np.arange(self.n_items), u + np.arange(self.n_items))), shape=(self.n_items, n))
    edges, levels = [], []
    for _ in range(L):  # layers, not items
      edges.append(np.asarray(reach @ out_deg).ravel().astype(np.int64))
      reach = reach + reach @ adj
      reach.data[:] = 1.0
      reach = reach.tocsr()
      levels.append(np.diff(reach.indptr).astype(np.int64))  # |S_l|, l = 1..L
    nodes = np.diff(reach.indptr)
    is_item_col = (reach.indices >= u).astype(np.int64)
    items = np.add.reduceat(is_item_col, reach.indptr[:-1]) if reach.nnz else np.zeros(
        self.n_items, np.int64)
    items = np.where(nodes > 0, items, 0)
    users = nodes - items
    self.item_nodes, self.item_items, self.item_users = nodes, items, users
    self.item_edges = np.stack(edges, 1)  # (n_items, L), cumulative per layer
    self.item_levels = np.stack(levels, 1)  # (n_items, L): |S_1| .. |S_L|
    # One bucket per (items, users) size class; the key packs both bucket indices.
    self.bucket_of_item = (_next_bucket(items, self.growth) * 64
                           + _next_bucket(users, self.user_growth))
    self.shapes: dict[int, BucketShape] = {}
    for b in np.unique(self.bucket_of_item):
      sel = self.bucket_of_item == b
      self.shapes[int(b)] = BucketShape(
          int(nodes[sel].max()), int(items[sel].max()), max(1, int(users[sel].max())),
          tuple(max(1, int(e)) for e in self.item_edges[sel].max(0)),
          tuple(max(1, int(v)) for v in self.item_levels[sel].max(0)))

  def max_changed_items(self) -> int:
    """The largest padded number of changed items over all buckets."""
    return max(s.items for s in self.shapes.values())

  def neighbourhood(self, item: int, shape: BucketShape) -> Neighbourhood:
    """The padded neighbourhood of one item (numpy, read-only; the set-up of one target)."""
    key = (int(item), shape)
    if key in self._cache:
      self._cache.move_to_end(key)
      return self._cache[key]
    nb = self._neighbourhood(int(item), shape)
    size = sum(a.nbytes for a in nb)
    if size <= self.cache_bytes:
      for a in nb:
        a.flags.writeable = False
      self._cache[key] = nb
      self._cached_bytes += size
      while self._cached_bytes > self.cache_bytes:
        _, old = self._cache.popitem(last=False)
        self._cached_bytes -= sum(a.nbytes for a in old)
    return nb

  def _neighbourhood(self, item: int, shape: BucketShape) -> Neighbourhood:
    n, L = self.n_users + self.n_items, self.num_layers
    t = self.n_users + int(item)
    level = np.full(n, L + 1, np.int64)
    level[t] = 0
    by_level = [np.array([t], np.int64)]
    heads, tails, weights = [], [], []
    for lv in range(1, L + 1):  # hops: L is the model's depth (2)
      pos = _csr_positions(self._out_ptr, by_level[-1])
      heads.append(self._out_dst[pos])
      tails.append(np.repeat(by_level[-1], np.diff(self._out_ptr)[by_level[-1]]))
      weights.append(self._out_w[pos])
      reached = np.unique(heads[-1])
      new = reached[level[reached] > lv]
      level[new] = lv
      by_level.append(new)
    nodes = np.concatenate(by_level)
    local = np.full(n, -1, np.int64)
    local[nodes] = np.arange(len(nodes))
    dst, src = local[np.concatenate(heads)], local[np.concatenate(tails)]
    w = np.concatenate(weights)
    is_item = nodes >= self.n_users
    item_slots, user_slots = np.flatnonzero(is_item), np.flatnonzero(~is_item)
    if (len(nodes) > shape.nodes or len(item_slots) > shape.items
        or len(user_slots) > shape.users or len(dst) > shape.edges[-1]):
      raise errors.ConfigError(f"item {item}'s neighbourhood exceeds its bucket shape {shape}")

    def pad(a, size, fill):
      return np.concatenate([a, np.full(size - len(a), fill, a.dtype)])

    return Neighbourhood(
        pad(nodes, shape.nodes, 0).astype(np.int32),
        pad(level[nodes], shape.nodes, L + 1).astype(np.int32),
        pad(dst, shape.edges[-1], 0).astype(np.int32),
        pad(src, shape.edges[-1], 0).astype(np.int32),
        pad(w, shape.edges[-1], 0.0).astype(np.float32),
        pad(item_slots, shape.items, 0).astype(np.int32),
        np.arange(shape.items) < len(item_slots),
        pad(user_slots, shape.users, 0).astype(np.int32),
        np.arange(shape.users) < len(user_slots))

  def batch(self, items, shape: BucketShape) -> Neighbourhood:
    """Stacked padded neighbourhoods of ``items`` (all in buckets that fit ``shape``)."""
    per = [self.neighbourhood(int(i), shape) for i in items]  # set-up, once per target
    return Neighbourhood(*(np.stack(f) for f in zip(*per)))


def merged_shape(shapes) -> BucketShape:
  """The elementwise maximum of bucket shapes: every member's neighbourhood fits it."""
  shapes = list(shapes)
  return BucketShape(max(s.nodes for s in shapes), max(s.items for s in shapes),
                     max(s.users for s in shapes),
                     tuple(map(max, zip(*(s.edges for s in shapes)))),
                     tuple(map(max, zip(*(s.levels for s in shapes)))))


def plan_buckets(shapes, counts, cost_fn, compile_cost: float) -> list[list[int]]:
  """Groups of the buckets a run hits, each group run as one program (``merged_shape``).

  Every program costs a compilation (``compile_cost`` seconds); running a target at a
  larger shape costs more (``cost_fn(shape)``: seconds per target). Starting from one
  group per bucket, ordered by cost, the two neighbouring groups whose merge saves the
  most (one compilation less, minus the extra run time of their targets at the merged
  shape) are merged while that saving is positive. A 100-target TikTok run hits about
  13 buckets, five of them with a handful of targets of a few items each: one program
  serves them all (docs/results/performance.md). ``compile_cost`` 0: no merging.

  Args:
    shapes: the hit buckets' ``BucketShape`` s.
    counts: targets per bucket.
    cost_fn: BucketShape -> estimated seconds per target.
    compile_cost: estimated seconds to compile one program.

  Returns:
    Lists of indices into ``shapes``, the groups in increasing cost.
  """
  order = sorted(range(len(shapes)), key=lambda i: cost_fn(shapes[i]))
  groups = [[i] for i in order]

  def run_cost(group):
    return sum(counts[i] for i in group) * cost_fn(merged_shape(shapes[i] for i in group))

  while len(groups) > 1:
    savings = [compile_cost - (run_cost(a + b) - run_cost(a) - run_cost(b))
               for a, b in zip(groups[:-1], groups[1:])]
    best = int(np.argmax(savings))
    if savings[best] <= 0:
      break
    groups[best:best + 2] = [groups[best] + groups[best + 1]]
  return groups


# ----------------------------------------------------------------------------------
# The model side: MMGCN's layers applied to the full graph (clean cache) or to S_L.


class GraphCache(NamedTuple):
  """Clean activations of every layer of every branch (once per model).

  x: {m: (L+1, N, D)} layer inputs/outputs x_0..x_L; agg: {m: (L, N, D)} the
  pre-activation aggregates Σ_u w_vu conv(x_{l−1}(u)); users (U, D'), items (I, D'): the
  final vectors (D' = D·(1+|M|)).
  """
  x: dict
  agg: dict
  users: jax.Array
  items: jax.Array


def _aggregate(layer, x, dst, src, weight, n_rows):
  """Σ_{(v←u)} w_vu conv(x_u) per head v: MMGCN's aggregation before its activation."""
  messages = jnp.take(layer.conv(x), src, axis=0) * weight[:, None]
  return jax.ops.segment_sum(messages, dst, num_segments=n_rows)


def _layer_output(layer, agg, x, id_embedding):
  """MMGCN layer output from its aggregate: LeakyReLU(combine([LeakyReLU(agg); x_self]))."""
  h = jax.nn.leaky_relu(agg)
  x_self = jax.nn.leaky_relu(layer.self_linear(x)) + id_embedding
  return jax.nn.leaky_relu(layer.combine(jnp.concatenate([h, x_self], axis=-1)))


def _edges(model):
  return model.edge_dst[...], model.edge_src[...], model.edge_weight[...]


def neighbourhoods_of(model, growth: int = 4, user_growth: int = 4) -> GraphNeighbourhoods:
  """The bucketed item neighbourhoods of an MMGCN's train graph."""
  dst, src, w = (np.asarray(a) for a in _edges(model))
  layers = len(model.branches[model.modalities[0]])
  return GraphNeighbourhoods(dst, src, w, model.n_users, model.n_items, layers, growth,
                             user_growth)


def clean_activations(model, projected_all: base.Features) -> GraphCache:
  """Every layer's clean activations of an MMGCN (the same maths as ``model.encode``)."""
  base.check_features(projected_all, model.modalities, model.n_items)
  ids = model.id_table()
  n = model.n_users + model.n_items
  dst, src, w = _edges(model)
  xs, aggs, finals = {}, {}, [ids]
  for m in model.modalities:
    x = base.l2_normalize(jnp.concatenate([model.preference_table(m), projected_all[m]], 0))
    x_m, agg_m = [x], []
    for layer in model.branches[m]:
      agg_m.append(_aggregate(layer, x, dst, src, w, n))
      x = _layer_output(layer, agg_m[-1], x, ids)
      x_m.append(x)
    xs[m], aggs[m] = jnp.stack(x_m), jnp.stack(agg_m)
    finals.append(x)
  nodes = jnp.concatenate(finals, axis=-1)
  return GraphCache(xs, aggs, nodes[:model.n_users], nodes[model.n_users:])


def local_vectors(model, cache: GraphCache, projected_row: base.Features, nb: Neighbourhood,
                  shape: BucketShape) -> tuple[jax.Array, jax.Array]:
  """Vectors of the changed items and users when the target's projected row is replaced.

  Args:
    model: the MMGCN (its parameters).
    cache: its ``clean_activations``.
    projected_row: {m: (p_m,)} the target's (perturbed) projected features.
    nb: the target's padded ``Neighbourhood`` (no chunk axis).
    shape: its bucket's static ``BucketShape``: layer l is recomputed on the first
      ``levels[l−1]`` slots only (S_l is a prefix), from the messages of the first
      ``levels[l−2]`` (S_{l−1}; slot 0 alone for l = 1) along the first ``edges[l−1]`` edges.

  Returns:
    (item vectors (P_i, D'), user vectors (P_u, D')) at ``nb.item_slots`` / ``nb.user_slots``
    (padding slots hold the vectors of whichever node they point at).
  """
  ids = jnp.take(model.id_embedding[...], nb.nodes, axis=0)
  p = nb.nodes.shape[0]
  level = nb.level[:, None]
  # Per layer (shared by the modalities): (n_in, n_out, dst, src, weight). Padded to a
  # larger bucket, the first edges[l−1] edges also hold this target's deeper edges
  # (sources outside the recomputed prefix): their messages are zero (the source's diff
  # is), so they are dropped rather than gathered out of range.
  layers = []
  for l, e in enumerate(shape.edges, start=1):
    n_in, n_out = (1 if l == 1 else shape.levels[l - 2]), shape.levels[l - 1]
    dst, src = nb.edge_dst[:e], nb.edge_src[:e]
    inside = (src < n_in) & (dst < n_out)
    layers.append((n_in, n_out, jnp.where(inside, dst, 0), jnp.where(inside, src, 0),
                   jnp.where(inside, nb.edge_weight[:e], 0.0)))
  finals = [ids]
  for m in model.modalities:
    clean = jnp.take(cache.x[m], nb.nodes, axis=1)  # (L+1, P, D)
    agg_clean = jnp.take(cache.agg[m], nb.nodes, axis=1)
    x0_t = base.l2_normalize(projected_row[m][None])[0]
    x = clean[0].at[0].set(x0_t)
    for l, (layer, (n_in, n_out, dst, src, w)) in enumerate(
        zip(model.branches[m], layers), start=1):
      diff = jnp.where(level[:n_in] <= l - 1, x[:n_in] - clean[l - 1][:n_in], 0.0)
      agg = agg_clean[l - 1][:n_out] + _aggregate(layer, diff, dst, src, w, n_out)
      out = _layer_output(layer, agg, x[:n_out], ids[:n_out])
      head = jnp.where(level[:n_out] <= l, out, clean[l][:n_out])
      x = jnp.concatenate([head, clean[l][n_out:]], axis=0) if n_out < p else head
    finals.append(x)
  nodes = jnp.concatenate(finals, axis=-1)
  return jnp.take(nodes, nb.item_slots, axis=0), jnp.take(nodes, nb.user_slots, axis=0)
