"""The multi-user promotion objective (METHODS.md A.4).

    L(δ) = mean_{u∈A} ReLU(s(u, t; δ) − s_K(u; δ) + margin),

A = anchor users, s_K(u; δ) = the K-th highest score of u over all items with the
perturbed target included.

Exactness without re-sorting. While one item's features move, no other item's score
moves for a non-graph model (VBPR, VBPR-MLP: item vectors are row-wise), so with
o_1 ≥ ... ≥ o_K the K highest scores of the *other* items (computed once per model with
``jax.lax.top_k`` of size K+1 and the target removed from each user's list),

    s_K(u; δ) = clip(s_t, o_K, o_{K-1})      (o_0 = +∞),

exactly: t above o_{K-1} leaves o_{K-1} K-th; between them it is K-th itself; below
o_K, o_K stays K-th. Graph models move more than one item; ``views`` handles them.

Smooth surrogate (an option of the attacker, not part of A.4). With the hinge
ReLU(x), x = s(u,t) − s_K(u) + margin, the objective is piecewise linear in the
target's projected rows on a model whose score is linear in them (VBPR, VBPR-MLP), so
the gradient of any function of ∇L (A.6's cosine reward) is zero almost everywhere.
``surrogate="softplus"`` replaces the hinge by τ·softplus(x/τ) (temperature τ > 0),
smooth and with ReLU(x) ≤ τ·softplus(x/τ) ≤ ReLU(x) + τ·log 2, so it tends to the hinge
as τ → 0. It changes only the ascent objective; Hit@K and ranks are computed from
scores as before.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from uatmc_jax.core import errors

METRIC_KS = (10, 20, 50, 100)
SURROGATES = ("relu", "softplus")


def check_surrogate(surrogate: str, temperature: float) -> None:
  """ConfigError unless ``surrogate`` is known and (softplus) the temperature is > 0."""
  if surrogate not in SURROGATES:
    raise errors.ConfigError(f"attack surrogate must be one of {list(SURROGATES)}, "
                             f"got {surrogate!r}")
  if surrogate == "softplus" and not temperature > 0:
    raise errors.ConfigError(f"attack temperature (softplus surrogate) must be > 0, "
                             f"got {temperature}")


def hinge(x: jax.Array, surrogate: str = "relu", temperature: float = 0.1) -> jax.Array:
  """ReLU(x), or its smooth surrogate τ·softplus(x/τ) (module docstring)."""
  if surrogate == "relu":
    return jax.nn.relu(x)
  check_surrogate(surrogate, temperature)
  return temperature * jax.nn.softplus(x / temperature)


# ----------------------------------------------------------------------------------
# The objective.


def kth_score_with_target(target_scores: jax.Array, other_topk: jax.Array) -> jax.Array:
  """The K-th highest score over all items, target included, without a sort.

  Args:
    target_scores: (n,) the (perturbed) target's score per user.
    other_topk: (n, K) the K highest scores of the other items, descending.

  Returns:
    (n,) clip(s_t, o_K, o_{K-1}) with o_0 = +∞.
  """
  n, k = other_topk.shape
  chex.assert_shape(target_scores, (n,))
  o_k = other_topk[:, k - 1]
  lower = jnp.maximum(target_scores, o_k)
  if k == 1:
    return lower
  return jnp.minimum(lower, other_topk[:, k - 2])


def promotion_per_user_loss(target_scores: jax.Array, other_topk: jax.Array,
                            margin: float, surrogate: str = "relu",
                            temperature: float = 0.1) -> jax.Array:
  """ℓ_u = ReLU(s(u,t) − s_K(u) + margin), (n,); K = other_topk.shape[1].

  ``surrogate`` / ``temperature``: "relu" (A.4) or "softplus" (τ·softplus(x/τ)).
  """
  x = target_scores - kth_score_with_target(target_scores, other_topk) + margin
  return hinge(x, surrogate, temperature)


def promotion_objective(target_scores: jax.Array, other_topk: jax.Array,
                        margin: float, surrogate: str = "relu",
                        temperature: float = 0.1) -> jax.Array:
  """L = mean_u ReLU(s(u,t) − s_K(u) + margin) (A.4), a scalar to maximise."""
  return jnp.mean(promotion_per_user_loss(target_scores, other_topk, margin, surrogate,
                                          temperature))


def others_topk_without_target(topk_values: jax.Array, topk_indices: jax.Array,
                               target: jax.Array, k: int) -> jax.Array:
  """The top-k of the other items from a clean top-(k+1) list, per user, no re-sort.

  Args:
    topk_values, topk_indices: (n, k+1) clean top-(k+1) over all items, descending.
    target: () item id to remove.
    k: width of the result.

  Returns:
    (n, k): entries before the target's position kept, later ones shifted up by one;
    users whose list lacks the target keep its first k entries.
  """
  n = topk_values.shape[0]
  chex.assert_shape([topk_values, topk_indices], (n, k + 1))
  is_t = topk_indices == target
  pos = jnp.where(jnp.any(is_t, axis=1), jnp.argmax(is_t, axis=1), k + 1)
  keep_head = jnp.arange(k)[None, :] < pos[:, None]
  return jnp.where(keep_head, topk_values[:, :k], topk_values[:, 1:])


def others_threshold_columns(topk_values: jax.Array, topk_indices: jax.Array,
                             target: jax.Array, k: int) -> jax.Array:
  """The last two columns of ``others_topk_without_target`` (o_{K-1}, o_K), (n, min(k, 2)).

  ``kth_score_with_target`` reads only these, so the attack loop carries (n, 2) instead
  of (n, K) per target (K = 50: 25x less memory traffic per chunk).
  """
  n = topk_values.shape[0]
  chex.assert_shape([topk_values, topk_indices], (n, k + 1))
  cols = jnp.arange(max(k - 2, 0), k)
  is_t = topk_indices == target
  pos = jnp.where(jnp.any(is_t, axis=1), jnp.argmax(is_t, axis=1), k + 1)
  return jnp.where(cols[None, :] < pos[:, None], topk_values[:, cols], topk_values[:, cols + 1])

