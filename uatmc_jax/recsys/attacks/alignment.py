"""Ascent directions with multimodal coordination (METHODS.md A.6), selectable by name.

Every entry of ``ASCENT_DIRECTIONS`` maps (per-user loss fn, δ, group weights, options)
to a direction {m: (d_m,)} on which the attack takes its sign step:

* ``"none"``: ∇_δ L, L = mean_u ℓ_u (the naive attacker).
* ``"cosine"`` (the paper's / reference mechanism, the default of ``pgd_aligned``):
  ∇_δ J with J(δ) = L(δ) + λ_align · mean_{pairs m<m'} cos(∇_{x̂^m} L, ∇_{x̂^m'} L) — a
  gradient of a function of gradients (``jax.grad`` of a function calling
  ``jax.grad``). The cosine compares the modalities in their shared projected space
  (for the reference's projected-space attack that is ∇_{δ^m} L; for raw-feature
  attacks the gradient w.r.t. an additive probe on x̂^m at the perturbed point, so
  the second-order term runs through the projection MLPs). Only modality pairs of
  equal projected width enter the mean; with none, J = L. A target whose gradient is zero contributes cosine 0 (the
  reference's average over zero-gradient rows is not reproduced: every target is its
  own problem here).
  Note: when the score is piecewise linear in x̂ (VBPR-MLP: the fusion layer is linear,
  the hinge and the K-th-score clip are piecewise linear), the Hessian of L in x̂ is
  zero almost everywhere, so this reward has zero gradient and the step equals the
  naive one — in the projected space and equally for raw-feature attacks, because the
  probe gradient ∇_{x̂} L does not depend on how x̂ is reached (use
  ``"cosine_pushforward"`` there). It can act only where the score is curved in x̂:
  smooth or graph models (MMGCN, whose user and item vectors both move with x̂).
  With the attacker's smooth surrogate (``PromotionAttack(surrogate="softplus")``, the
  hinge replaced by τ·softplus(x/τ)) L is curved in x̂ on VBPR-MLP too, and the reward
  has a gradient there (tests/test_surrogate.py).
* ``"cosine_pushforward"`` (this project's variant for raw-feature attacks): the same
  J, but each modality's gradient enters the cosine as the projected-space displacement
  its raw ascent step causes, v^m = J_m ∇_{δ^m} L with J_m the Jacobian of the lift
  x^m -> x̂^m at x_t^m + δ^m (``jax.jvp`` of the lift; v^m = J_m J_m^T ∇_{x̂^m} L). The
  probe-based ``"cosine"`` compares ∇_{x̂} L, which on a score linear in x̂ (VBPR-MLP)
  does not depend on how x̂ is reached, so it is inert in raw space too; v^m moves with
  δ through the projection MLPs' curvature (LayerNorm, ReLU pattern, L2 normalisation),
  so this reward steers a raw-space VBPR-MLP attack. With δ in the projected space
  (J_m = I) it is the paper's reward. Needs ``probe.lift`` (raw attacks).
* ``"pcgrad_groups"`` (this project's extension): per-group gradients g_k^m (vmap over
  groups); in every modality the component of each group's gradient that conflicts
  with another group's (negative inner product) is removed, PCGrad-style, using the
  original gradients (deterministic, order-free), then the groups are summed.
* ``"shared_groups"`` (extension): make every modality serve the same user groups:
  group weights α = softmax(mean_m w^m / τ), w_k^m = <g_k^m, g^m>/||g^m||², and
  direction^m = Σ_k α_k g_k^m. τ → 0 focuses all modalities on the one group that the
  modalities jointly serve best; τ → ∞ gives (a multiple of) the naive gradient.
"""
from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp

from uatmc_jax.core import errors
from uatmc_jax.recsys.attacks import mismatch

Direction = dict[str, jax.Array]
# Alignments whose reward is a cross-modal cosine: they need a model with a shared
# projected space (``Recommender.shared_projected_space``).
SHARED_SPACE_ALIGNMENTS = ("cosine", "cosine_pushforward")


