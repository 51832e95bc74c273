"""A BPR batch seen through its distinct users and items ("slots"), METHODS.md A.7.

Every defence perturbs something *per user or per item* — APR the user/item vectors,
AMR one modality's item features, UAT-MC every modality's projected item features —
and the perturbation of an item that occurs twice in a batch (as a positive of one user
and a negative of another) must be one vector whose gradient is the sum over its
occurrences, exactly as when the perturbation is a row of a full table (the reference
code's formulation). Gathering a table of ``n_items`` rows per step would cost
O(n_items · d) per perturbation, so the batch is indexed by its distinct ids instead:

* non-graph models (VBPR, VBPR-MLP): the slots are the distinct items of ``pos ∪ neg``
  (``jnp.unique`` with a static size, so it jits), projected and encoded once each;
* graph models (MMGCN): one item's features move every vector, so the slots are all
  items in id order, and ``item_in_batch`` marks the ones the batch contains.

Which item slots a defence perturbs (``perturbed_rows``): on non-graph models the
batch's items (no other item gets a gradient). On graph models the batch's loss has a
gradient on every item within the propagation's receptive field of the batch — nearly
all items — and A.7 treats every item as a potential target, so by default
(``graph_items="with_gradient"``) every item with a non-zero gradient is perturbed, at
its own budget, and UAT-MC's cosine is averaged over those items. ``graph_items=
"batch"`` is the narrower variant that perturbs only the batch's own items (the other
rows of the feature table stay clean), kept as a named option for comparison.

Users are always the distinct users of the batch. Padding slots (``jnp.unique`` with a
static size repeats an id) are never referenced, so their gradients are exactly zero.
"""
from __future__ import annotations

import functools
from typing import Mapping, NamedTuple

import chex
import jax
import jax.numpy as jnp

from uatmc_jax.core.errors import ConfigError
from uatmc_jax.recsys import losses as recsys_losses
from uatmc_jax.recsys.models import base as base

Features = Mapping[str, jax.Array]


class BatchSlots(NamedTuple):
  """Index arrays of a BPR batch of B (user, pos, neg) triples.

  Attributes:
    user_ids: int (B,) distinct users (padded by repetition).
    user_index: int (B,) slot of each triple's user, ``user_ids[user_index] == users``.
    item_ids: int (S,) item slots (S = 2B distinct items, or n_items for graph models).
    pos_index, neg_index: int (B,) slot of each triple's positive / negative item.
    item_in_batch: bool (S,) slots that some real (unmasked) triple references.
    mask: float (B,) row weights (1 real, 0 padding) or None (all rows real).
  """
  user_ids: jax.Array
  user_index: jax.Array
  item_ids: jax.Array
  pos_index: jax.Array
  neg_index: jax.Array
  item_in_batch: jax.Array
  mask: jax.Array | None


def batch_ids(batch: Mapping[str, jax.Array]):
  """(users, pos, neg) int (B,) and the row mask float (B,) or None of a trainer batch.

  The batch is the trainer's ``{"users", "pos", "neg": int (B,), "mask": float (B,)}``
  (``mask`` optional: 1 = real row, 0 = padding of the short last batch).
  """
  mask = batch.get("mask")
  return (jnp.asarray(batch["users"]), jnp.asarray(batch["pos"]), jnp.asarray(batch["neg"]),
          None if mask is None else jnp.asarray(mask))


def make_batch_slots(users: jax.Array, pos: jax.Array, neg: jax.Array, *, n_items: int,
                     all_items: bool, mask: jax.Array | None = None) -> BatchSlots:
  """Builds the slots of a batch (see the module docstring). Jittable."""
  b = users.shape[0]
  chex.assert_shape([users, pos, neg], (b,))
  user_ids, user_index = jnp.unique(users, size=b, return_inverse=True)
  items = jnp.concatenate([pos, neg])
  if all_items:
    item_ids = jnp.arange(n_items, dtype=items.dtype)
    item_index = items
  else:
    item_ids, item_index = jnp.unique(items, size=2 * b, return_inverse=True)
  item_index = item_index.reshape(-1)
  real = jnp.ones((2 * b,), bool) if mask is None else jnp.tile(mask > 0, 2)
  in_batch = jnp.zeros(item_ids.shape, bool).at[item_index].max(real)
  return BatchSlots(user_ids, user_index.reshape(-1), item_ids, item_index[:b],
                    item_index[b:], in_batch, mask)


