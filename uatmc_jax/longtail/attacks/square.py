"""Square Attack in the L∞ norm: a score-based random search.

METHODS.md B.5; Andriushchenko et al., "Square Attack: a query-efficient black-box
adversarial attack via random search", ECCV 2020.

  * Start: vertical stripes, x + ε·s with one random sign s per (column, channel).
  * Each query: a square window of side h_i = round(√(p_i·H·W)) (clipped to
    [1, H − 1]) at a uniformly random position gets a fresh random sign per channel,
    i.e. x_new = P(x_best + 2ε·s on the window) — on the window the perturbation
    jumps to ±ε. The candidate is kept when it lowers the margin loss
    z_y − max_{j≠y} z_j. Examples already fooled (margin ≤ 0) stop changing.
  * p_i follows the authors' piecewise-constant schedule: p_init halves after
    iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 (p_init/2 on
    11–50, …, p_init/512 after 8000). With `rescale_schedule=True` (the authors'
    standalone default) the iteration is first mapped to floor(i·10000/num_queries),
    so the whole schedule fits any budget; AutoAttack's standard version builds Square
    with resc_schedule=False, i.e. the raw iteration, so with 5000 queries p ends at
    p_init/128 (iterations 4001 on). p_init = 0.8 in AutoAttack, 5000 queries.

Per-example windows and signs (the authors' NumPy version; their PyTorch port shares
one window across the batch). Deviation, stated: the window's corner is uniform over
all H − h_i + 1 positions; the authors draw it from [0, H − h_i), so windows never
touch the last row/column (harmless at 32x32, crippling on the tiny test images). The loop is a `lax.while_loop` that stops once every
example is fooled. Its random words (window corner, signs) are all drawn before the
loop, one threefry draw per example, and indexed by the query number inside it. Images are (B, H, W, C).
"""

from typing import Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp

from uatmc_jax.longtail.attacks import apgd
from uatmc_jax.longtail.attacks import attack_losses

LogitsFn = Callable[[jax.Array], jax.Array]

_SCHEDULE_POINTS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_p_schedule(iteration, num_queries: int, p_init: float,
                      rescale_schedule: bool = True):
  """Fraction p of pixels changed at the 0-based `iteration` (may be traced).

  `rescale_schedule`: map the iteration to floor(iteration·10000/num_queries) first
  (the authors' standalone default) or use it as is (AutoAttack's standard version).
  """
  it = jnp.asarray(iteration)
  if rescale_schedule:
    it = jnp.floor(it * 10000. / num_queries)
  halvings = sum((it > t).astype(jnp.int32) for t in _SCHEDULE_POINTS)
  return p_init / (2. ** halvings)


class SquareResult(NamedTuple):
  """x_adv (B, ...): the lowest-margin point; margin (B,): its margin;
  robust (B,): margin > 0; queries (B,): queries used per example."""
  x_adv: jax.Array
  margin: jax.Array
  robust: jax.Array
  queries: jax.Array


def _margin(logits_fn, z, labels):
  return -attack_losses.cw_margin_loss(logits_fn(z), labels)