class Probe(NamedTuple):
  """How a raw-feature attack reaches the shared projected space.

  loss_fn: (δ, η) -> (n,) per-user loss with an additive η^m on x̂^m.
  eta0: {m: zeros (p_m,)}, the probe's evaluation point.
  lift: optional δ -> {m: x̂^m (p_m,)}, the target's projected rows at x_t + δ (used by
    ``cosine_pushforward``).
  """
  loss_fn: Callable
  eta0: dict
  lift: Optional[Callable] = None


def mean_loss_fn(per_user_loss_fn):
  return lambda delta: jnp.mean(per_user_loss_fn(delta))


def comparable_pairs(delta: Mapping[str, jax.Array]) -> tuple[tuple[str, str], ...]:
  """Modality pairs whose perturbations share a space (same shape)."""
  return tuple((a, b) for a, b in mismatch.modality_pairs(tuple(delta))
               if delta[a].shape == delta[b].shape)


def mean_pairwise_cosine(grads: Mapping[str, jax.Array],
                         pairs: tuple[tuple[str, str], ...]) -> jax.Array:
  """mean over ``pairs`` of cos(grads[a], grads[b]) (0 if there are no pairs)."""
  if not pairs:
    return jnp.zeros((), jnp.float32)
  return jnp.mean(jnp.stack([mismatch.safe_cosine(grads[a], grads[b]) for a, b in pairs]))


def shared_space_gradient(per_user_loss_fn, delta, probe=None) -> Direction:
  """∇L in the shared (projected) space at the perturbation δ.

  Args:
    per_user_loss_fn: δ -> (n,) per-user loss.
    delta: {m: (d_m,)} the attacked-space perturbation.
    probe: None when δ already lives in the projected space (the gradient is ∇_δ L);
      else a ``Probe(loss_fn, eta0)`` with loss_fn(δ, η) -> (n,) the loss when an
      extra η^m is added to the projected features x̂^m, and eta0 = {m: zeros (p_m,)}:
      the gradient is ∇_η L(δ, η) at η = 0 (raw-feature attacks compare modalities in
      the projected space they share).
  """
  if probe is None:
    return jax.grad(mean_loss_fn(per_user_loss_fn))(dict(delta))
  return jax.grad(lambda e: jnp.mean(probe.loss_fn(delta, e)))(dict(probe.eta0))


def pushforward_gradient(per_user_loss_fn, delta, probe=None) -> Direction:
  """v^m = J_m ∇_{δ^m} L: the projected-space displacement of a raw gradient step.

  J_m is the Jacobian of the lift δ^m -> x̂^m at the perturbed point (``probe.lift``);
  with δ in the projected space (``probe`` None) J_m = I and v = ∇_δ L.
  """
  grad = jax.grad(mean_loss_fn(per_user_loss_fn))(dict(delta))
  if probe is None:
    return grad
  if probe.lift is None:
    raise errors.ConfigError("alignment 'cosine_pushforward' on a raw-feature attack needs "
                             "the probe's lift (Probe.lift), got none")
  _, moved = jax.jvp(probe.lift, (dict(delta),), (grad,))
  return moved


def _cosine_objective(directions_fn, per_user_loss_fn, align_weight: float, probe):
  """L(δ) + λ_align · mean over comparable modality pairs of cos(d^m, d^m'), d = directions_fn(δ)."""
  loss = mean_loss_fn(per_user_loss_fn)

  def objective(delta):
    directions = directions_fn(per_user_loss_fn, delta, probe)
    return loss(delta) + align_weight * mean_pairwise_cosine(directions,
                                                             comparable_pairs(directions))

  return objective


def cosine_reward_objective(per_user_loss_fn, align_weight: float, probe=None):
  """J(δ) = L(δ) + λ_align · mean_pairs cos(∇_{x̂^m} L, ∇_{x̂^m'} L)  (A.6).

  The gradients in the cosine are taken in the projected space (= ∇_{δ^m} L for the
  reference's projected-space attack; see ``shared_space_gradient``).
  """
  return _cosine_objective(shared_space_gradient, per_user_loss_fn, align_weight, probe)


