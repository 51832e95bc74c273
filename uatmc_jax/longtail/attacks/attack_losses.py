"""Per-example losses that L∞ attacks maximise (METHODS.md B.5).

All take logits (B, C) and integer labels (B,) and return (B,). Larger = more
adversarial. Compose with a model as
`loss_fn = lambda xa: cross_entropy_loss(logits_fn(xa), y)` and hand it to
`linf.pgd_attack`.
"""

import chex
import jax
import jax.numpy as jnp

# Used in place of −∞ when masking logits, so that gradients stay finite.
_MASK = 1e9


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """CE(z, y) = logsumexp(z) − z_y, per example."""
  chex.assert_rank(logits, 2)
  chex.assert_shape(labels, (logits.shape[0],))
  log_probs = jax.nn.log_softmax(logits)
  return -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]


def _true_logit(logits, labels):
  return jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]


def max_other_logit(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """max_{j ≠ y} z_j, per example."""
  one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
  return jnp.max(jnp.where(one_hot, -_MASK, logits), axis=-1)


def cw_margin_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Carlini–Wagner margin loss max_{j≠y} z_j − z_y (> 0 iff misclassified)."""
  chex.assert_rank(logits, 2)
  chex.assert_shape(labels, (logits.shape[0],))
  return max_other_logit(logits, labels) - _true_logit(logits, labels)


def targeted_margin_loss(logits: jax.Array, labels: jax.Array,
                         target_labels: jax.Array) -> jax.Array:
  """z_t − z_y: margin towards a chosen target class t."""
  return _true_logit(logits, target_labels) - _true_logit(logits, labels)


def dlr_loss(logits: jax.Array, labels: jax.Array,
             eps: float = 1e-12) -> jax.Array:
  """Difference-of-logits-ratio loss (Croce & Hein 2020), METHODS.md B.5.

  DLR(z, y) = −(z_y − max_{i≠y} z_i) / (z_π1 − z_π3 + eps), π the logits sorted
  in decreasing order. Needs C ≥ 3. Scale- and shift-invariant in z.
  """
  chex.assert_rank(logits, 2)
  chex.assert_shape(labels, (logits.shape[0],))
  if logits.shape[-1] < 3:
    raise ValueError(f"dlr_loss needs at least 3 classes, got {logits.shape[-1]}")
  top3 = jax.lax.top_k(logits, 3)[0]
  margin = _true_logit(logits, labels) - max_other_logit(logits, labels)
  return -margin / (top3[:, 0] - top3[:, 2] + eps)


def targeted_dlr_loss(logits: jax.Array, labels: jax.Array,
                      target_labels: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Targeted DLR (Croce & Hein 2020), METHODS.md B.5.

  DLR_t(z, y, t) = −(z_y − z_t) / (z_π1 − ½(z_π3 + z_π4) + eps). Needs C ≥ 4.
  """
  chex.assert_rank(logits, 2)
  chex.assert_shape(labels, (logits.shape[0],))
  chex.assert_shape(target_labels, (logits.shape[0],))
  if logits.shape[-1] < 4:
    raise ValueError(
        f"targeted_dlr_loss needs at least 4 classes, got {logits.shape[-1]}")
  top4 = jax.lax.top_k(logits, 4)[0]
  margin = _true_logit(logits, labels) - _true_logit(logits, target_labels)
  return -margin / (top4[:, 0] - 0.5 * (top4[:, 2] + top4[:, 3]) + eps)
