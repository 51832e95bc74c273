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

from typing import Callable, Optional, Union

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
  # drawn 1-D and reshaped: the same values as a draw of x.shape, cheaper to compile
  noise = jax.random.uniform(key, (x.size,), x.dtype, minval=-1., maxval=1.).reshape(x.shape)
  return linf_project(x + epsilon * noise, x, epsilon, clip_min, clip_max)


# TRADES' and MART's official start: x + 0.001·N(0, 1) (Zhang et al. 2019; Wang et
# al. 2020), instead of Madry's uniform start in the ball.
GAUSSIAN_START_STD = 1e-3


def linf_gaussian_init(key: jax.Array, x: jax.Array, epsilon,
                       clip_min: float = 0., clip_max: float = 1.) -> jax.Array:
  """x + 0.001·N(0, 1) per coordinate, projected onto the ε-ball ∩ box.

  The official code clips only to the box, after the attack; the projection here
  keeps the start inside the ball and changes nothing unless ε < ~6·0.001.
  """
  noise = jax.random.normal(key, (x.size,), x.dtype).reshape(x.shape)  # as above
  return linf_project(x + GAUSSIAN_START_STD * noise, x, epsilon, clip_min, clip_max)


RANDOM_STARTS = {"uniform": linf_random_init, "gaussian": linf_gaussian_init}


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
               random_start: Union[bool, str] = True,
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
    key: PRNG key for the random start; required unless random_start is False.
    random_start: where the ascent starts: ``True`` or ``"uniform"`` uniformly in
      the ball (Madry et al.), ``"gaussian"`` at x + 0.001·N(0, 1) (TRADES / MART),
      ``False`` at x.
    clip_min, clip_max: the image box.

  Returns:
    x_adv (B, ...) with ||x_adv − x||∞ ≤ ε and inside the box, wrapped in
    `stop_gradient` (the attack is not differentiated through).

  References:
    Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks",
    ICLR 2018.
  """
  if not isinstance(random_start, str):
    random_start = "uniform" if random_start else None
  if random_start is None:
    x_adv = x
  elif random_start not in RANDOM_STARTS:
    raise ValueError(f"pgd_attack: random_start must be True, False or one of "
                     f"{sorted(RANDOM_STARTS)}, got {random_start!r}")
  elif key is None:
    raise ValueError(f"pgd_attack: random_start={random_start!r} needs a PRNG `key`.")
  else:
    x_adv = RANDOM_STARTS[random_start](key, x, epsilon, clip_min, clip_max)

  def body(_, x_cur):
    grad = loss_gradient(loss_fn, x_cur)
    x_next = sign_gradient_step(x_cur, grad, step_size)
    return linf_project(x_next, x, epsilon, clip_min, clip_max)

  x_adv = jax.lax.fori_loop(0, num_steps, body, x_adv)
  return jax.lax.stop_gradient(x_adv)
