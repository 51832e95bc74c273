"""The recommender protocol shared by VBPR, VBPR-MLP and MMGCN (METHODS.md A.1-A.2).

Every recommender is a Flax NNX module, generic over an ordered tuple of modality names
(the order of ``InteractionData.features``, sorted by name). Raw item features are data:
they are passed explicitly as ``features: {modality: (n_items, d_m)}`` and never stored
in parameters, so attacks and defences can differentiate through them.

The contract (docs/design.md, the recommender protocol):

* ``project(features) -> {m: (n, p_m)}``: raw features -> projected modality space,
  row-wise (projecting a subset of rows gives those rows of the full projection).
* ``item_vectors(projected, item_ids) -> (n, D)``: item vectors from (possibly
  perturbed) projected features plus ID embeddings. For graph models (``is_graph``)
  only valid when ``projected`` holds all items in id order.
* ``user_vectors() -> (n_users, D)`` (non-graph models).
* ``encode(projected_all) -> (user_vecs (n_users, D), item_vecs (n_items, D))``.
* ``shared_projected_space``: class attribute, True when every modality is projected
  into one common space (VBPR-MLP, MMGCN); False for VBPR, whose ``project`` is the
  identity on raw features (equal raw widths, e.g. TikTok's 128/128, are unrelated
  coordinates). Alignment (A.6) and the A.5 cosine need it.
* ``auxiliary_loss(projected_batch, item_ids, mask=None) -> scalar`` (0 unless the model
  has one); ``mask`` float (B,) marks real rows (1) and padding (0): padding rows must
  not change the value (the trainer pads the short last batch with copies of row 0).
* optional, graph models: ``encode_rows(projected_all, user_ids, item_ids) -> (user_vecs
  (n_u, D), item_vecs (n_i, D))``, those rows of ``encode`` (cheaper: a BPR batch needs
  only its own rows of the last layer).

score(u, i) = <user_vecs[u], item_vecs[i]> for every model.

Pure-function use::

  graphdef, state = nnx.split(model)
  def f(state, delta):
    m = nnx.merge(graphdef, state)
    ...m.item_vectors({k: p[k] + delta[k] for k in p}, ids)...
"""
from __future__ import annotations

from typing import Mapping, Protocol, Sequence, runtime_checkable

import chex
import jax
import jax.numpy as jnp
from flax import nnx

Features = Mapping[str, jax.Array]


@runtime_checkable
class Recommender(Protocol):
  """What attacks, defences, training and evaluation may call on a recommender."""

  modalities: tuple[str, ...]
  is_graph: bool
  shared_projected_space: bool
  n_users: int
  n_items: int

  def project(self, features: Features) -> dict[str, jax.Array]:
    ...

  def item_vectors(self, projected: Features, item_ids: jax.Array) -> jax.Array:
    ...

  def user_vectors(self) -> jax.Array:
    ...

  def encode(self, projected_all: Features) -> tuple[jax.Array, jax.Array]:
    ...

  def auxiliary_loss(self, projected_batch: Features, item_ids: jax.Array,
                     mask: jax.Array | None = None) -> jax.Array:
    ...


class RecommenderBase(nnx.Module):
  """Defaults of the protocol for non-graph models (override what differs)."""

  modalities: tuple[str, ...] = ()
  is_graph: bool = False
  # True when project() maps every modality into ONE common space (same width, same
  # meaning of each coordinate), so cross-modal gradient cosines (A.5/A.6) are
  # meaningful. A property of the architecture, never inferred from array widths.
  shared_projected_space: bool = False
  n_users: int = 0
  n_items: int = 0

  def encode(self, projected_all: Features) -> tuple[jax.Array, jax.Array]:
    """(user_vectors(), item_vectors(projected_all, arange(n_items)))."""
    item_ids = jnp.arange(self.n_items, dtype=jnp.int32)
    return self.user_vectors(), self.item_vectors(projected_all, item_ids)

  def auxiliary_loss(self, projected_batch: Features, item_ids: jax.Array,
                     mask: jax.Array | None = None) -> jax.Array:
    del projected_batch, item_ids, mask
    return jnp.zeros((), jnp.float32)


def ordered_modalities(features: Mapping[str, object]) -> tuple[str, ...]:
  """The canonical modality order: sorted by name (the InteractionData order)."""
  return tuple(sorted(features))


def check_features(features: Features, modalities: Sequence[str],
                   n_rows: int | None = None) -> None:
  """Asserts ``features`` has exactly ``modalities`` (any order) with 2-D arrays."""
  if set(features) != set(modalities):
    raise ValueError(f"features have modalities {sorted(features)}, model expects "
                     f"{list(modalities)}")
  for m in modalities:
    chex.assert_rank(features[m], 2)
    if n_rows is not None:
      chex.assert_axis_dimension(features[m], 0, n_rows)


