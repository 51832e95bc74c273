"""MS-PGD: manifold-constrained PGD, MCAT's inner maximisation (METHODS.md B.4).

    x' = argmax_{||δ||∞ ≤ ε} L(f(x+δ), y) − λ_man · d_My(φ(x+δ))

with L the base attack loss (CE for MCAT) and d_My the class-conditional manifold
distance of ``uatmc_jax.longtail.manifold``. The whole objective is differentiated —
the manifold term included (its φ-gradient is 2(φ − G_y(z*)) by the envelope theorem) —
so λ_man really steers the adversary; the reference code computed d_My under no-grad on
detached features, which reduced its attack to plain PGD.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from uatmc_jax.longtail import manifold as manifold_lib
from uatmc_jax.longtail.attacks import linf

FeatureFn = Callable[[jax.Array], jax.Array]        # x (B, H, W, 3) -> φ (B, d_f)
HeadLossFn = Callable[[jax.Array], jax.Array]       # φ (B, d_f) -> per-example loss (B,)


def manifold_constrained_loss(*, features_fn: FeatureFn, head_loss_fn: HeadLossFn,
                              labels: jax.Array, manifold_params: manifold_lib.ManifoldParams,
                              manifold_weight, latent_steps: int,
                              latent_step_size: float) -> Callable[[jax.Array], jax.Array]:
  """The per-example MS-PGD objective x' -> L(f(x'), y) − λ_man·d_My(φ(x')), shape (B,).

  Args:
    features_fn: φ with BatchNorm in inference mode.
    head_loss_fn: base attack loss as a function of φ (e.g. CE of the classifier's logits).
    labels: (B,) classes selecting the manifold of each example.
    manifold_params: fitted per-class encoders/generators.
    manifold_weight: λ_man (a float or a traced scalar; 0 gives the base loss exactly).
    latent_steps, latent_step_size: T_z and the latent step size of d_My.
  """

  def loss_fn(x_adv: jax.Array) -> jax.Array:
    phi = features_fn(x_adv)
    distance = manifold_lib.manifold_distance_from_features(
        manifold_params, phi, labels, num_steps=latent_steps, step_size=latent_step_size)
    return head_loss_fn(phi) - manifold_weight * distance

  return loss_fn


def ms_pgd_attack(*, features_fn: FeatureFn, head_loss_fn: HeadLossFn, x: jax.Array,
                  labels: jax.Array, manifold_params: manifold_lib.ManifoldParams,
                  manifold_weight, latent_steps: int = 5, latent_step_size: float = 0.01,
                  epsilon: float = 8 / 255, step_size: float = 2 / 255, num_steps: int = 10,
                  key: jax.Array | None = None, random_start: bool = True) -> jax.Array:
  """MS-PGD (B.4): ``linf.pgd_attack`` on the manifold-constrained objective.

  Returns x_adv (B, H, W, 3) inside the ε-ball and the [0, 1] box (stop-gradient).
  """
  loss_fn = manifold_constrained_loss(
      features_fn=features_fn, head_loss_fn=head_loss_fn, labels=labels,
      manifold_params=manifold_params, manifold_weight=jnp.asarray(manifold_weight, jnp.float32),
      latent_steps=latent_steps, latent_step_size=latent_step_size)
  return linf.pgd_attack(loss_fn, x, epsilon=epsilon, step_size=step_size,
                         num_steps=num_steps, key=key, random_start=random_start)