def pushforward_cosine_objective(per_user_loss_fn, align_weight: float, probe=None):
  """J(δ) = L(δ) + λ_align · mean_pairs cos(J_m ∇_{δ^m} L, J_m' ∇_{δ^m'} L)."""
  return _cosine_objective(pushforward_gradient, per_user_loss_fn, align_weight, probe)


def naive_direction(per_user_loss_fn, delta, group_weights, *, align_weight,
                    group_temperature, probe=None) -> Direction:
  del group_weights, align_weight, group_temperature, probe
  return jax.grad(mean_loss_fn(per_user_loss_fn))(dict(delta))


def cosine_direction(per_user_loss_fn, delta, group_weights, *, align_weight,
                     group_temperature, probe=None) -> Direction:
  del group_weights, group_temperature
  return jax.grad(cosine_reward_objective(per_user_loss_fn, align_weight, probe))(dict(delta))


def cosine_pushforward_direction(per_user_loss_fn, delta, group_weights, *, align_weight,
                                group_temperature, probe=None) -> Direction:
  del group_weights, group_temperature
  return jax.grad(pushforward_cosine_objective(per_user_loss_fn, align_weight,
                                               probe))(dict(delta))


def pcgrad_combine(group_grads: jax.Array) -> jax.Array:
  """Σ_k of PCGrad-projected per-group gradients (G, d) -> (d,).

  g_k' = g_k − Σ_{j≠k, <g_k,g_j> < 0} <g_k, g_j>/||g_j||² g_j (projections against the
  original gradients, so the result does not depend on the group order).
  """
  dots = group_grads @ group_grads.T
  norms2 = jnp.diagonal(dots)
  g = group_grads.shape[0]
  conflict = (dots < 0) & ~jnp.eye(g, dtype=bool) & (norms2[None, :] > 0)
  coef = jnp.where(conflict, dots / jnp.where(norms2[None, :] > 0, norms2[None, :], 1.0), 0.0)
  return jnp.sum(group_grads - coef @ group_grads, axis=0)


def pcgrad_groups_direction(per_user_loss_fn, delta, group_weights, *, align_weight,
                            group_temperature, probe=None) -> Direction:
  del align_weight, group_temperature, probe
  _, group_grads = mismatch.per_group_gradients(per_user_loss_fn, delta, group_weights)
  return {m: pcgrad_combine(group_grads[m]) for m in delta}


def shared_group_weights(group_grads: Mapping[str, jax.Array],
                         temperature: float) -> jax.Array:
  """α = softmax(mean_m w^m / τ) over groups, from per-group gradients {m: (G, d_m)}."""
  shares = []
  for gm in group_grads.values():
    full = jnp.sum(gm, axis=0)
    n2 = jnp.sum(full * full)
    shares.append(jnp.where(n2 > 0, gm @ full / jnp.where(n2 > 0, n2, 1.0), 0.0))
  mean_share = jnp.mean(jnp.stack(shares), axis=0)
  return jax.nn.softmax(mean_share / temperature)


def shared_groups_direction(per_user_loss_fn, delta, group_weights, *, align_weight,
                            group_temperature, probe=None) -> Direction:
  del align_weight, probe
  _, group_grads = mismatch.per_group_gradients(per_user_loss_fn, delta, group_weights)
  alpha = shared_group_weights(group_grads, group_temperature)
  return {m: alpha @ group_grads[m] for m in delta}


ASCENT_DIRECTIONS: dict[str, Callable[..., Direction]] = {
    "none": naive_direction,
    "cosine": cosine_direction,
    "cosine_pushforward": cosine_pushforward_direction,
    "pcgrad_groups": pcgrad_groups_direction,
    "shared_groups": shared_groups_direction,
}


def get_ascent_direction(name: str) -> Callable[..., Direction]:
  if name not in ASCENT_DIRECTIONS:
    raise errors.ConfigError(f"alignment must be one of {sorted(ASCENT_DIRECTIONS)}, "
                             f"got {name!r}")
  return ASCENT_DIRECTIONS[name]
