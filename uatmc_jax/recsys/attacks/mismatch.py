"""Cross-modal gradient mismatch diagnostics (METHODS.md A.5).

With L(δ) = mean_{u∈A} ℓ_u(δ) the promotion objective over anchor users, each
modality's gradient g^m = (1/|A|) Σ_u ∇_{δ^m} ℓ_u is a sum over users. Per user group
G_k the group gradient is g_k^m = (1/|A|) Σ_{u∈G_k} ∇_{δ^m} ℓ_u (so Σ_k g_k^m = g^m),
computed for all groups at once as ``jax.vmap`` over groups of one VJP. Per target:

* cos(g^m, g^m') for every modality pair living in one shared space (the model's
  ``shared_projected_space``, and equal widths);
* each group's share of each modality's gradient w_k^m = <g_k^m, g^m> / ||g^m||²
  (Σ_k w_k^m = 1), the dominant group argmax_k w_k^m, and whether it differs between
  modalities (the mismatch);
* per-user score gains of each modality's step, a_u = ∇_{δ^m} ℓ_u · s^m (one JVP per
  modality gives all users at once), and their Pearson correlation across the users
  with any non-zero gain, for every modality pair. At δ = 0 the step s^m is the sign
  step sign(g^m) (the scale does not matter for a correlation); at the attacker's final
  δ ≠ 0 it is that δ^m itself (``gain_step``), the step the attack actually took — not
  sign(∇L) at the perturbed point, which is the *next* step's direction.

Everything works for any number of modalities (pairs in ``itertools.combinations``
order of the attacked modalities).
"""
from __future__ import annotations

import itertools
from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PerUserLoss = Callable[[Mapping[str, jax.Array]], jax.Array]

_TINY = 1e-30


