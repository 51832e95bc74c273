"""VBPR as in MMRec (METHODS.md A.2; He & McAuley, AAAI 2016).

item vector = [e_i ; W · concat_m x_i^m]   (ID embedding 64-d, one linear map of the
concatenated raw features to 64-d), user vector 128-d, score = dot product. MMRec
concatenates its modalities in a fixed order; here the order is the model's
``modalities`` (sorted names), the same at training and serving.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from uatmc_jax.models import recsys_base as base


class VBPR(base.RecommenderBase):
  """VBPR (MMRec variant).

  Args:
    n_users, n_items: table sizes.
    feature_dims: {modality: d_m} of the raw features.
    embedding_dim: ID / projected item width (64); users get 2x (128).
    rngs: NNX random streams.
  """

  def __init__(self, n_users: int, n_items: int, feature_dims: dict[str, int], *,
               embedding_dim: int = 64, rngs: nnx.Rngs):
    self.modalities = base.ordered_modalities(feature_dims)
    self.is_graph = False
    self.n_users, self.n_items = int(n_users), int(n_items)
    self.embedding_dim = embedding_dim
    self.user_embedding = nnx.Param(
        base.xavier_normal_table(rngs.params(), n_users, 2 * embedding_dim))
    self.item_embedding = nnx.Param(
        base.xavier_normal_table(rngs.params(), n_items, embedding_dim))
    in_dim = sum(int(feature_dims[m]) for m in self.modalities)
    self.item_linear = nnx.Linear(in_dim, embedding_dim, rngs=rngs)

  def project(self, features: base.Features) -> dict[str, jax.Array]:
    """Identity: VBPR's single linear map acts on the concatenation in item_vectors."""
    base.check_features(features, self.modalities)
    return {m: features[m] for m in self.modalities}

  def item_vectors(self, projected: base.Features, item_ids: jax.Array) -> jax.Array:
    """[e_i ; W concat_m x_i^m], (n, 2*embedding_dim)."""
    content = self.item_linear(base.concat_modalities(projected, self.modalities))
    ids = jnp.take(self.item_embedding[...], item_ids, axis=0)
    return jnp.concatenate([ids, content], axis=-1)

  def user_vectors(self) -> jax.Array:
    return self.user_embedding[...]
