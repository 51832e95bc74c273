"""Simplex equiangular tight frame (ETF) target and MCAT's geometric penalty (METHODS.md B.4).

A simplex ETF of C unit vectors has pairwise cosine −1/(C−1), the largest possible
equal separation; neural collapse drives well-trained classifiers towards it.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def simplex_etf_gram(num_classes: int) -> jax.Array:
  """Target Gram matrix T: 1 on the diagonal, −1/(C−1) off it. Returns (C, C)."""
  if num_classes < 2:
    raise ValueError(f"a simplex ETF needs at least 2 classes, got {num_classes}")
  c = num_classes
  off = -1.0 / (c - 1)
  return jnp.full((c, c), off, jnp.float32) + (1.0 - off) * jnp.eye(c, dtype=jnp.float32)


def simplex_etf(num_classes: int, dim: int, *, key: jax.Array | None = None) -> jax.Array:
  """C unit rows in R^dim forming a simplex ETF (needs dim >= C).

  M = sqrt(C/(C−1)) · (I − 11ᵀ/C) Uᵀ with U (dim, C) orthonormal columns (a random
  rotation when ``key`` is given, the first C coordinate axes otherwise). Returns (C, dim).
  """
  c = num_classes
  if dim < c:
    raise ValueError(f"simplex_etf: dim {dim} < num_classes {c}")
  if key is None:
    u = jnp.eye(dim, c, dtype=jnp.float32)
  else:
    u, _ = jnp.linalg.qr(jax.random.normal(key, (dim, c), jnp.float32))
  centred = jnp.eye(c, dtype=jnp.float32) - jnp.full((c, c), 1.0 / c, jnp.float32)
  return jnp.sqrt(c / (c - 1.0)) * centred @ u.T


def normalized_gram(weight: chex.Array) -> jax.Array:
  """G = W̃W̃ᵀ with W̃ the row-normalised classifier weights; weight (C, D) -> (C, C)."""
  chex.assert_rank(weight, 2)
  w = weight * jax.lax.rsqrt(jnp.sum(weight**2, axis=-1, keepdims=True) + 1e-12)
  return w @ w.T


def etf_gram_penalty(weight: chex.Array) -> jax.Array:
  """L_ETF = mean((W̃W̃ᵀ − T)²) over the C×C entries (B.4). ``weight`` is (C, D); scalar."""
  gram = normalized_gram(weight)
  return jnp.mean((gram - simplex_etf_gram(weight.shape[0]).astype(gram.dtype)) ** 2)