def window_from_words(words: jax.Array, side, height: int, width: int, channels: int,
                      dtype=jnp.float32):
  """One query's window per row from its random uint32 words (B, 2 + ⌈C/32⌉).

  Returns top, left (B, 1, 1, 1) int32, the corner uniform over the H − side + 1
  (W − side + 1) positions (a 32-bit word modulo the count: bias < count / 2^32, below
  1e-8 for images), and signs (B, 1, 1, C) in {−1, +1}, one bit per channel.
  """
  side = jnp.asarray(side, jnp.uint32)
  top = (words[:, 0] % (jnp.uint32(height) - side + 1)).astype(jnp.int32)
  left = (words[:, 1] % (jnp.uint32(width) - side + 1)).astype(jnp.int32)
  bit = jnp.arange(channels, dtype=jnp.uint32)
  bits = (words[:, 2 + bit // 32] >> (bit % 32)) & 1                 # (B, C)
  signs = (2. * bits.astype(dtype) - 1.)[:, None, None, :]
  return top[:, None, None, None], left[:, None, None, None], signs


def square_attack(logits_fn: LogitsFn,
                  x: jax.Array,
                  labels: jax.Array,
                  *,
                  epsilon: float,
                  key: jax.Array,
                  num_queries: int = 5000,
                  p_init: float = 0.8,
                  rescale_schedule: bool = True,
                  early_stop: bool = True,
                  clip_min: float = 0.,
                  clip_max: float = 1.) -> SquareResult:
  """Untargeted Square Attack L∞ on a batch (B, H, W, C); see the module doc.

  `rescale_schedule` selects the p schedule (see `square_p_schedule`): True fits the
  authors' 10 000-iteration schedule to `num_queries`; AutoAttack passes False.

  `early_stop` ends the loop once every example is fooled (results unchanged);
  turn it off only to time the full query budget.

  `key`: one PRNG key for the batch, or one key per example ((B, 2) raw keys): each
  example's stripes, windows and signs then come from its own key only, so its result
  does not depend on the batch it runs in.
  """
  chex.assert_rank(x, 4)
  batch, height, width, channels = x.shape
  chex.assert_shape(labels, (batch,))
  if height < 2 or width < 2:
    raise ValueError(f"square_attack needs images at least 2x2, got {x.shape}")
  per_row = apgd.is_key_batch(key)
  # Every random word of the attack comes from one threefry draw per example (its own
  # key), made before the loop: the stripes' signs (bit 0 of a word per column and
  # channel), then per query i the window corner and signs, words[i] = (top, left,
  # sign bits...). One draw instead of ~10 (a split, the stripes, ~8 per query)
  # compiles about 1 s faster on XLA:CPU, and nothing random is left in the loop.
  # Draws are 1-D and reshaped (apgd.flat_draw). Memory: num_queries · B · n_words
  # uint32 (5000 · 128 · 3: 7.7 MB).
  n_words = 2 + -(-channels // 32)
  n_stripe = width * channels
  if per_row:  # one key per example: its stripes, windows and signs ignore the other rows
    chex.assert_shape(key, (batch,) + key.shape[1:])
    drawn = jax.vmap(lambda k: apgd.flat_draw(
        jax.random.bits, k, (n_stripe + num_queries * n_words,)))(key)   # (B, ...)
    stripe_words = drawn[:, :n_stripe].reshape(batch, 1, width, channels)
    words = jnp.swapaxes(drawn[:, n_stripe:].reshape(batch, num_queries, n_words), 0, 1)
  else:
    drawn = apgd.flat_draw(jax.random.bits, key, (batch * n_stripe
                                                  + num_queries * batch * n_words,))
    stripe_words = drawn[:batch * n_stripe].reshape(batch, 1, width, channels)
    words = drawn[batch * n_stripe:].reshape(num_queries, batch, n_words)
  stripes = 2. * (stripe_words & 1).astype(x.dtype) - 1.
  x_best = jnp.clip(x + epsilon * stripes, clip_min, clip_max)
  margin = _margin(logits_fn, x_best, labels)
  rows = jnp.arange(height)[None, :, None, None]
  cols = jnp.arange(width)[None, None, :, None]
  side_max = min(height, width) - 1

  def cond(carry):
    i, _, margin, _ = carry
    keep = i < num_queries - 1
    return keep & jnp.any(margin > 0) if early_stop else keep

  def body(carry):
    i, x_best, margin, queries = carry
    p = square_p_schedule(i, num_queries, p_init, rescale_schedule)
    side = jnp.clip(jnp.round(jnp.sqrt(p * height * width)), 1, side_max).astype(jnp.int32)
    w = jax.lax.dynamic_index_in_dim(words, i, 0, keepdims=False)   # (B, n_words)
    top, left, signs = window_from_words(w, side, height, width, channels, x.dtype)
    window = ((rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side))
    x_new = x_best + jnp.where(window, 2. * epsilon * signs, 0.)
    x_new = jnp.clip(jnp.clip(x_new, x - epsilon, x + epsilon), clip_min, clip_max)
    new_margin = _margin(logits_fn, x_new, labels)
    active = margin > 0
    accept = active & (new_margin < margin)
    x_best = jnp.where(accept[:, None, None, None], x_new, x_best)
    margin = jnp.where(accept, new_margin, margin)
    return i + 1, x_best, margin, queries + active.astype(jnp.int32)

  init = (jnp.asarray(0), x_best, margin, jnp.ones((batch,), jnp.int32))
  _, x_best, margin, queries = jax.lax.while_loop(cond, body, init)
  return SquareResult(x_adv=jax.lax.stop_gradient(x_best), margin=margin,
                      robust=margin > 0, queries=queries)
