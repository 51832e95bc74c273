"""Composable L∞ attack pieces: initialise, project, step, and PGD over them.

METHODS.md B.3 (PGD-10 in training) and B.5 (PGD-20 / CW∞ in evaluation).
Written in the style of DeepMind's `adversarial_robustness/jax/attacks.py`: an attack
is a composition of an initialiser, a sign-gradient ascent step and a projection onto
the ε-ball intersected with the image box, iterated with `lax.fori_loop`. The loss is a
swappable function `loss_fn(x_adv) -> (B,)` to be *maximised* (cross-entropy, CW
margin, TRADES KL, MCAT's CE − λ·manifold distance, ...); see `attack_losses.py`.

Shapes: images are (B, H, W, C) (any trailing shape works) with values in
[clip_min, clip_max]; ε, step sizes are scalars or arrays broadcastable to x.
"""

from typing import Callable, Optional

import chex
import jax
import jax.numpy as jnp

LossFn = Callable[[jax.Array], jax.Array]


def linf_project(x_adv: jax.Array, x: jax.Array, epsilon,
                 clip_min: float = 0., clip_max: float = 1.) -> jax.Array:
  """Projects x_adv onto {x' : ||x' − x||∞ ≤ ε} ∩ [clip_min, clip_max]^d.

  The two sets are boxes, so the projection onto their intersection is the
  coordinate-wise clip to the intersected box (which is never empty when x itself is
  inside the image box).
  """
  chex.assert_equal_shape([x_adv, x])
  lower = jnp.maximum(x - epsilon, clip_min)
  upper = jnp.minimum(x + epsilon, clip_max)
  return jnp.clip(x_adv, lower, upper)


def linf_random_init(key: jax.Array, x: jax.Array, epsilon,
                     clip_min: float = 0., clip_max: float = 1.) -> jax.Array:
  """Uniform random start in the ε-ball around x, clipped to the image box."""
  noise = jax.random.uniform(key, x.shape, x.dtype, minval=-1., maxval=1.)
  return linf_project(x + epsilon * noise, x, epsilon, clip_min, clip_max)


def sign_gradient_step(x_adv: jax.Array, grad: jax.Array, step_size) -> jax.Array:
  """One L∞ steepest-ascent step: x + α·sign(∇)."""
  return x_adv + step_size * jnp.sign(grad)


def loss_gradient(loss_fn: LossFn, x_adv: jax.Array) -> jax.Array:
  """∇_x Σ_b loss_fn(x)_b: per-example gradients since examples are independent."""
  return jax.grad(lambda z: jnp.sum(loss_fn(z)))(x_adv)


def pgd_attack(loss_fn: LossFn,
               x: jax.Array,
               *,
               epsilon,
               step_size,
               num_steps: int,
               key: Optional[jax.Array] = None,
               random_start: bool = True,
               clip_min: float = 0.,
               clip_max: float = 1.) -> jax.Array:
  """L∞ projected gradient ascent (Madry et al. 2018), METHODS.md B.3/B.5.

  Args:
    loss_fn: x_adv (B, ...) -> per-example loss (B,) to maximise. It must treat
      examples independently (no batch statistics; BatchNorm in inference mode).
    x: clean inputs (B, ...) inside [clip_min, clip_max].
    epsilon: L∞ radius (scalar, or broadcastable to x for per-example budgets).
    step_size: ascent step α (same broadcasting as epsilon).
    num_steps: number of PGD iterations (static).
    key: PRNG key for the random start; required when random_start is True.
    random_start: start uniformly in the ball (True) or at x (False).
    clip_min, clip_max: the image box.

  Returns:
    x_adv (B, ...) with ||x_adv − x||∞ ≤ ε and inside the box, wrapped in
    `stop_gradient` (the attack is not differentiated through).

  References:
    Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks",
    ICLR 2018.
  """
  if random_start:
    if key is None:
      raise ValueError("pgd_attack: random_start=True needs a PRNG `key`.")
    x_adv = linf_random_init(key, x, epsilon, clip_min, clip_max)
  else:
    x_adv = x

  def body(_, x_cur):
    grad = loss_gradient(loss_fn, x_cur)
    x_next = sign_gradient_step(x_cur, grad, step_size)
    return linf_project(x_next, x, epsilon, clip_min, clip_max)

  x_adv = jax.lax.fori_loop(0, num_steps, body, x_adv)
  return jax.lax.stop_gradient(x_adv)
