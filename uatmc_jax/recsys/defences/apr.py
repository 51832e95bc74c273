"""APR: adversarial personalised ranking (He et al., SIGIR 2018), METHODS.md A.7.

The adversary perturbs the representations the score is a dot product of — the batch's
user vectors and item vectors — by the fast-gradient step

  Δ = ε · Γ / ||Γ||,   Γ = ∂L_BPR(Θ + Δ)/∂Δ at Δ = 0,

normalised per row (one user's or one item's vector, as ``tf.nn.l2_normalize(grad, 1)``
in the authors' code), and the model trains on

  L = L_BPR(Θ) + λ · L_BPR(Θ + Δ) + reg · EmbLoss (+ the backbone's auxiliary loss),

with Δ held constant (stop-gradient) in the outer step. For matrix factorisation the
representations are exactly the embedding rows of He et al.; for content models (VBPR,
VBPR-MLP, MMGCN) they are the full user/item vectors ([ID part ; content part]), which
keeps the defence generic over backbones. Distinct users/items of a batch get one
perturbation each (``batch_slots``), so a duplicated item's gradient is summed over its
occurrences, as for a table row.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from uatmc_jax.recsys.defences import batch_slots as bs


def apr_perturbation(user_vecs: jax.Array, item_vecs: jax.Array, slots: bs.BatchSlots,
                     epsilon: float) -> tuple[jax.Array, jax.Array]:
  """(Δ_users (B, D), Δ_items (S, D)) = ε · row-normalised ∇ of the batch BPR, no gradient.

  Args:
    user_vecs: (B, D) user-slot vectors; item_vecs: (S, D) item-slot vectors.
    slots: the batch's slots.
    epsilon: L2 radius of each row's perturbation.
  """
  user_vecs, item_vecs = jax.lax.stop_gradient((user_vecs, item_vecs))
  grad_u, grad_i = jax.grad(
      lambda du, di: bs.slot_bpr(user_vecs + du, item_vecs + di, slots),
      argnums=(0, 1))(jnp.zeros_like(user_vecs), jnp.zeros_like(item_vecs))
  return jax.lax.stop_gradient(
      (epsilon * bs.safe_row_normalize(grad_u), epsilon * bs.safe_row_normalize(grad_i)))


def apr_objective(model, batch: Mapping[str, jax.Array], features: Mapping[str, jax.Array],
                  key: jax.Array, *, epsilon: float, adv_weight: float,
                  reg_weight: float) -> tuple[jax.Array, dict]:
  """APR training loss of one batch (the trainer's loss seam).

  Returns:
    (loss, {"bpr", "bpr_adv", "emb", "aux"}).
  """
  del key
  slots = bs.slots_for(model, batch)
  projected = model.project(bs.slot_features(model, features, slots))
  user_vecs, item_vecs = bs.slot_vectors(model, projected, slots)
  bpr = bs.slot_bpr(user_vecs, item_vecs, slots)
  emb = bs.slot_emb_loss(user_vecs, item_vecs, slots)
  aux = model.auxiliary_loss(bs.positive_projections(projected, slots), batch["pos"],
                             slots.mask)
  delta_u, delta_i = apr_perturbation(user_vecs, item_vecs, slots, epsilon)
  bpr_adv = bs.slot_bpr(user_vecs + delta_u, item_vecs + delta_i, slots)
  loss = bpr + adv_weight * bpr_adv + reg_weight * emb + aux
  return loss, {"bpr": bpr, "bpr_adv": bpr_adv, "emb": emb, "aux": aux}
