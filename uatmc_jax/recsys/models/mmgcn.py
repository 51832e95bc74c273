"""MMGCN (Wei et al., ACM MM 2019; METHODS.md A.2), with sparse message passing.

One graph-convolution branch per modality m over the user–item bipartite train graph
(nodes = users 0..U-1, then items U..U+I-1). Branch m starts from

  x_0 = normalize([P^m ; proj_m(x^m)])      (P^m: the users' preference vectors for m,
                                              proj_m: Linear(d_m → D) of item features)

and applies ``num_layers`` MMGCN layers

  h     = LeakyReLU(Â (x W_conv))                       (aggregation)
  x̃     = LeakyReLU(x W_lin + b) + e_id                 (node's own ID-aware signal)
  x     = LeakyReLU([h ; x̃] W_g + b)                    (combination)

with Â the symmetrically normalised adjacency D^{-1/2} A D^{-1/2} applied as a sparse
product over the edge list (no dense adjacency; the edge list's symmetry is checked once
at construction). The graph is bipartite, Â = [[0, B], [Bᵀ, 0]], so the model keeps each
branch's user rows and item rows as two tables and aggregates with
``graph_propagation.bipartite_propagate`` (B x_items, Bᵀ x_users): per layer one product
for all modalities (columns side by side), two CSR blocks, no concatenation of users and
items, and the backward pass is the same product again (Âᵀ = Â). Scores sum the
per-modality dot products plus an ID part: the user/item vectors are the
concatenations [e_id ; x^{m_1} ; x^{m_2} ...], so one dot product gives
<e_u, e_i> + Σ_m <x_u^m, x_i^m>.

Deviations from MMRec's MMGCN (docs/deviations.md): the ID embeddings and the
preference vectors are trained (MMRec leaves them as untrained tensors); aggregation is
symmetric-normalised rather than an unnormalised sum, which keeps activations bounded
on high-degree nodes; the final representation is the per-modality concatenation
rather than the mean, per the score definition above. MMRec's own architecture (three
layers, wider first layers, mean aggregation, mean of the branches) is the separate
model ``mmgcn_mmrec`` (``uatmc_jax.recsys.models.mmgcn_mmrec``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uatmc_jax.recsys.models import base as base
from uatmc_jax.recsys.models import graph_propagation


class GraphBuffer(nnx.Variable):
  """Non-trainable graph structure (edge lists, edge weights) kept in the module state."""


def bipartite_edges(train: np.ndarray, n_users: int, n_items: int):
  """Both directions of the user–item train graph, sorted by destination node.

  Args:
    train: int (n, 2) (user, item) pairs (duplicates are counted once).
    n_users, n_items: node counts; item nodes are offset by n_users.

  Returns:
    (dst int32 (2n,), src int32 (2n,), weight float32 (2n,) = 1/sqrt(deg_dst·deg_src)).
  """
  pairs = np.unique(np.asarray(train, np.int64), axis=0)
  u, i = pairs[:, 0], pairs[:, 1] + n_users
  dst = np.concatenate([u, i])
  src = np.concatenate([i, u])
  order = np.lexsort((src, dst))
  dst, src = dst[order], src[order]
  deg = np.bincount(dst, minlength=n_users + n_items).astype(np.float64)
  weight = 1.0 / np.sqrt(deg[dst] * deg[src])
  return dst.astype(np.int32), src.astype(np.int32), weight.astype(np.float32)


class MMGCNLayer(nnx.Module):
  """One MMGCN layer: normalised aggregation, ID-aware self signal, combination.

  Args:
    dim: D, the output width (the ID width).
    in_dim: width of the layer's input (default D). MMRec's first layer runs at its
      input's width: ``conv`` is (in_dim, in_dim), ``self_linear`` (in_dim, D) and
      ``combine`` (in_dim + D, D) (``mmgcn_mmrec.MMGCNMMRec``).
    rngs: NNX random streams.
  """

  def __init__(self, dim: int, *, in_dim: int | None = None, rngs: nnx.Rngs):
    in_dim = dim if in_dim is None else int(in_dim)
    self.conv = nnx.Linear(in_dim, in_dim, use_bias=False, rngs=rngs)
    self.self_linear = nnx.Linear(in_dim, dim, rngs=rngs)
    self.combine = nnx.Linear(in_dim + dim, dim, rngs=rngs)

  def __call__(self, x, id_embedding, dst, src, weight, n_nodes):
    """The layer on any edge list (``dst`` sorted): Â (x W_conv) by segment sums."""
    del n_nodes  # = x.shape[0]
    return self.output(graph_propagation.segment_propagate(self.conv(x), dst, src, weight),
                       x, id_embedding)

  def output(self, aggregate, x, id_embedding):
    """The layer from its aggregate Â (x W_conv) (row-wise in all three arguments).

    Since ``conv`` has no bias, Â (x W_conv) = (Â x) W_conv: the model passes
    ``conv(Â x)``, so rows of the aggregate can be formed for a subset of nodes.
    """
    h = jax.nn.leaky_relu(aggregate)
    x_self = jax.nn.leaky_relu(self.self_linear(x)) + id_embedding
    return jax.nn.leaky_relu(self.combine(jnp.concatenate([h, x_self], axis=-1)))


class NodeForwardEncoder:
  """encode / encode_rows / item_vectors of a graph recommender from its
  ``_forward(projected_all, rows=None)`` over the U + I nodes (users first), and its
  real-row tables (``id_embedding``, ``preferences``); shared by ``MMGCN`` and
  ``mmgcn_mmrec.MMGCNMMRec``."""

  def id_table(self) -> jax.Array:
    """The ID embeddings of the real nodes, (n_users + n_items, D) (padding dropped)."""
    return base.real_rows(self.id_embedding[...], self.n_users + self.n_items)

  def preference_table(self, modality: str) -> jax.Array:
    """The users' preference vectors of ``modality`` (padding dropped)."""
    return base.real_rows(self.preferences[modality][...], self.n_users)

  def encode(self, projected_all: base.Features) -> tuple[jax.Array, jax.Array]:
    """(user vectors (U, ·), item vectors (I, ·)) from all items' projections."""
    nodes = self._forward(projected_all)
    return nodes[:self.n_users], nodes[self.n_users:]

  def encode_rows(self, projected_all: base.Features, user_ids: jax.Array,
                  item_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rows ``user_ids`` / ``item_ids`` of :meth:`encode`, computing the last layer there only."""
    rows = jnp.concatenate([user_ids.astype(jnp.int32),
                            item_ids.astype(jnp.int32) + self.n_users])
    nodes = self._forward(projected_all, rows)
    return nodes[:user_ids.shape[0]], nodes[user_ids.shape[0]:]

  def item_vectors(self, projected: base.Features, item_ids: jax.Array) -> jax.Array:
    """Rows ``item_ids`` of the full forward; ``projected`` must hold all items."""
    return self.encode_rows(projected, jnp.zeros((0,), jnp.int32), item_ids)[1]

  def user_vectors(self) -> jax.Array:
    raise TypeError(f"{type(self).__name__} user vectors depend on every item's features; "
                    "use encode(project(features)) instead")


class MMGCN(NodeForwardEncoder, base.RecommenderBase):
  """MMGCN with one GCN branch per modality and trained ID / preference vectors.

  Args:
    n_users, n_items: node counts.
    feature_dims: {modality: d_m}.
    train: int (n, 2) train (user, item) pairs: the graph.
    embedding_dim: D, the width of every branch and of the ID part.
    num_layers: graph layers per branch (MMRec default 2).
    row_multiple: pad the ID table (``n_users + n_items`` rows) and the preference
      vectors (``n_users`` rows) with zero rows to a multiple of this (the mesh ``model``
      axis size; 1 = no padding; ``base.padded_table``). Padding rows sit after the
      real ones, so node ids are unchanged; read the tables through :meth:`id_table`
      and :meth:`preference_table`.
    rngs: NNX random streams.
  """

  # Every modality is projected to D-d branch inputs: the A.6 cosine compares them.
  shared_projected_space = True

  def __init__(self, n_users: int, n_items: int, feature_dims: dict[str, int],
               train: np.ndarray, *, embedding_dim: int = 64, num_layers: int = 2,
               row_multiple: int = 1, rngs: nnx.Rngs):
    self.modalities = base.ordered_modalities(feature_dims)
    self.is_graph = True
    self.n_users, self.n_items = int(n_users), int(n_items)
    self.embedding_dim = embedding_dim
    dst, src, weight = bipartite_edges(train, n_users, n_items)
    # The propagation's backward pass is exact only for a symmetric Â (its contract).
    graph_propagation.check_symmetric(dst, src, weight, "MMGCN train graph")
    # The user rows of the dst-sorted list come first: the split of its two CSR blocks.
    self.n_user_edges = int(np.searchsorted(dst, n_users))
    self.edge_dst = GraphBuffer(jnp.asarray(dst))
    self.edge_src = GraphBuffer(jnp.asarray(src))
    self.edge_weight = GraphBuffer(jnp.asarray(weight))
    n_nodes = n_users + n_items
    self.row_multiple = int(row_multiple)
    self.id_embedding = nnx.Param(
        base.padded_table(rngs.params(), n_nodes, embedding_dim, self.row_multiple))
    self.preferences = nnx.Dict({
        m: nnx.Param(base.padded_table(rngs.params(), n_users, embedding_dim,
                                       self.row_multiple))
        for m in self.modalities})
    self.feature_proj = nnx.Dict({
        m: nnx.Linear(int(feature_dims[m]), embedding_dim, rngs=rngs) for m in self.modalities})
    self.branches = nnx.Dict({
        m: nnx.List([MMGCNLayer(embedding_dim, rngs=rngs) for _ in range(num_layers)])
        for m in self.modalities})

  def project(self, features: base.Features) -> dict[str, jax.Array]:
    """proj_m(x^m) = x^m W_m + b_m, {m: (n, D)} (row-wise)."""
    base.check_features(features, self.modalities)
    return {m: self.feature_proj[m](features[m]) for m in self.modalities}

  def bipartite(self) -> graph_propagation.BipartiteGraph:
    """The train graph's two CSR blocks (user rows, item rows) from the edge buffers."""
    return graph_propagation.bipartite_graph(
        self.edge_dst[...], self.edge_src[...], self.edge_weight[...], self.n_users,
        self.n_items, self.n_user_edges)

  def split_forward(self, projected_all: base.Features, user_rows: jax.Array | None = None,
                    item_rows: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(user vectors, item vectors) [e_id ; x^{m_1} ; ...] of all users and items, or of
    ``user_rows`` / ``item_rows`` only (both given or neither).

    Each branch keeps two tables, its user rows and its item rows; a layer aggregates all
    branches at once with ``bipartite_propagate`` (Â [x_U ; x_I] = (B x_I, Bᵀ x_U), the
    modalities' columns side by side; its transpose is itself), and applies ``conv``
    after aggregating (= before, ``conv`` being linear). With rows the
    last layer runs on those rows only (its inputs at every node are still needed for the
    aggregate): the BPR loss needs just the batch's users and items. Row-wise maths is that
    of :meth:`_forward`'s node order (users first), per table.
    """
    base.check_features(projected_all, self.modalities, self.n_items)
    if (user_rows is None) != (item_rows is None):
      raise ValueError("split_forward: give both user_rows and item_rows, or neither")
    ids_all = self.id_table()
    id_u, id_i = ids_all[:self.n_users], ids_all[self.n_users:]
    graph = self.bipartite()
    # l2 normalisation is row-wise: normalising the two tables = normalising [P ; proj].
    xs = [(base.l2_normalize(self.preference_table(m)), base.l2_normalize(projected_all[m]))
          for m in self.modalities]
    n_layers = len(self.branches[self.modalities[0]])
    ids = (id_u, id_i)
    take = lambda pair, rows: tuple(jnp.take(t, r.astype(jnp.int32), axis=0)
                                    for t, r in zip(pair, rows))
    for l in range(n_layers):
      # One product for all modalities (their columns side by side), per table.
      widths = np.cumsum([x_u.shape[-1] for x_u, _ in xs])[:-1]
      agg_u, agg_i = graph_propagation.bipartite_propagate(
          jnp.concatenate([x_u for x_u, _ in xs], axis=-1),
          jnp.concatenate([x_i for _, x_i in xs], axis=-1), graph)
      aggregated = list(zip(jnp.split(agg_u, widths, axis=-1),
                            jnp.split(agg_i, widths, axis=-1)))
      if user_rows is not None and l == n_layers - 1:
        rows = (user_rows, item_rows)
        xs = [take(x, rows) for x in xs]
        aggregated = [take(a, rows) for a in aggregated]
        ids = take(ids, rows)
      xs = [tuple(self.branches[m][l].output(self.branches[m][l].conv(a), x, e)
                  for a, x, e in zip(agg, x_pair, ids))
            for m, x_pair, agg in zip(self.modalities, xs, aggregated)]
    if user_rows is not None and n_layers == 0:
      rows = (user_rows, item_rows)
      xs = [take(x, rows) for x in xs]
      ids = take(ids, rows)
    return tuple(jnp.concatenate([ids[side]] + [x[side] for x in xs], axis=-1)
                 for side in (0, 1))

  def encode(self, projected_all: base.Features) -> tuple[jax.Array, jax.Array]:
    """(user vectors (U, ·), item vectors (I, ·)) from all items' projections."""
    return self.split_forward(projected_all)

  def encode_rows(self, projected_all: base.Features, user_ids: jax.Array,
                  item_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rows ``user_ids`` / ``item_ids`` of :meth:`encode`, computing the last layer there only."""
    return self.split_forward(projected_all, user_ids, item_ids)

  def _forward(self, projected_all: base.Features, rows: jax.Array | None = None) -> jax.Array:
    """Node vectors [e_id ; x^{m_1} ; ...] of all nodes, or of node ids ``rows`` only.

    The one-table form (users then items in one (N, ·) array, all modalities in one
    ``symmetric_propagate`` per layer); :meth:`encode` / :meth:`encode_rows` use
    :meth:`split_forward`, the same function on two tables (tests check they agree).
    Every layer applies ``conv`` after aggregating (= before, ``conv`` being linear);
    with ``rows`` the last layer runs on those rows only.
    """
    base.check_features(projected_all, self.modalities, self.n_items)
    id_embedding = self.id_table()
    dst, src, w = self.edge_dst[...], self.edge_src[...], self.edge_weight[...]
    xs = [base.l2_normalize(jnp.concatenate([self.preference_table(m), projected_all[m]],
                                            axis=0)) for m in self.modalities]
    n_layers = len(self.branches[self.modalities[0]])
    ids = id_embedding
    for l in range(n_layers):
      widths = np.cumsum([x.shape[-1] for x in xs])[:-1]
      aggregated = jnp.split(graph_propagation.symmetric_propagate(
          jnp.concatenate(xs, axis=-1), dst, src, w), widths, axis=-1)
      if rows is not None and l == n_layers - 1:
        xs = [jnp.take(x, rows, axis=0) for x in xs]
        aggregated = [jnp.take(a, rows, axis=0) for a in aggregated]
        ids = jnp.take(id_embedding, rows, axis=0)
      xs = [self.branches[m][l].output(self.branches[m][l].conv(a), x, ids)
            for m, x, a in zip(self.modalities, xs, aggregated)]
    if rows is not None and n_layers == 0:
      xs = [jnp.take(x, rows, axis=0) for x in xs]
      ids = jnp.take(id_embedding, rows, axis=0)
    return jnp.concatenate([ids] + xs, axis=-1)

