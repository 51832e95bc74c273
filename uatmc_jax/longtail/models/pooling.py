"""2x2 max-pooling for the small CNN (METHODS.md B.2, "small CNN") with a CPU-friendly
derivative.

``max_pool_2x2(x)`` equals ``nnx.max_pool(x, (2, 2), strides=(2, 2))`` in values and in
gradients (ties included) but replaces XLA's select-and-scatter backward, which is slow on
CPU, with a ``custom_jvp``: a reshape + max forward whose tangent is the tangent of each
window's first maximal element, so forward and reverse mode both work (docs/design.md,
XLA:CPU pitfalls, "Max-pool backward"; tests/test_image_models.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def _window(x: jax.Array) -> jax.Array:
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c)


def _first_max_mask(x: jax.Array, y: jax.Array) -> jax.Array:
  """(b, h/2, 2, w/2, 2, c) bool: each window's FIRST maximal element in row-major window
  order -- exactly select-and-scatter's choice (XLA's `ge` select keeps the first max)."""
  hit = _window(x) == y[:, :, None, :, None, :]
  taken = jnp.zeros_like(y, dtype=bool)
  rows = []
  for i in range(2):
    cols = []
    for j in range(2):
      first = hit[:, :, i, :, j, :] & ~taken
      taken = taken | first
      cols.append(first)
    rows.append(jnp.stack(cols, axis=3))  # (b, h/2, w/2, 2, c)
  return jnp.stack(rows, axis=2)  # (b, h/2, 2, w/2, 2, c)


@jax.custom_jvp
def _max_pool_2x2_even(x: jax.Array) -> jax.Array:
  return _window(x).max(axis=(2, 4))


@_max_pool_2x2_even.defjvp
def _max_pool_2x2_jvp(primals, tangents):
  # The tangent is the tangent of each window's first maximal element; its transpose
  # (reverse mode) routes each window's cotangent to that element only, so gradients
  # equal nnx.max_pool's bit for bit, ties included.
  (x,), (x_dot,) = primals, tangents
  y = _max_pool_2x2_even(x)
  mask = _first_max_mask(x, y)
  t = jnp.sum(jnp.where(mask, _window(x_dot), jnp.zeros((), x_dot.dtype)), axis=(2, 4))
  return y, t


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max-pool with stride 2 on NHWC ``x``: ``nnx.max_pool(x, (2, 2), strides=(2, 2))``
  without XLA's select-and-scatter backward, which is slow on CPU.

  Forward: a reshape + max (same values, VALID padding). Derivative (a custom JVP, so
  forward and reverse mode both work; reverse mode is its transpose): each
  window's cotangent goes to its first maximal element in row-major window order, the
  element select-and-scatter picks, so gradients equal ``nnx.max_pool``'s exactly, ties
  included (a plain ``jnp.max`` gradient would split ties, which changes PGD's sign steps
  and made multi-process runs differ from single-process ones). Jitted input gradient of
  SmallCNN(16, 32, 64), batch 128, 2-core CPU: 0.224 -> 0.093 s median (load ~2-3) for the
  reshape version. Odd sizes fall back to ``nnx.max_pool``.
  """
  _, h, w, _ = x.shape
  if h % 2 or w % 2:
    return nnx.max_pool(x, (2, 2), strides=(2, 2))
  return _max_pool_2x2_even(x)
