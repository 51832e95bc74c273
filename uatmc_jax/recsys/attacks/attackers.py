"""Promotion attackers: FGSM and PGD on the A.4 objective (METHODS.md A.4, A.6).

Reference settings:
  FGSM: δ^m = ε_m · sign(∇_{δ^m} L(0)), ε_m = ε·||x_t^m||₂ (relative), margin 10.
  PGD:  10 iterations, step 1.25·ε/10, sign gradient, projection ||δ^m||∞ ≤ ε
        (absolute), no random start, margin 1.
The ascent direction is chosen by name (``alignment``; "none" = naive; see
``uatmc_jax.recsys.attacks.alignment``) so aligned PGD (A.6) is one field of the config.
The hinge of the objective is ``surrogate`` ("relu", A.4; "softplus", a smooth
surrogate with temperature τ, see ``objective``), for the naive and every aligned attacker.
``run_attack`` is pure: the runner vmaps it over targets.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Mapping

import jax
import jax.numpy as jnp

from uatmc_jax.core import errors
from uatmc_jax.recsys.attacks import alignment as alignment_lib
from uatmc_jax.recsys.attacks import objective as objective_lib

@dataclasses.dataclass(frozen=True)
class PromotionAttack:
  """One promotion attacker (hashable: it keys the compiled chunk function).

  Attributes:
    method: "fgsm" or "pgd".
    epsilon: budget ε.
    budget: "relative" (ε_m = ε·||x_t^m||₂, FGSM's) or "absolute" (ε_m = ε, PGD's).
    steps: PGD iterations (FGSM: 1).
    step_scale: PGD step = step_scale · ε_m / steps (1.25).
    margin: hinge margin (FGSM 10, PGD 1).
    k: the top-K of the objective (50).
    modalities: attacked modalities (None = all); others keep δ = 0.
    alignment: ascent direction name ("none", "cosine", "pcgrad_groups", ...).
    align_weight: λ_align of the cosine reward.
    group_temperature: τ of "shared_groups".
    surrogate: the hinge of the objective, "relu" (A.4) or "softplus" (τ·softplus(x/τ),
      a smooth surrogate under which A.6's cosine reward has a gradient on models
      linear in the projected features; see ``objective``). Hit@K is unchanged.
    temperature: τ of the softplus surrogate (> 0).
  """
  method: str = "pgd"
  epsilon: float = 0.05
  budget: str = "absolute"
  steps: int = 10
  step_scale: float = 1.25
  margin: float = 1.0
  k: int = 50
  modalities: tuple[str, ...] | None = None
  alignment: str = "none"
  align_weight: float = 1.0
  group_temperature: float = 0.1
  surrogate: str = "relu"
  temperature: float = 0.1

  def __post_init__(self):
    objective_lib.check_surrogate(self.surrogate, self.temperature)
    if self.method not in ("fgsm", "pgd"):
      raise errors.ConfigError(f"attack method must be 'fgsm' or 'pgd', got {self.method!r}")
    if self.budget not in ("relative", "absolute"):
      raise errors.ConfigError(f"budget must be 'relative' or 'absolute', got {self.budget!r}")
    if not self.epsilon >= 0:
      raise errors.ConfigError(f"epsilon must be >= 0, got {self.epsilon}")
    if self.steps < 1 or self.k < 1:
      raise errors.ConfigError("steps and k must be >= 1")
    alignment_lib.get_ascent_direction(self.alignment)

  @property
  def display_name(self) -> str:
    """The attacker's name in progress lines: its method, plus its alignment if any."""
    return self.method + ("" if self.alignment == "none" else f"+{self.alignment}")

  def without_budget(self) -> "PromotionAttack":
    """The attacker with ε cleared: the key of its compiled programs (ε is an argument)."""
    return dataclasses.replace(self, epsilon=0.0)

  @property
  def clean_objective(self) -> tuple:
    """What the A.5 diagnostics at δ = 0 depend on besides the model, the context, the
    groups and the target: the objective's top-K, hinge and attacked modalities (not
    the method, steps, alignment or budget)."""
    return (self.k, self.margin, self.surrogate, self.temperature, self.modalities)


