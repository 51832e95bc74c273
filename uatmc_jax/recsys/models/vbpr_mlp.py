"""VBPR-MLP, the UAT-MC backbone (METHODS.md A.2).

Each modality m has its own projection MLP to 64-d followed by L2 normalisation,
x̂_i^m = normalize(MLP_m(x_i^m)). Two MLP shapes, chosen by the raw width d_m:

* wide (d_m >= ``wide_threshold``, default 1024, e.g. 4096-d image CNN features):
  d→1024→ReLU→LayerNorm→256→ReLU→LayerNorm→64;
* narrow (otherwise, e.g. 384-d sentence embeddings or TikTok's 128-d features):
  d→256→ReLU→LayerNorm→64.

Item vector = [e_i ; Linear(64·|M| → 64)(concat_m x̂_i^m)] (128-d), user vector 128-d,
score = dot. The auxiliary loss is ``align_weight`` × InfoNCE between the modalities'
x̂ (pairwise mean for more than two modalities) with a learnable temperature.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from uatmc_jax.recsys.models import base as base


class ProjectionMLP(nnx.Module):
  """Linear→ReLU→LayerNorm blocks for ``hidden`` widths, then a Linear to ``out_dim``."""

  def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, *, rngs: nnx.Rngs):
    dims = [in_dim, *hidden]
    self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
    self.norms = nnx.List([nnx.LayerNorm(b, rngs=rngs) for b in hidden])
    self.out = nnx.Linear(dims[-1], out_dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    for linear, norm in zip(self.hidden, self.norms):
      x = norm(jax.nn.relu(linear(x)))
    return self.out(x)


def projection_hidden(d: int, wide_threshold: int) -> tuple[int, ...]:
  """Hidden widths of a modality's MLP: (1024, 256) if d >= wide_threshold else (256,)."""
  return (1024, 256) if d >= wide_threshold else (256,)


class VBPRMLP(base.RecommenderBase):
  shared_projected_space = True

  """VBPR with per-modality projection MLPs and cross-modal InfoNCE.

  Every modality is projected into one common 64-d space (``shared_projected_space``).

  Args:
    n_users, n_items: table sizes.
    feature_dims: {modality: d_m}.
    embedding_dim: ID / projected width (64); user vectors are 2x (128).
    wide_threshold: raw width from which a modality gets the wide MLP.
    align_weight: weight of the InfoNCE auxiliary loss (0 disables it); 1.0, the
      protocol default of ``experiments/configs/recsys.py`` (0 on synthetic data).
    init_temperature: initial InfoNCE temperature (learnable, kept in [1/64, 100]).
    row_multiple: pad the user and item ID tables with zero rows to a multiple of this
      (the mesh ``model`` axis size; 1 = no padding; ``base.padded_table``).
    rngs: NNX random streams.
  """

  def __init__(self, n_users: int, n_items: int, feature_dims: dict[str, int], *,
               embedding_dim: int = 64, wide_threshold: int = 1024,
               align_weight: float = 1.0, init_temperature: float = 0.2,
               row_multiple: int = 1, rngs: nnx.Rngs):
    self.modalities = base.ordered_modalities(feature_dims)
    self.is_graph = False
    self.n_users, self.n_items = int(n_users), int(n_items)
    self.embedding_dim = embedding_dim
    self.align_weight = float(align_weight)
    self.row_multiple = int(row_multiple)
    self.user_embedding = nnx.Param(
        base.padded_table(rngs.params(), n_users, 2 * embedding_dim, self.row_multiple))
    self.item_embedding = nnx.Param(
        base.padded_table(rngs.params(), n_items, embedding_dim, self.row_multiple))
    self.projectors = nnx.Dict({
        m: ProjectionMLP(int(feature_dims[m]),
                         projection_hidden(int(feature_dims[m]), wide_threshold),
                         embedding_dim, rngs=rngs)
        for m in self.modalities})
    self.fusion = nnx.Linear(embedding_dim * len(self.modalities), embedding_dim, rngs=rngs)
    self.log_temperature = nnx.Param(jnp.asarray(math.log(init_temperature), jnp.float32))

  def project(self, features: base.Features) -> dict[str, jax.Array]:
    """x̂^m = normalize(MLP_m(x^m)), {m: (n, 64)}."""
    base.check_features(features, self.modalities)
    return {m: base.l2_normalize(self.projectors[m](features[m])) for m in self.modalities}

  def item_vectors(self, projected: base.Features, item_ids: jax.Array) -> jax.Array:
    """[e_i ; fusion(concat_m x̂_i^m)], (n, 128)."""
    content = self.fusion(base.concat_modalities(projected, self.modalities))
    ids = jnp.take(self.item_embedding[...], item_ids, axis=0)
    return jnp.concatenate([ids, content], axis=-1)

  def user_vectors(self) -> jax.Array:
    return base.real_rows(self.user_embedding[...], self.n_users)

  def temperature(self) -> jax.Array:
    lower = math.log(1.0 / base.UNIT_LOGIT_BOUND)  # keeps |logits| <= 64 (unit_info_nce)
    return jnp.exp(jnp.clip(self.log_temperature[...], lower, math.log(100.0)))

  def auxiliary_loss(self, projected_batch: base.Features, item_ids: jax.Array,
                     mask: jax.Array | None = None) -> jax.Array:
    """align_weight · mean pairwise InfoNCE(x̂^a, x̂^b) over the batch's real items.

    ``mask`` (float (B,), 0 = padding) drops padding rows from the rows and negatives.
    """
    if self.align_weight == 0.0 or len(self.modalities) < 2:
      return jnp.zeros((), jnp.float32)
    views = [projected_batch[m] for m in self.modalities]
    return self.align_weight * base.pairwise_info_nce(views, self.temperature(), item_ids,
                                                      nce=base.unit_info_nce, mask=mask)
