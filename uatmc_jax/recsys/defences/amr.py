"""AMR: adversarial multimedia recommendation (Tang et al., TKDE 2019), METHODS.md A.7.

The adversary perturbs the raw item features of ONE modality (the visual one in the
paper; configurable here, default :func:`default_amr_modality`) by the fast-gradient step

  d_i = ε · ∇_{f_i} L_BPR / ||∇_{f_i} L_BPR||       (per item i of the batch)

(``relative_budget=True`` scales ε by ||f_i||, so one ε suits features of any scale),
and the model trains on L = BPR + λ · BPR_adv + reg · EmbLoss (+ the backbone's
auxiliary loss), with d held constant in the outer step; BPR_adv's gradient reaches
every parameter, the projection of the perturbed modality included. For graph models
every item the batch's loss has a gradient on is perturbed, each at its own budget
(``graph_items="with_gradient"``, the default); ``graph_items="batch"`` perturbs only
the batch's items (the other rows of the feature table stay clean), see ``batch_slots``.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from uatmc_jax.core.errors import ConfigError
from uatmc_jax.recsys.defences import batch_slots as bs

VISUAL_NAMES = ("image", "visual", "v")


def default_amr_modality(modalities: Sequence[str]) -> str:
  """The image-like modality ("image"/"visual"/"v") if present, else the first one."""
  for name in VISUAL_NAMES:
    if name in modalities:
      return name
  return modalities[0]


def amr_perturbation(model, raw: Mapping[str, jax.Array], slots: bs.BatchSlots,
                     modality: str, epsilon: float, relative_budget: bool = False,
                     graph_items: str = "with_gradient") -> jax.Array:
  """d (S, d_m): ε-scaled row-normalised ∇ of the batch BPR w.r.t. ``modality``'s rows.

  Args:
    model: the recommender.
    raw: raw features of the item slots {m: (S, d_m)}.
    slots: the batch's slots.
    modality: the perturbed modality.
    epsilon: L2 radius per item (times ||f_i|| when ``relative_budget``).
    relative_budget: scale the radius by each item's feature norm.
    graph_items: which items of a graph model are perturbed (``bs.perturbed_rows``);
      rows without gradient get d = 0 in any case.
  """
  raw = jax.lax.stop_gradient(dict(raw))
  rows = bs.perturbed_rows(model, slots, graph_items)
  grad = jax.grad(lambda d: perturbed_modality_bpr(model, raw, slots, modality, d, rows))(
      jnp.zeros_like(raw[modality]))
  radius = epsilon * (bs.row_norm(raw[modality]) if relative_budget else 1.0)
  return jax.lax.stop_gradient(_masked_rows(radius * bs.safe_row_normalize(grad), rows))


def _masked_rows(x: jax.Array, rows: jax.Array | None) -> jax.Array:
  return x if rows is None else x * rows[:, None].astype(x.dtype)


def perturbed_modality_bpr(model, raw: Mapping[str, jax.Array], slots: bs.BatchSlots,
                           modality: str, delta: jax.Array,
                           rows: jax.Array | None = None) -> jax.Array:
  """Batch BPR with ``raw[modality] + delta`` (delta (S, d_m), masked to ``rows``)."""
  perturbed = dict(raw)
  perturbed[modality] = raw[modality] + _masked_rows(delta, rows)
  return bs.slot_bpr(*bs.slot_vectors(model, model.project(perturbed), slots), slots)


def amr_objective(model, batch: Mapping[str, jax.Array], features: Mapping[str, jax.Array],
                  key: jax.Array, *, epsilon: float, adv_weight: float, reg_weight: float,
                  modality: str | None = None, relative_budget: bool = False,
                  graph_items: str = "with_gradient") -> tuple[jax.Array, dict]:
  """AMR training loss of one batch (the trainer's loss seam).

  ``graph_items``: see ``batch_slots.perturbed_rows`` (graph models only).

  Returns:
    (loss, {"bpr", "bpr_adv", "emb", "aux"}).
  """
  del key
  modality = modality or default_amr_modality(model.modalities)
  if modality not in model.modalities:
    raise ConfigError(f"AMR modality {modality!r} is not one of the model's "
                      f"{list(model.modalities)}")
  slots = bs.slots_for(model, batch)
  raw = bs.slot_features(model, features, slots)
  projected = model.project(raw)
  user_vecs, item_vecs = bs.slot_vectors(model, projected, slots)
  bpr = bs.slot_bpr(user_vecs, item_vecs, slots)
  emb = bs.slot_emb_loss(user_vecs, item_vecs, slots)
  aux = model.auxiliary_loss(bs.positive_projections(projected, slots), batch["pos"],
                             slots.mask)
  delta = amr_perturbation(model, raw, slots, modality, epsilon, relative_budget,
                           graph_items)
  bpr_adv = perturbed_modality_bpr(model, raw, slots, modality, delta)
  loss = bpr + adv_weight * bpr_adv + reg_weight * emb + aux
  return loss, {"bpr": bpr, "bpr_adv": bpr_adv, "emb": emb, "aux": aux}
