"""UAT-MC: untargeted adversarial training with multimodal coordination, METHODS.md A.7.

Training starts from a normally trained backbone (its checkpoint; the launcher restores
it) and keeps the projection MLPs frozen: the projected features x̂ are computed under
``stop_gradient``, so the projection parameters get exactly zero gradient (and an Adam
update of zero). Each step, every item of the batch is a potential target (the target is
unknown in evasion; on graph models every item with gradient), and every modality of it
is perturbed in the projected space:

  δ^m = 0,  budget ε_i^m = ε · ||x̂_i^m||,
  L_adv(δ) = BPR(batch; x̂ + δ),           g^m = ∇_{δ^m} L_adv,
  J(δ) = L_adv(δ) + λ_align · mean_{i ∈ batch} mean_{m<m'} cos(g_i^m, g_i^{m'}),
  δ_i^m = clip(ε_i^m · ∇_{δ_i^m}J / ||∇_{δ_i^m}J||, −ε_i^m, ε_i^m),

where ∇J contains the second-order term (``jax.grad`` of a function that calls
``jax.grad``), and the model trains on

  L = BPR(clean) + λ_adv · BPR(x̂ + stop_gradient(δ)) + reg · EmbLoss(clean vectors).

Differences from the reference code, both deliberate (A.6/A.7): the cosine is averaged
over the items that have gradient, not over all items (whose zero-gradient rows only
dilute it) — on VBPR-MLP the batch's items, on graph models every item the batch's loss
reaches through the propagation (``graph_items="with_gradient"``, the default; "batch"
restricts graph models to the batch's items, see ``batch_slots``), and the modalities are concatenated in the model's
one order at training and serving (the reference trains on [t; v] and serves [v; t]).
For more than two modalities the cosine is the mean over modality pairs; with one
modality the alignment term is 0. ``align_weight = 0`` is UAT-MC without alignment
(the second-order term is then skipped, not multiplied by zero).
"""
from __future__ import annotations

import itertools
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from uatmc_jax.core.errors import ConfigError
from uatmc_jax.recsys.defences import batch_slots as bs

Features = Mapping[str, jax.Array]


