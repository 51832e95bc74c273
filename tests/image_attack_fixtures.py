"""A tiny smooth classifier on 4×4×3 images for the AutoAttack tests (no real model).

Its labels are its own predictions except the first three, which are shifted, so those
points start misclassified and the rest are attackable.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SHAPE = (4, 4, 3)
N_CLASSES = 10


def tiny_mlp(seed: int = 1, n: int = 24):
  """(logits_fn, x (n, 4, 4, 3) in [0, 1], y) of a random tanh MLP."""
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  dim = int(np.prod(SHAPE))
  w1 = jax.random.normal(k1, (dim, 32)) / np.sqrt(dim)
  w2 = jax.random.normal(k2, (32, N_CLASSES)) / np.sqrt(32)

  def logits_fn(z):
    h = jnp.tanh(8. * (z.reshape(z.shape[0], -1) - 0.5) @ w1)
    return 4. * h @ w2

  x = np.asarray(jax.random.uniform(k3, (n,) + SHAPE))
  y = np.array(jnp.argmax(logits_fn(x), -1))
  y[:3] = (y[:3] + 1) % N_CLASSES
  return logits_fn, x, y


def assert_same_outcome(run, ref, name: str) -> None:
  """Two AutoAttack results agree point by point: robust set, fooling stage and x_adv."""
  np.testing.assert_array_equal(run.robust, ref.robust, err_msg=name)
  np.testing.assert_array_equal(run.fooled_by, ref.fooled_by, err_msg=name)
  np.testing.assert_array_equal(run.x_adv, ref.x_adv, err_msg=name)