def fgsm_attack(epsilon: float, **overrides) -> PromotionAttack:
  """A.4 FGSM: one relative-budget sign step, margin 10."""
  kw = dict(method="fgsm", epsilon=epsilon, budget="relative", steps=1, margin=10.0)
  kw.update(overrides)
  return PromotionAttack(**kw)


def pgd_attack(epsilon: float, **overrides) -> PromotionAttack:
  """A.4 PGD: 10 sign steps of 1.25·ε/10, absolute L∞ ball, no random start, margin 1."""
  kw = dict(method="pgd", epsilon=epsilon, budget="absolute", steps=10, step_scale=1.25,
            margin=1.0)
  kw.update(overrides)
  return PromotionAttack(**kw)


def budgets(attack: PromotionAttack, x_t: Mapping[str, jax.Array],
            epsilon: jax.Array | float | None = None) -> dict[str, jax.Array]:
  """ε_m per attacked modality for a target with (clean, attacked-space) rows x_t.

  ``epsilon`` (may be traced) overrides ``attack.epsilon``: the runner passes the budget
  as an argument so that one compiled function serves every budget.
  """
  eps = attack.epsilon if epsilon is None else epsilon
  if attack.budget == "relative":
    return {m: (eps * jnp.linalg.norm(x)).astype(x.dtype) for m, x in x_t.items()}
  return {m: jnp.asarray(eps, x.dtype) for m, x in x_t.items()}


def project_linf(delta: Mapping[str, jax.Array],
                 eps: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Projection onto {||δ^m||∞ ≤ ε_m} for every modality."""
  return {m: jnp.clip(d, -eps[m], eps[m]) for m, d in delta.items()}


def run_attack(attack: PromotionAttack, per_user_loss_fn, x_t: Mapping[str, jax.Array],
               group_weights: jax.Array, probe=None, monitor=None, epsilon=None):
  """The perturbation {m: (d_m,)} of one target (pure; vmap it over targets).

  Args:
    attack: the attacker.
    per_user_loss_fn: δ -> (n_anchor,) ℓ_u (margin already bound).
    x_t: {m: (d_m,)} clean rows of the attacked modalities (for relative budgets).
    group_weights: (n_anchor, G) user groups (used by group-level alignments).
    probe: None, or ``alignment.Probe(probe_loss_fn(δ, η), η0, lift)`` for attacks
      outside the projected space (the cosine alignments compare modalities there).
    monitor: None, or δ -> bool scalar evaluated at every point where the loss is
      differentiated (δ = 0 and each PGD iterate).
    epsilon: None (``attack.epsilon``) or the budget ε as a (traced) scalar.

  Returns:
    δ, inside the budget; ``(δ, all monitor values true)`` when ``monitor`` is given.
  """
  direction_fn = functools.partial(
      alignment_lib.get_ascent_direction(attack.alignment), per_user_loss_fn,
      group_weights=group_weights, align_weight=attack.align_weight,
      group_temperature=attack.group_temperature, probe=probe)
  eps = budgets(attack, x_t, epsilon)
  delta0 = {m: jnp.zeros_like(x) for m, x in x_t.items()}
  check = monitor or (lambda _: jnp.asarray(True))
  if attack.method == "fgsm":
    g = direction_fn(delta0)
    delta, ok = {m: eps[m] * jnp.sign(g[m]) for m in x_t}, check(delta0)
  else:
    step = {m: attack.step_scale * eps[m] / attack.steps for m in x_t}

    def body(_, carry):
      delta, ok = carry
      g = direction_fn(delta)
      return (project_linf({m: delta[m] + step[m] * jnp.sign(g[m]) for m in x_t}, eps),
              ok & check(delta))

    delta, ok = jax.lax.fori_loop(0, attack.steps, body, (delta0, jnp.asarray(True)))
  return delta if monitor is None else (delta, ok)

