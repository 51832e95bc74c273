"""MMGCN as MMRec builds it (METHODS.md A.2; registry name ``mmgcn_mmrec``).

The architecture of MMRec's ``models/mmgcn.py``, so that timings and results can be
compared like with like against it (docs/results/performance.md); the project's own
``mmgcn`` (``uatmc_jax.recsys.models.mmgcn``) differs in depth, widths, aggregation and
final combination (docs/deviations.md). Per modality m, over the user–item train graph
(nodes = users 0..U-1, then items U..U+I-1):

  x_0 = normalize([P^m ; f_m(x^m)])     f_m = Linear(d_m → d_lat) for the *latent*
                                         modality (MMRec: the visual one, d_lat = 256),
                                         the identity (raw features, width d_m) otherwise;
                                         P^m: (U, width of x_0) preference vectors

then three MMGCN layers (MMRec hard-codes three, whatever its ``n_layers`` says)

  h     = LeakyReLU(M (x W_conv))                       W_conv: (w_l, w_l), no bias
  x̃     = LeakyReLU(x W_lin + b) + e_id                 W_lin: (w_l, D)
  x     = LeakyReLU([h ; x̃] W_g + b)                    W_g: (w_l + D, D)

with w_1 = the width of x_0 (d_lat or d_m) and w_l = D for l > 1, and M = D^{-1} A the
*mean* over a node's neighbours (MMRec's ``aggr_mode = 'mean'``; a node without
neighbours aggregates to 0). The combination is the concatenating one (MMRec's
``concate = 'False'`` is a non-empty string, so its concatenation branch runs). The node
vector is the mean of the modality branches' outputs, width D, and score(u, i) =
<x_u, x_i>.

Kept from the project's ``mmgcn`` (deviations from MMRec, docs/deviations.md): the ID
embeddings and the preference vectors are trained parameters (MMRec's are untrained
tensors), initialised Xavier-normal; linear layers use Flax's default initialisers.

The mean is computed with the symmetric propagation primitive
(``graph_propagation.symmetric_propagate``; exact transpose, CSR kernel on CPU):
D^{-1} A x = D^{-1/2} Â (D^{1/2} x) with Â = D^{-1/2} A D^{-1/2}, the two diagonal
scalings being ordinary elementwise products under autodiff.

Attacks: the model is a graph model (``is_graph``) with ``encode`` / ``encode_rows``, so
promotion attacks run on the exact full re-encode path. The neighbourhood-local path
(``attacks.graph_local``) is written for ``mmgcn``'s equal layer widths and concatenated
output and is not offered for this model (``surface_from_recommender`` gives it no
``graph``). It has no common projected space (the latent modality is projected to
d_lat, the others stay raw), so the A.5/A.6 cosines and UAT-MC's alignment do not apply.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uatmc_jax.core.errors import ConfigError
from uatmc_jax.recsys.models import base as base
from uatmc_jax.recsys.models import graph_propagation
from uatmc_jax.recsys.models.mmgcn import (GraphBuffer, MMGCNLayer, NodeForwardEncoder,
                                            bipartite_edges)

# MMRec's MMGCN: three layers, the visual branch projected to 256 first.
MMREC_NUM_LAYERS = 3
MMREC_LATENT_DIM = 256


def mean_edge_scales(dst: np.ndarray, n_nodes: int) -> tuple[np.ndarray, np.ndarray]:
  """(sqrt(deg), 1/sqrt(deg) or 0 where deg = 0), float32 (n_nodes,), from edge heads."""
  deg = np.bincount(np.asarray(dst), minlength=n_nodes).astype(np.float64)
  inv = np.where(deg > 0, 1.0 / np.sqrt(np.maximum(deg, 1.0)), 0.0)
  return np.sqrt(deg).astype(np.float32), inv.astype(np.float32)


class MMGCNMMRec(NodeForwardEncoder, base.RecommenderBase):
  """MMRec's MMGCN architecture with trained ID and preference vectors (module notes).

  Args:
    n_users, n_items: node counts.
    feature_dims: {modality: d_m}.
    train: int (n, 2) train (user, item) pairs: the graph.
    embedding_dim: D, the ID width and the width of every layer after the first.
    latent_modality: the modality projected to ``latent_dim`` before its first layer
      (MMRec: the visual one), or None: every branch starts from raw features.
    latent_dim: d_lat (MMRec: 256).
    num_layers: layers per branch (MMRec: 3, ``MMREC_NUM_LAYERS``).
    row_multiple: ID / preference tables padded with zero rows to a multiple of this
      (``base.padded_table``, as in ``mmgcn.MMGCN``).
    rngs: NNX random streams.

  Raises:
    ConfigError: ``latent_modality`` is not one of ``feature_dims``, or a width or the
      layer count is below 1.
  """

  shared_projected_space = False

  def __init__(self, n_users: int, n_items: int, feature_dims: dict[str, int],
               train: np.ndarray, *, embedding_dim: int = 64,
               latent_modality: str | None = "image", latent_dim: int = MMREC_LATENT_DIM,
               num_layers: int = MMREC_NUM_LAYERS, row_multiple: int = 1, rngs: nnx.Rngs):
    self.modalities = base.ordered_modalities(feature_dims)
    if latent_modality is not None and latent_modality not in feature_dims:
      raise ConfigError(
          f"mmgcn_mmrec: latent_modality {latent_modality!r} is not a modality of the "
          f"data (it has {list(self.modalities)}); name the visual modality or None")
    for what, value in (("embedding_dim", embedding_dim), ("latent_dim", latent_dim),
                        ("num_layers", num_layers)):
      if int(value) < 1:
        raise ConfigError(f"mmgcn_mmrec: {what} must be >= 1, got {value!r}")
    self.is_graph = True
    self.n_users, self.n_items = int(n_users), int(n_items)
    self.embedding_dim = int(embedding_dim)
    self.latent_modality = latent_modality
    n_nodes = self.n_users + self.n_items
    dst, src, weight = bipartite_edges(train, n_users, n_items)
    graph_propagation.check_symmetric(dst, src, weight, "mmgcn_mmrec train graph")
    sqrt_deg, inv_sqrt_deg = mean_edge_scales(dst, n_nodes)
    self.edge_dst = GraphBuffer(jnp.asarray(dst))
    self.edge_src = GraphBuffer(jnp.asarray(src))
    self.edge_weight = GraphBuffer(jnp.asarray(weight))
    self.sqrt_degree = GraphBuffer(jnp.asarray(sqrt_deg))
    self.inv_sqrt_degree = GraphBuffer(jnp.asarray(inv_sqrt_deg))
    # Width of each branch's x_0 (and of its first layer), in modality order.
    self.input_widths = tuple(int(latent_dim) if m == latent_modality
                              else int(feature_dims[m]) for m in self.modalities)
    widths = dict(zip(self.modalities, self.input_widths))
    self.row_multiple = int(row_multiple)
    self.id_embedding = nnx.Param(
        base.padded_table(rngs.params(), n_nodes, self.embedding_dim, self.row_multiple))
    self.preferences = nnx.Dict({
        m: nnx.Param(base.padded_table(rngs.params(), self.n_users, widths[m],
                                       self.row_multiple))
        for m in self.modalities})
    self.feature_proj = nnx.Dict(
        {} if latent_modality is None else
        {latent_modality: nnx.Linear(int(feature_dims[latent_modality]), int(latent_dim),
                                     rngs=rngs)})
    self.branches = nnx.Dict({
        m: nnx.List([MMGCNLayer(self.embedding_dim, in_dim=widths[m], rngs=rngs)]
                    + [MMGCNLayer(self.embedding_dim, rngs=rngs)
                       for _ in range(int(num_layers) - 1)])
        for m in self.modalities})

  def project(self, features: base.Features) -> dict[str, jax.Array]:
    """{m: f_m(x^m)}: Linear(d_m → d_lat) for the latent modality, raw x^m otherwise."""
    base.check_features(features, self.modalities)
    return {m: self.feature_proj[m](features[m]) if m == self.latent_modality
            else jnp.asarray(features[m]) for m in self.modalities}

  def mean_aggregate(self, x: jax.Array) -> jax.Array:
    """M x = D^{-1} A x (the mean over each node's neighbours), (N, k) -> (N, k)."""
    y = graph_propagation.symmetric_propagate(
        x * self.sqrt_degree[...][:, None].astype(x.dtype), self.edge_dst[...],
        self.edge_src[...], self.edge_weight[...])
    return y * self.inv_sqrt_degree[...][:, None].astype(y.dtype)

  def _forward(self, projected_all: base.Features, rows: jax.Array | None = None) -> jax.Array:
    """Node vectors (mean of the branches' outputs) of all nodes, or of ``rows`` only.

    One sparse product per layer for all modalities (their columns side by side);
    ``conv`` is applied after the mean (it is linear without bias). With ``rows`` the
    last layer's combination runs on those rows only.
    """
    base.check_features(projected_all, self.modalities, self.n_items)
    id_embedding = self.id_table()
    xs = [base.l2_normalize(jnp.concatenate([self.preference_table(m), projected_all[m]],
                                            axis=0)) for m in self.modalities]
    n_layers = len(self.branches[self.modalities[0]])
    ids = id_embedding
    for l in range(n_layers):
      widths = np.cumsum([x.shape[-1] for x in xs])[:-1]
      aggregated = jnp.split(self.mean_aggregate(jnp.concatenate(xs, axis=-1)), widths,
                             axis=-1)
      if rows is not None and l == n_layers - 1:
        xs = [jnp.take(x, rows, axis=0) for x in xs]
        aggregated = [jnp.take(a, rows, axis=0) for a in aggregated]
        ids = jnp.take(id_embedding, rows, axis=0)
      xs = [self.branches[m][l].output(self.branches[m][l].conv(a), x, ids)
            for m, x, a in zip(self.modalities, xs, aggregated)]
    return sum(xs[1:], xs[0]) / len(xs)