def modality_pairs(modalities: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
  return tuple(itertools.combinations(modalities, 2))


def per_target_mean(x) -> np.ndarray:
  """Host-side: per row (target) the mean of a diagnostic over its finite entries
  (modality pairs); NaN for a row without any (no shared space, no active user)."""
  x = np.asarray(x, np.float64)
  ok = np.isfinite(x)
  n = ok.sum(axis=1)
  return np.where(n > 0, np.where(ok, x, 0.0).sum(axis=1) / np.maximum(n, 1), np.nan)


def safe_cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  """<a, b> / (||a|| ||b||), 0 when either is 0; differentiable (no NaN) everywhere."""
  na2, nb2 = jnp.sum(a * a), jnp.sum(b * b)
  return jnp.sum(a * b) / jnp.sqrt(jnp.maximum(na2 * nb2, _TINY))


def per_group_gradients(per_user_loss_fn: PerUserLoss, delta: Mapping[str, jax.Array],
                        group_weights: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-group gradients g_k^m of L = mean_u ℓ_u, via vmap over groups of one VJP.

  Args:
    per_user_loss_fn: δ -> ℓ (n_users,).
    delta: {m: (d_m,)} point of evaluation.
    group_weights: (n_users, G) membership weights (one-hot for a partition).

  Returns:
    (ℓ (n_users,), {m: (G, d_m)}); summing over groups gives ∇L when the weights
    sum to 1 per user.
  """
  losses, vjp_fn = jax.vjp(per_user_loss_fn, dict(delta))
  n = losses.shape[0]
  cotangents = jnp.transpose(group_weights).astype(losses.dtype) / n
  (grads,) = jax.vmap(vjp_fn)(cotangents)
  return losses, grads


class MismatchDiagnostics(NamedTuple):
  """Per-target A.5 diagnostics (leading axes added by vmap over targets).

  cosine: (P,) cos(g^m, g^m') per modality pair; NaN without a shared projected space
    (``shared_space=False``, or the widths differ) or when a gradient is zero.
  shares: (M, G) w_k^m; NaN rows for modalities with a zero gradient.
  dominant: (M,) argmax_k w_k^m (-1 when the gradient is zero).
  dominant_differs: () True when every modality has a gradient and their dominant
    groups are not all equal.
  gain_correlation: (P,) Pearson correlation of the per-user gains a_u, b_u over the
    users with a non-zero gain (NaN with fewer than 2 such users or zero variance).
  active_users: () number of anchor users with a non-zero gain in some modality.
  """
  cosine: jax.Array
  shares: jax.Array
  dominant: jax.Array
  dominant_differs: jax.Array
  gain_correlation: jax.Array
  active_users: jax.Array


def pearson_masked(a: jax.Array, b: jax.Array, mask: jax.Array) -> jax.Array:
  """Pearson correlation of a and b over the entries where ``mask`` is True."""
  w = mask.astype(a.dtype)
  n = jnp.sum(w)
  safe_n = jnp.maximum(n, 1.0)
  ma, mb = jnp.sum(w * a) / safe_n, jnp.sum(w * b) / safe_n
  da, db = (a - ma) * w, (b - mb) * w
  cov = jnp.sum(da * db)
  var = jnp.sum(da * da) * jnp.sum(db * db)
  ok = (n >= 2) & (var > 0)
  return jnp.where(ok, cov / jnp.sqrt(jnp.where(ok, var, 1.0)), jnp.nan)


def mismatch_diagnostics(per_user_loss_fn: PerUserLoss, delta: Mapping[str, jax.Array],
                         group_weights: jax.Array, probe=None, *,
                         shared_space: bool = True,
                         gain_step: Mapping[str, jax.Array] | None = None
                         ) -> MismatchDiagnostics:
  """The A.5 diagnostics of one target at perturbation ``delta`` (usually 0).

  Args:
    per_user_loss_fn: δ -> per-anchor-user promotion loss ℓ (n_users,).
    delta: {m: (d_m,)} for the attacked modalities (their order = dict order).
    group_weights: (n_users, G) group membership (one-hot rows).
    probe: None when δ lives in the projected space; else an ``alignment.Probe``
      (see ``alignment.shared_space_gradient``): cosines and group shares are then
      measured in the projected space, gains still for the attacked-space steps.

  Returns:
    ``MismatchDiagnostics``.
  """
  modalities = tuple(delta)
  if probe is None:
    _, group_grads = per_group_gradients(per_user_loss_fn, delta, group_weights)
    step_grads = None
  else:
    _, group_grads = per_group_gradients(lambda e: probe.loss_fn(delta, e), probe.eta0,
                                         group_weights)
    step_grads = jax.grad(lambda d: jnp.mean(per_user_loss_fn(d)))(dict(delta))
  full = {m: jnp.sum(group_grads[m], axis=0) for m in modalities}
  norms2 = {m: jnp.sum(full[m] ** 2) for m in modalities}
  if step_grads is None:
    step_grads = full

  shares, dominant, has_grad = [], [], []
  for m in modalities:
    nonzero = norms2[m] > 0
    w = group_grads[m] @ full[m] / jnp.where(nonzero, norms2[m], 1.0)
    shares.append(jnp.where(nonzero, w, jnp.nan))
    dominant.append(jnp.where(nonzero, jnp.argmax(w), -1))
    has_grad.append(nonzero)
  shares = jnp.stack(shares)
  dominant = jnp.stack(dominant).astype(jnp.int32)
  all_grad = jnp.all(jnp.stack(has_grad))
  differs = all_grad & jnp.any(dominant != dominant[0])

  gains = {}
  zeros = {m: jnp.zeros_like(delta[m]) for m in modalities}
  for m in modalities:
    tangent = dict(zeros)
    tangent[m] = jnp.sign(step_grads[m]) if gain_step is None else gain_step[m]
    gains[m] = jax.jvp(per_user_loss_fn, (dict(delta),), (tangent,))[1]
  active = jnp.zeros_like(gains[modalities[0]], dtype=bool)
  for m in modalities:
    active = active | (gains[m] != 0)

  pairs = modality_pairs(modalities)
  cosines, correlations = [], []
  for a, b in pairs:
    if shared_space and full[a].shape == full[b].shape:
      cos = jnp.where((norms2[a] > 0) & (norms2[b] > 0), safe_cosine(full[a], full[b]),
                      jnp.nan)
    else:
      cos = jnp.asarray(jnp.nan, full[a].dtype)
    cosines.append(cos)
    correlations.append(pearson_masked(gains[a], gains[b], active))
  empty = jnp.zeros((0,), jnp.float32)
  return MismatchDiagnostics(
      cosine=jnp.stack(cosines) if pairs else empty,
      shares=shares,
      dominant=dominant,
      dominant_differs=differs,
      gain_correlation=jnp.stack(correlations) if pairs else empty,
      active_users=jnp.sum(active).astype(jnp.int32))


class CleanDiagnosticsStore:
  """The A.5 diagnostics at δ = 0 of the last targets run per objective, for reuse.

  At δ = 0 they depend on the model, the anchors' context, the groups, the target and
  the objective (top-K, hinge, attacked modalities), not on the attacker's method,
  steps, alignment or budget. Entries belong to one ``owner`` (the runner passes
  (surface, context, groups), compared by identity); another owner drops them.
  """

  def __init__(self):
    self._owner: tuple | None = None
    self._entries: dict = {}  # objective -> (targets, their MismatchDiagnostics)

  def _of(self, owner: tuple) -> dict:
    if self._owner is None or any(a is not b for a, b in zip(self._owner, owner)):
      self._owner, self._entries = owner, {}
    return self._entries

  def get(self, owner: tuple, objective, targets: np.ndarray):
    """The stored diagnostics of ``targets`` in their order (a leading target axis), or
    None unless every one of them is stored for ``objective``."""
    entry = self._of(owner).get(objective)
    if entry is None:
      return None
    stored, diagnostics = entry
    order = np.argsort(stored, kind="stable")
    rows = order[np.minimum(np.searchsorted(stored, targets, sorter=order), len(stored) - 1)]
    if not np.array_equal(stored[rows], targets):
      return None
    return jax.tree.map(lambda a: a[rows], diagnostics)

  def put(self, owner: tuple, objective, targets: np.ndarray, diagnostics) -> None:
    """Keeps copies of ``diagnostics`` (leading axis = ``targets``) for ``objective``."""
    self._of(owner)[objective] = (np.array(targets), jax.tree.map(np.array, diagnostics))
