"""VBPR as in MMRec (METHODS.md A.2; He & McAuley, AAAI 2016).

item vector = [e_i ; W · concat_m x_i^m]   (ID embedding 64-d, one linear map of the
concatenated raw features to 64-d), user vector 128-d, score = dot product. MMRec
concatenates its modalities in a fixed order; here the order is the model's
``modalities`` (sorted names), the same at training and serving.

``item_bias=True`` adds the original paper's per-item bias beta_i (MMRec drops it): the
item vector gains a last coordinate beta_i and every user vector a constant 1, so the
score stays a dot product (attacks, defences and evaluation are unchanged) and equals
<theta_u, [e_i; W x_i]> + beta_i. The constant column is part of the user vectors that
EmbLoss sees, which adds sqrt(B) inside the batch's user norm (a slightly weaker pull to
zero on the user table than without the bias; docs/results/recsys.md, backbones).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from uatmc_jax.recsys.models import base as base


class VBPR(base.RecommenderBase):
  """VBPR (MMRec variant).

  No shared projected space (``shared_projected_space = False``): ``project`` is the
  identity on raw features, whose coordinates mean different things per modality even
  when the widths agree, so alignment (A.6) and the A.5 cosine are refused / NaN.

  Args:
    n_users, n_items: table sizes.
    feature_dims: {modality: d_m} of the raw features.
    embedding_dim: ID / projected item width (64); users get 2x (128).
    item_bias: add a learned per-item bias beta_i (zero-initialised) to the score.
    row_multiple: pad the user and item ID tables with zero rows to a multiple of this
      (the mesh ``model`` axis size, so the tables split by rows; 1 = no padding;
      ``base.padded_table``). Vectors and scores cover the real rows only.
    rngs: NNX random streams.
  """

  shared_projected_space = False

  def __init__(self, n_users: int, n_items: int, feature_dims: dict[str, int], *,
               embedding_dim: int = 64, item_bias: bool = False, row_multiple: int = 1,
               rngs: nnx.Rngs):
    self.modalities = base.ordered_modalities(feature_dims)
    self.is_graph = False
    self.n_users, self.n_items = int(n_users), int(n_items)
    self.embedding_dim = embedding_dim
    self.row_multiple = int(row_multiple)
    self.user_embedding = nnx.Param(
        base.padded_table(rngs.params(), n_users, 2 * embedding_dim, self.row_multiple))
    self.item_embedding = nnx.Param(
        base.padded_table(rngs.params(), n_items, embedding_dim, self.row_multiple))
    in_dim = sum(int(feature_dims[m]) for m in self.modalities)
    self.item_linear = nnx.Linear(in_dim, embedding_dim, rngs=rngs)
    self.item_bias = (nnx.Param(jnp.zeros((n_items, 1), jnp.float32)) if item_bias
                      else None)

  def project(self, features: base.Features) -> dict[str, jax.Array]:
    """Identity: VBPR's single linear map acts on the concatenation in item_vectors."""
    base.check_features(features, self.modalities)
    return {m: features[m] for m in self.modalities}

  def item_vectors(self, projected: base.Features, item_ids: jax.Array) -> jax.Array:
    """[e_i ; W concat_m x_i^m] (n, 2*embedding_dim), plus [beta_i] with ``item_bias``."""
    content = self.item_linear(base.concat_modalities(projected, self.modalities))
    parts = [jnp.take(self.item_embedding[...], item_ids, axis=0), content]
    if self.item_bias is not None:
      parts.append(jnp.take(self.item_bias[...], item_ids, axis=0))
    return jnp.concatenate(parts, axis=-1)

  def user_vectors(self) -> jax.Array:
    """theta_u (n_users, 2*embedding_dim), plus a constant 1 column with ``item_bias``."""
    users = base.real_rows(self.user_embedding[...], self.n_users)
    if self.item_bias is None:
      return users
    return jnp.concatenate([users, jnp.ones((users.shape[0], 1), users.dtype)], axis=-1)
