"""Small array ops with a measured backend pitfall worked around.

``top_k``: XLA rewrites a ``top_k`` into its fast TopK kernel only when every use of the
result is a slice that starts at 0. The common ``lax.top_k(x, k)[0][..., k - 2:]`` (the
K-th and (K−1)-th scores) is simplified into one slice ``[k-2:k]`` of the *sorted* input,
the pattern no longer matches, and XLA:CPU sorts the whole row instead: in the MMGCN
local attack a (7, 3723, 1256) top-50 became a full stable sort of 6.2 s per PGD step,
76% of the attack's time (docs/design.md, XLA:CPU pitfalls). An ``optimization_barrier`` on the outputs
keeps the slices apart, so the kernel is used (0.45 s for the same shape, one thread).
The values, indices and gradients are ``lax.top_k``'s.
"""
from __future__ import annotations

import jax


def top_k(operand: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """``lax.top_k(operand, k)`` (values, indices) behind an optimization barrier."""
  return jax.lax.optimization_barrier(jax.lax.top_k(operand, k))