def slots_for(model, batch: Mapping[str, jax.Array]) -> BatchSlots:
  """The slots of a trainer batch for ``model`` (all-item slots for graph models)."""
  users, pos, neg, mask = batch_ids(batch)
  return make_batch_slots(users, pos, neg, n_items=model.n_items, all_items=model.is_graph,
                          mask=mask)


def slot_features(model, features: Features, slots: BatchSlots) -> dict[str, jax.Array]:
  """Raw features of the item slots, {m: (S, d_m)} (all rows, ungathered, for graph models)."""
  if model.is_graph:
    return {m: features[m] for m in model.modalities}
  return base.gather_rows({m: features[m] for m in model.modalities}, slots.item_ids)


def slot_vectors(model, projected: Features,
                 slots: BatchSlots) -> tuple[jax.Array, jax.Array]:
  """(user vectors (B, D) of the user slots, item vectors (S, D) of the item slots)."""
  if model.is_graph:
    user_all, item_all = model.encode(projected)
    return jnp.take(user_all, slots.user_ids, axis=0), item_all
  users = jnp.take(model.user_vectors(), slots.user_ids, axis=0)
  return users, model.item_vectors(projected, slots.item_ids)


def triple_vectors(user_vecs: jax.Array, item_vecs: jax.Array, slots: BatchSlots):
  """(u, pos, neg) vectors (B, D) of the triples from slot vectors."""
  u = jnp.take(user_vecs, slots.user_index, axis=0)
  return (u, jnp.take(item_vecs, slots.pos_index, axis=0),
          jnp.take(item_vecs, slots.neg_index, axis=0))


def slot_bpr(user_vecs: jax.Array, item_vecs: jax.Array, slots: BatchSlots) -> jax.Array:
  """BPR loss (A.2) of the batch from slot vectors."""
  u, p, n = triple_vectors(user_vecs, item_vecs, slots)
  return recsys_losses.bpr_loss(jnp.sum(u * p, -1), jnp.sum(u * n, -1), slots.mask)


def slot_emb_loss(user_vecs: jax.Array, item_vecs: jax.Array, slots: BatchSlots) -> jax.Array:
  """EmbLoss (A.2) of the batch's user / pos / neg vectors."""
  return recsys_losses.emb_loss(*triple_vectors(user_vecs, item_vecs, slots), mask=slots.mask)


def positive_projections(projected: Features, slots: BatchSlots) -> dict[str, jax.Array]:
  """Projected features of the batch's positives, {m: (B, p_m)} (auxiliary-loss input)."""
  return {m: jnp.take(p, slots.pos_index, axis=0) for m, p in projected.items()}


GRAPH_ITEMS = ("with_gradient", "batch")


def perturbed_rows(model, slots: BatchSlots, graph_items: str = "with_gradient"):
  """bool (S,) item slots a defence perturbs, or None for "every slot with gradient".

  Non-graph models: the batch's items (``item_in_batch``). Graph models: None with
  ``graph_items="with_gradient"`` (the default, see the module docstring), the batch's
  items with ``"batch"``.
  """
  if graph_items not in GRAPH_ITEMS:
    raise ConfigError(f"graph_items must be one of {list(GRAPH_ITEMS)}, got {graph_items!r}")
  if model.is_graph and graph_items == "with_gradient":
    return None
  return slots.item_in_batch


def rows_with_gradient(grads: Mapping[str, jax.Array]) -> jax.Array:
  """bool (S,): rows where some modality's gradient is non-zero (piecewise constant)."""
  g = jax.lax.stop_gradient(dict(grads))
  has = [jnp.any(x != 0, axis=-1) for x in g.values()]
  return functools.reduce(jnp.logical_or, has)


def safe_row_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / ||x|| per row, exactly 0 for zero rows (no NaN, also in gradients)."""
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  nonzero = sq > eps * eps
  inv = jnp.where(nonzero, jax.lax.rsqrt(jnp.where(nonzero, sq, 1.0)), 0.0)
  return x * inv


def row_norm(x: jax.Array) -> jax.Array:
  """||x_i||_2 per row, (n, 1)."""
  return jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
