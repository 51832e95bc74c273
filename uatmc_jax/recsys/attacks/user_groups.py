"""User groups for the mismatch diagnostics (METHODS.md A.5): k-means or a partition.

``kmeans`` is Lloyd's algorithm, jitted, a fixed number of iterations
(``lax.fori_loop``), initialised from k distinct random users; an emptied cluster keeps
its previous centre. ``one_hot_groups`` turns a partition (e.g. the synthetic data's
planted ``InteractionData.user_groups``) into the (n_users, G) weights the per-group
gradients take.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=("k", "iterations"))
def kmeans(key: jax.Array, points: jax.Array, *, k: int,
           iterations: int = 50) -> tuple[jax.Array, jax.Array]:
  """k-means of (n, d) points.

  Returns:
    (centres (k, d), assignment (n,) int32).
  """
  n = points.shape[0]
  centres = points[jax.random.choice(key, n, (k,), replace=False)]

  def assign(c):
    d2 = (jnp.sum(points ** 2, 1)[:, None] - 2 * points @ c.T + jnp.sum(c ** 2, 1)[None, :])
    return jnp.argmin(d2, axis=1)

  def body(_, c):
    onehot = jax.nn.one_hot(assign(c), k, dtype=points.dtype)
    counts = onehot.sum(0)
    sums = onehot.T @ points
    return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], c)

  centres = jax.lax.fori_loop(0, iterations, body, centres)
  return centres, assign(centres).astype(jnp.int32)


def one_hot_groups(assignment, n_groups: int | None = None) -> jax.Array:
  """(n,) group ids -> (n, G) float32 one-hot weights."""
  a = np.asarray(assignment)
  g = int(a.max()) + 1 if n_groups is None else n_groups
  return jax.nn.one_hot(jnp.asarray(a), g, dtype=jnp.float32)


def anchor_groups(planted, anchors, anchor_vectors: jax.Array, key: jax.Array,
                  k: int) -> jax.Array:
  """(n_anchors, G) one-hot groups of the anchor users: the planted partition
  ``planted[anchors]`` when ``planted`` (n_users,) is given, else k-means (k groups) of
  the anchors' user vectors."""
  if planted is not None:
    return one_hot_groups(np.asarray(planted)[np.asarray(anchors)])
  _, assign = kmeans(key, anchor_vectors, k=k)
  return one_hot_groups(assign, k)


def grouping_description(data, planted: bool, k: int) -> str:
  """What the attack outputs print: "planted from <file>" or "k-means k=<k>"."""
  if planted:
    source = getattr(data, "user_groups_source", None) or "data.user_groups (in memory)"
    return f"planted from {source}"
  return f"k-means k={k} on anchor user vectors"
