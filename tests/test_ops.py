"""uatmc_jax.core.ops.top_k: lax.top_k's values, indices and gradients, and XLA's TopK kernel."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uatmc_jax.core import ops


def _tail_of_top_k(top_k):
  return lambda x: top_k(x, 5)[0][..., 3:]  # the K-th and (K-1)-th values, as the attacks use


def test_values_indices_and_gradients_equal_lax():
  x = jax.random.normal(jax.random.key(0), (3, 4, 40))
  v, i = ops.top_k(x, 5)
  v_ref, i_ref = jax.lax.top_k(x, 5)
  np.testing.assert_array_equal(v, v_ref)
  np.testing.assert_array_equal(i, i_ref)
  w = jax.random.normal(jax.random.key(1), (3, 4, 2))
  loss = lambda f: lambda x_: jnp.sum(w * f(x_))
  chex.assert_trees_all_close(jax.grad(loss(_tail_of_top_k(ops.top_k)))(x),
                              jax.grad(loss(_tail_of_top_k(jax.lax.top_k)))(x))
  # the gradient is 1-hot at the K-th / (K-1)-th entries: hand-checked on one row
  g = jax.grad(lambda r: jnp.sum(ops.top_k(r, 5)[0][3:]))(x[0, 0])
  order = np.argsort(-np.asarray(x[0, 0]))
  expected = np.zeros(40)
  expected[order[3:5]] = 1.0
  np.testing.assert_array_equal(g, expected)
  # vmap (the runner vmaps over targets)
  chex.assert_trees_all_close(jax.vmap(_tail_of_top_k(ops.top_k))(x),
                              _tail_of_top_k(jax.lax.top_k)(x))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks XLA:CPU's rewrite")
def test_sliced_top_k_compiles_to_the_topk_kernel_not_a_sort():
  x = jnp.ones((7, 30, 1256))
  hlo = lambda f: jax.jit(f).lower(x).compile().as_text()
  # (plain lax.top_k compiles to a full sort here with jax 0.10.2: the pitfall)
  ours = hlo(_tail_of_top_k(ops.top_k))
  assert "TopK" in ours and " sort(" not in ours
  grad = jax.jit(jax.grad(lambda a: jnp.sum(_tail_of_top_k(ops.top_k)(a)))).lower(
      x).compile().as_text()
  assert "TopK" in grad and " sort(" not in grad