def mean_pairwise_cosine(grads: Sequence[jax.Array], weights: jax.Array) -> jax.Array:
  """Weighted mean over rows of the mean over modality pairs of cos(g_i^a, g_i^b).

  Zero rows have cosine 0 (and finite gradients), so padding never produces NaN.

  Args:
    grads: per-modality (S, p) gradients, all of the same width.
    weights: (S,) row weights (1 for the rows that have gradient, 0 otherwise).

  Returns:
    scalar; 0 when there are fewer than two modalities.
  """
  pairs = list(itertools.combinations(range(len(grads)), 2))
  if not pairs:
    return jnp.zeros((), jnp.float32)
  unit = [bs.safe_row_normalize(g) for g in grads]
  per_row = sum(jnp.sum(unit[a] * unit[b], axis=-1) for a, b in pairs) / len(pairs)
  return jnp.sum(per_row * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def uat_mc_perturbation(adv_loss: Callable[[Features], jax.Array], projected: Features,
                        in_batch: jax.Array | None, *, epsilon: float,
                        align_weight: float) -> dict[str, jax.Array]:
  """The aligned one-step inner maximisation of UAT-MC (A.7), without gradient.

  Args:
    adv_loss: perturbed projected item features {m: (S, p_m)} -> scalar batch BPR.
    projected: clean projected features of the item slots {m: (S, p_m)}.
    in_batch: bool (S,) slots to perturb (the cosine is averaged over them), or None:
      every slot where the first-order gradient ∇L_adv at δ = 0 is non-zero in some
      modality (graph models, ``batch_slots.perturbed_rows``).
    epsilon: relative budget ε (ε_i^m = ε · ||x̂_i^m||).
    align_weight: λ_align (0: plain normalised gradient step).

  Returns:
    δ {m: (S, p_m)}, |δ_i^m| ≤ ε_i^m elementwise, zero outside the perturbed slots.
  """
  projected = jax.lax.stop_gradient(dict(projected))
  modalities = tuple(projected)
  given = None if in_batch is None else in_batch.astype(jnp.float32)
  if align_weight and len({projected[m].shape[1] for m in modalities}) > 1:
    raise ConfigError("UAT-MC alignment compares modality gradients in one space, but the "
                      "projected widths differ: "
                      f"{ {m: projected[m].shape[1] for m in modalities} }; use a backbone "
                      "with a common projected space (vbpr_mlp, mmgcn) or align_weight=0")

  def loss_of_delta(delta):
    if given is None:
      return adv_loss({m: projected[m] + delta[m] for m in modalities})
    return adv_loss({m: projected[m] + delta[m] * given[:, None] for m in modalities})

  def ascent_objective(delta):  # (J, first-order gradient ∇L_adv: the aux)
    value, grads = jax.value_and_grad(loss_of_delta)(delta)
    if not align_weight:
      return value, grads
    weights = bs.rows_with_gradient(grads) if given is None else given
    cosine = mean_pairwise_cosine([grads[m] for m in modalities],
                                  weights.astype(jnp.float32))
    return value + align_weight * cosine, grads

  zeros = {m: jnp.zeros_like(projected[m]) for m in modalities}
  if align_weight:
    direction, first_order = jax.grad(ascent_objective, has_aux=True)(zeros)
  else:
    direction = first_order = jax.grad(loss_of_delta)(zeros)
  rows = bs.rows_with_gradient(first_order) if given is None else given
  mask = rows.astype(jnp.float32)[:, None]
  delta = {}
  for m in modalities:
    budget = epsilon * bs.row_norm(projected[m])
    step = budget * bs.safe_row_normalize(direction[m])
    delta[m] = jnp.clip(step, -budget, budget) * mask
  return jax.lax.stop_gradient(delta)


def check_alignment_space(model, align_weight: float) -> None:
  """Refuses λ_align > 0 on a model without a shared projected space (e.g. VBPR).

  Decided by the model's ``shared_projected_space`` attribute, not by array widths:
  VBPR's "projected" features are its raw ones, unrelated coordinates per modality
  even at equal widths (TikTok: 128/128).
  """
  if align_weight and not getattr(model, "shared_projected_space", False):
    raise ConfigError(
        f"UAT-MC alignment (align_weight={align_weight}) compares modality gradients in "
        f"a shared projected space, which {type(model).__name__} does not have "
        "(shared_projected_space=False); use a backbone with one (vbpr_mlp, mmgcn) or "
        "align_weight=0 (uat_mc_no_align)")


def uat_mc_objective(model, batch: Mapping[str, jax.Array], features: Features,
                     key: jax.Array, *, epsilon: float, adv_weight: float,
                     align_weight: float, reg_weight: float,
                     graph_items: str = "with_gradient") -> tuple[jax.Array, dict]:
  """UAT-MC training loss of one batch (the trainer's loss seam).

  ``graph_items`` (graph models only): "with_gradient" perturbs every item the batch's
  loss has a gradient on, "batch" only the batch's items (``batch_slots.perturbed_rows``).

  Returns:
    (loss, {"bpr", "bpr_adv", "emb", "aux"}) — ``aux`` is always 0: the backbone's
    auxiliary loss acts on the frozen projections and is not part of A.7's loss.
  """
  del key
  check_alignment_space(model, align_weight)
  slots = bs.slots_for(model, batch)
  # Frozen projection MLPs: no gradient reaches them through x̂.
  projected = jax.lax.stop_gradient(model.project(bs.slot_features(model, features, slots)))
  user_vecs, item_vecs = bs.slot_vectors(model, projected, slots)
  bpr = bs.slot_bpr(user_vecs, item_vecs, slots)
  emb = bs.slot_emb_loss(user_vecs, item_vecs, slots)

  def adv_loss(perturbed):
    return bs.slot_bpr(*bs.slot_vectors(model, perturbed, slots), slots)

  delta = uat_mc_perturbation(adv_loss, projected,
                              bs.perturbed_rows(model, slots, graph_items),
                              epsilon=epsilon, align_weight=align_weight)
  bpr_adv = adv_loss({m: projected[m] + delta[m] for m in projected})
  loss = bpr + adv_weight * bpr_adv + reg_weight * emb
  return loss, {"bpr": bpr, "bpr_adv": bpr_adv, "emb": emb, "aux": jnp.zeros((), jnp.float32)}
