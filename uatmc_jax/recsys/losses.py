"""Recommendation losses (METHODS.md A.2) and the vanilla BPR training objective.

* :func:`bpr_loss`  BPR = −mean log(1e−10 + σ(s(u,i⁺) − s(u,i⁻))).
* :func:`emb_loss`  EmbLoss = Σ_t ||V_t||_2 / B: one unsquared L2 (Frobenius) norm per
  argument tensor (the batch's user / positive / negative vectors), summed, divided by
  the batch size — MMRec's ``EmbLoss`` exactly (``torch.norm(V)`` of each tensor).
* :func:`info_nce`  symmetric InfoNCE (the VBPR-MLP auxiliary term).
* :func:`bpr_objective`  the full training loss of one batch with the *loss-function
  seam* every trainer uses: ``loss_fn(model, batch, features, key) -> (loss, aux)``.

Optional ``mask`` (float (B,), 1 = real row, 0 = padding) lets a fixed-shape jitted step
take the short last batch of an epoch: means and the batch size B count real rows only.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import chex
import jax
import jax.numpy as jnp

from uatmc_jax.recsys.models.base import (bpr_batch_vectors, info_nce, masked_mean,
                                          pairwise_info_nce)

__all__ = ["bpr_loss", "emb_loss", "info_nce", "pairwise_info_nce", "bpr_objective",
           "make_bpr_objective", "LossFn"]

# loss_fn(model, batch, features, key) -> (scalar loss, aux dict of scalars)
LossFn = Callable[[Any, Mapping[str, jax.Array], Mapping[str, jax.Array], jax.Array],
                  tuple[jax.Array, dict]]


def bpr_loss(pos_scores: jax.Array, neg_scores: jax.Array,
             mask: jax.Array | None = None) -> jax.Array:
  """−mean log(1e−10 + σ(pos − neg)) (MMRec's BPRLoss), over real rows.

  Args:
    pos_scores, neg_scores: (B,) scores of the positive and negative items.
    mask: optional (B,) 1/0 row weights.
  """
  chex.assert_equal_shape([pos_scores, neg_scores])
  return masked_mean(-jnp.log(1e-10 + jax.nn.sigmoid(pos_scores - neg_scores)), mask)


def emb_loss(*vectors: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Σ_t ||V_t||_2 / B with ||·||_2 the unsquared Frobenius norm of each (B, D_t) tensor.

  Args:
    *vectors: (B, D_t) tensors (e.g. user, positive-item, negative-item vectors).
    mask: optional (B,) 1/0 row weights; padded rows contribute nothing and B counts
      real rows.
  """
  b = vectors[-1].shape[0]
  if mask is not None:
    chex.assert_shape(mask, (b,))
    vectors = tuple(v * mask[:, None] for v in vectors)
    b = jnp.maximum(jnp.sum(mask), 1.0)
  total = sum(jnp.sqrt(jnp.sum(jnp.square(v))) for v in vectors)
  return total / b


def bpr_objective(model, batch: Mapping[str, jax.Array], features: Mapping[str, jax.Array],
                  key: jax.Array, *, reg_weight: float) -> tuple[jax.Array, dict]:
  """Vanilla training loss: BPR + reg·EmbLoss + the model's auxiliary loss.

  This is the default of the trainer's loss seam. Defences (APR, AMR, UAT-MC)
  are other functions with the same signature, typically computing the clean terms with
  the same pieces (``bpr_batch_vectors``, ``bpr_loss``, ``emb_loss``) and adding
  perturbed-BPR terms.

  Args:
    model: a merged recommender (see ``uatmc_jax.recsys.models.base``).
    batch: {"users", "pos", "neg": int (B,), "mask": float (B,)}.
    features: raw features of all items {m: (n_items, d_m)}.
    key: PRNG key (unused by vanilla BPR; part of the seam for stochastic defences).
    reg_weight: EmbLoss weight.

  Returns:
    (loss, {"bpr", "emb", "aux"}).
  """
  del key
  mask = batch.get("mask")
  u, pos_vec, neg_vec, projected_pos = bpr_batch_vectors(
      model, features, batch["users"], batch["pos"], batch["neg"])
  pos_scores = jnp.sum(u * pos_vec, axis=-1)
  neg_scores = jnp.sum(u * neg_vec, axis=-1)
  bpr = bpr_loss(pos_scores, neg_scores, mask)
  reg = emb_loss(u, pos_vec, neg_vec, mask=mask)
  aux = model.auxiliary_loss(projected_pos, batch["pos"], mask)
  loss = bpr + reg_weight * reg + aux
  return loss, {"bpr": bpr, "emb": reg, "aux": aux}


def make_bpr_objective(config: Mapping[str, Any]) -> LossFn:
  """``bpr_objective`` with ``reg_weight`` from config (default 1e-4).

  The same weight returns the same function object, so jitted trainers that take the
  loss as a static argument share their compiled code.
  """
  return _bpr_objective_with(float(config.get("reg_weight", 1e-4)))


@functools.lru_cache(maxsize=None)
def _bpr_objective_with(reg_weight: float) -> LossFn:
  return functools.partial(bpr_objective, reg_weight=reg_weight)