def concat_modalities(features: Features, modalities: Sequence[str]) -> jax.Array:
  """Concatenates per-modality rows in the model's (sorted) modality order."""
  return jnp.concatenate([features[m] for m in modalities], axis=-1)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Row-wise x / max(||x||_2, eps) (torch.nn.functional.normalize semantics)."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def xavier_normal_table(key: jax.Array, n: int, d: int) -> jax.Array:
  """An (n, d) embedding table with Xavier-normal init (MMRec's initialisation)."""
  return jax.nn.initializers.glorot_normal()(key, (n, d), jnp.float32)


def padded_rows(n: int, multiple: int) -> int:
  """``n`` rounded up to a multiple of ``multiple`` (``n`` itself when ``multiple`` is 1)."""
  multiple = max(int(multiple), 1)
  return -(-int(n) // multiple) * multiple


def padded_table(key: jax.Array, n: int, d: int, multiple: int = 1) -> jax.Array:
  """An ID table of ``n`` real rows padded with zero rows to a multiple of ``multiple``.

  Tables split by rows over the mesh ``model`` axis need a row count the axis divides
  (docs/scale.md). The real rows are exactly :func:`xavier_normal_table` of ``(n, d)``
  (the padding does not change Xavier's fan), so a padded model starts from the values
  of the unpadded one. Padding rows are never sampled, gathered or ranked: every model
  reads its tables through :func:`real_rows` or by real ids, so they keep a zero
  gradient and zero Adam moments. ``multiple`` 1 gives the plain ``(n, d)`` table.
  """
  table = xavier_normal_table(key, n, d)
  pad = padded_rows(n, multiple) - n
  return jnp.pad(table, ((0, pad), (0, 0))) if pad else table


def real_rows(table: jax.Array, n: int) -> jax.Array:
  """The first ``n`` rows of a (possibly padded, :func:`padded_table`) table."""
  return table if table.shape[0] == n else table[:n]


def gather_rows(features: Features, item_ids: jax.Array) -> dict[str, jax.Array]:
  """{m: features[m][item_ids]}."""
  return {m: jnp.take(x, item_ids, axis=0) for m, x in features.items()}


def batch_item_vectors(model: Recommender, features: Features,
                       item_ids: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Item vectors (and projected rows) of ``item_ids`` from raw features of all items.

  Non-graph models project only the requested rows (row-wise projection makes this
  exact) when there are fewer of them than items, else project the table once and
  gather. Graph models run the full forward.

  Returns:
    (item_vecs (n, D), projected rows {m: (n, p_m)}).
  """
  if model.is_graph:
    projected_all = model.project(features)
    if hasattr(model, "encode_rows"):
      item_vecs = model.encode_rows(projected_all, jnp.zeros((0,), jnp.int32), item_ids)[1]
      return item_vecs, gather_rows(projected_all, item_ids)
    _, item_vecs = model.encode(projected_all)
    return jnp.take(item_vecs, item_ids, axis=0), gather_rows(projected_all, item_ids)
  if item_ids.shape[0] < model.n_items:
    projected = model.project(gather_rows(features, item_ids))
  else:
    projected = gather_rows(model.project(features), item_ids)
  return model.item_vectors(projected, item_ids), projected


def bpr_batch_vectors(model: Recommender, features: Features, users: jax.Array,
                      pos: jax.Array, neg: jax.Array):
  """User, positive-item and negative-item vectors of a BPR batch, in one forward.

  Args:
    model: a recommender.
    features: raw features of all items {m: (n_items, d_m)}.
    users, pos, neg: int (B,) ids.

  Returns:
    (u (B, D), pos_vec (B, D), neg_vec (B, D), projected_pos {m: (B, p_m)}).
  """
  b = users.shape[0]
  chex.assert_shape([pos, neg], (b,))
  if model.is_graph:
    projected_all = model.project(features)
    if hasattr(model, "encode_rows"):  # only the batch's rows of the last layer
      u, item_vecs = model.encode_rows(projected_all, users, jnp.concatenate([pos, neg]))
      return u, item_vecs[:b], item_vecs[b:], gather_rows(projected_all, pos)
    user_all, item_all = model.encode(projected_all)
    u = jnp.take(user_all, users, axis=0)
    pos_vec = jnp.take(item_all, pos, axis=0)
    neg_vec = jnp.take(item_all, neg, axis=0)
    return u, pos_vec, neg_vec, gather_rows(projected_all, pos)
  ids = jnp.concatenate([pos, neg])
  item_vecs, projected = batch_item_vectors(model, features, ids)
  u = jnp.take(model.user_vectors(), users, axis=0)
  return u, item_vecs[:b], item_vecs[b:], {m: p[:b] for m, p in projected.items()}


def info_nce(a: jax.Array, b: jax.Array, temperature: jax.Array | float,
             item_ids: jax.Array | None = None, mask: jax.Array | None = None) -> jax.Array:
  """Symmetric InfoNCE between two views of the same rows (METHODS.md A.2, VBPR-MLP).

  logits = a b^T / temperature; the positive of row i is row i of the other view;
  loss = (CE(logits, diag) + CE(logits^T, diag)) / 2, averaged over rows. When
  ``item_ids`` is given, off-diagonal pairs with the same id (duplicates in a batch)
  are removed from the negatives instead of being pushed apart. With ``mask`` (float
  (n,), 0 = padding row) padding rows are neither negatives of the real rows nor part of
  the mean: the value equals that of the real rows alone.

  Args:
    a, b: (n, p) row vectors (the caller normalises them when cosine logits are meant).
    temperature: positive scalar.
    item_ids: optional int (n,) ids of the rows.
    mask: optional float (n,) row weights, 1 real / 0 padding.

  Returns:
    scalar loss.
  """
  chex.assert_equal_shape([a, b])
  chex.assert_rank(a, 2)
  n = a.shape[0]
  logits = (a @ b.T) / temperature
  off_diag = ~jnp.eye(n, dtype=bool)
  if item_ids is not None:
    dup = (item_ids[:, None] == item_ids[None, :]) & off_diag
    logits = jnp.where(dup, -jnp.inf, logits)
  if mask is not None:  # a padding row is nobody's negative (its own diagonal stays finite)
    real = mask > 0
    logits = jnp.where(~(real[:, None] & real[None, :]) & off_diag, -jnp.inf, logits)
  diag_ab = jnp.diagonal(logits)
  loss_ab = jax.nn.logsumexp(logits, axis=1) - diag_ab
  loss_ba = jax.nn.logsumexp(logits, axis=0) - diag_ab
  return 0.5 * (masked_mean(loss_ab, mask) + masked_mean(loss_ba, mask))


def masked_mean(x: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Mean of (n,) ``x`` weighted by the 1/0 row ``mask`` (plain mean without one)."""
  if mask is None:
    return jnp.mean(x)
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


# Largest |logit| for which unit_info_nce may skip the log-sum-exp shift: exp(64) * rows
# stays far below float32's max for any realistic batch, exp(-64) far above its min.
UNIT_LOGIT_BOUND = 64.0


def duplicate_counts(item_ids: jax.Array) -> jax.Array:
  """(n,) how many rows share each row's id (>= 1), by sorting (no n x n compare)."""
  ordered = jnp.sort(item_ids)
  return (jnp.searchsorted(ordered, item_ids, side="right")
          - jnp.searchsorted(ordered, item_ids, side="left"))


def unit_info_nce(a: jax.Array, b: jax.Array, temperature: jax.Array | float,
                  item_ids: jax.Array | None = None,
                  mask: jax.Array | None = None) -> jax.Array:
  """:func:`info_nce` for unit-norm rows, with one exp pass instead of two log-sum-exps.

  Preconditions (the VBPR-MLP auxiliary loss meets both): every row of ``a`` and ``b``
  has unit L2 norm and ``temperature >= 1 / UNIT_LOGIT_BOUND``, so |logit| <= 64 and
  exp needs no shift; rows with the same id are identical (they are the projection of
  the same item), so a duplicate pair's logit equals the diagonal one and the duplicate
  terms are removed in closed form, (count − 1)·exp(diag), instead of by an n x n mask.
  Equal to :func:`info_nce` under these conditions (a test checks value and gradient);
  about 2x cheaper on CPU for 2048 rows. ``mask`` as in :func:`info_nce`: padding
  columns are dropped from the sums (a multiply, no n x n select) and padding rows get
  ids of their own, so they are no real row's duplicates.
  """
  chex.assert_equal_shape([a, b])
  chex.assert_rank(a, 2)
  logits = (a @ b.T) / temperature
  diag = jnp.sum(a * b, axis=-1) / temperature
  e = jnp.exp(logits)
  e_diag = jnp.exp(diag)
  if mask is None:
    row, col = jnp.sum(e, axis=1), jnp.sum(e, axis=0)
  else:
    w = (mask > 0).astype(e.dtype)
    # Real columns (rows) only; a padding row keeps its own diagonal term (finite log).
    row = e @ w + (1.0 - w) * e_diag
    col = w @ e + (1.0 - w) * e_diag
    if item_ids is not None:
      own = -1 - jnp.arange(item_ids.shape[0], dtype=item_ids.dtype)
      item_ids = jnp.where(mask > 0, item_ids, jnp.minimum(jnp.min(item_ids), 0) + own)
  if item_ids is not None:
    extra = (duplicate_counts(item_ids) - 1).astype(e.dtype) * e_diag
    row = jnp.maximum(row - extra, e_diag)  # the true sum is >= its diagonal term
    col = jnp.maximum(col - extra, e_diag)
  return 0.5 * (masked_mean(jnp.log(row) - diag, mask) + masked_mean(jnp.log(col) - diag, mask))


def pairwise_info_nce(views: Sequence[jax.Array], temperature: jax.Array | float,
                      item_ids: jax.Array | None = None, *, nce=None,
                      mask: jax.Array | None = None) -> jax.Array:
  """Mean of ``nce`` (default :func:`info_nce`) over all unordered pairs of views."""
  nce = nce or info_nce
  pairs = [(i, j) for i in range(len(views)) for j in range(i + 1, len(views))]
  if not pairs:
    return jnp.zeros((), jnp.float32)
  return sum(nce(views[i], views[j], temperature, item_ids, mask=mask)
             for i, j in pairs) / len(pairs)
