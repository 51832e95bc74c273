"""Per-example classification losses of the long-tailed adversarial-training baselines.

METHODS.md B.3: PGD-AT (CE), TRADES, MART, AT-BSL (balanced softmax) and RoBal (cosine
classifier with class-aware margin and logit adjustment). Every function is pure, takes
keyword-only arrays and returns a per-example loss of shape ``(B,)`` (attacks maximise
per-example losses; trainers take the mean), unless stated otherwise.

Shapes: ``logits`` (B, C) float, ``labels`` (B,) int, ``class_counts`` (C,) positive.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax


def softmax_cross_entropy(*, logits: chex.Array, labels: chex.Array) -> chex.Array:
  """CE(z, y) = logsumexp(z) − z_y, per example. Returns (B,)."""
  chex.assert_rank(logits, 2)
  chex.assert_shape(labels, (logits.shape[0],))
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def log_prior(class_counts: chex.Array) -> chex.Array:
  """log π_c = log(n_c / Σ n) for the training class counts. Returns (C,)."""
  counts = jnp.asarray(class_counts, jnp.float32)
  return jnp.log(counts) - jnp.log(jnp.sum(counts))


def balanced_softmax_cross_entropy(*, logits: chex.Array, labels: chex.Array,
                                   class_counts: chex.Array) -> chex.Array:
  """Balanced softmax (AT-BSL's outer loss, B.3): CE(z + log n, y).

  Adding log n_c (equivalently log π_c: the constant log Σn cancels in the softmax)
  is the logit-adjusted CE of Ren et al. 2020 / Menon et al. 2021. Returns (B,).
  """
  chex.assert_shape(class_counts, (logits.shape[-1],))
  shifted = logits + jnp.log(jnp.asarray(class_counts, logits.dtype))[None, :]
  return softmax_cross_entropy(logits=shifted, labels=labels)


def kl_divergence(*, p_logits: chex.Array, q_logits: chex.Array) -> chex.Array:
  """KL(softmax(p) || softmax(q)) = Σ_c p_c (log p_c − log q_c), per example. Returns (B,)."""
  chex.assert_equal_shape([p_logits, q_logits])
  log_p = jax.nn.log_softmax(p_logits, axis=-1)
  log_q = jax.nn.log_softmax(q_logits, axis=-1)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def trades_attack_loss(*, clean_logits: chex.Array, adv_logits: chex.Array) -> chex.Array:
  """TRADES inner objective KL(f(x) || f(x')), the clean side held fixed. Returns (B,)."""
  return kl_divergence(p_logits=jax.lax.stop_gradient(clean_logits), q_logits=adv_logits)


def trades_loss(*, clean_logits: chex.Array, adv_logits: chex.Array, labels: chex.Array,
                beta: float = 6.0) -> chex.Array:
  """TRADES (Zhang et al. 2019, B.3): CE(f(x), y) + β·KL(f(x) || f(x')). Returns (B,)."""
  return (softmax_cross_entropy(logits=clean_logits, labels=labels)
          + beta * kl_divergence(p_logits=clean_logits, q_logits=adv_logits))


def mart_loss(*, clean_logits: chex.Array, adv_logits: chex.Array, labels: chex.Array,
              beta: float = 6.0) -> chex.Array:
  """MART (Wang et al. 2020, B.3), per example.

  BCE(p(x'), y) + β·KL(p(x) || p(x'))·(1 − p_y(x)), where the boosted CE is
  CE(f(x'), y) − log(1 − max_{k≠y} p_k(x')). Returns (B,).
  """
  num_classes = adv_logits.shape[-1]
  adv_probs = jax.nn.softmax(adv_logits, axis=-1)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=adv_probs.dtype)
  # Largest wrong-class probability; the true class is masked out with -1.
  max_wrong = jnp.max(jnp.where(onehot > 0, -1.0, adv_probs), axis=-1)
  boosted_ce = (softmax_cross_entropy(logits=adv_logits, labels=labels)
                - jnp.log(jnp.clip(1.0 - max_wrong, 1e-12)))
  clean_probs = jax.nn.softmax(clean_logits, axis=-1)
  true_prob = jnp.sum(clean_probs * onehot, axis=-1)
  kl = kl_divergence(p_logits=clean_logits, q_logits=adv_logits)
  return boosted_ce + beta * kl * (1.0 - true_prob)


# --- RoBal (Wu et al., CVPR 2021) -------------------------------------------------------

def cosine_similarities(*, features: chex.Array, weight: chex.Array) -> chex.Array:
  """cos(φ_b, w_c) of RoBal's scale-invariant classifier; weight (C, D), features (B, D).

  Returns (B, C) unscaled cosines; the RoBal logits below multiply by the scale s.
  """
  chex.assert_rank([features, weight], 2)
  chex.assert_equal(features.shape[-1], weight.shape[-1])
  f = features * jax.lax.rsqrt(jnp.sum(features**2, -1, keepdims=True) + 1e-12)
  w = weight * jax.lax.rsqrt(jnp.sum(weight**2, -1, keepdims=True) + 1e-12)
  return f @ w.T


def class_aware_margins(class_counts: chex.Array, *, max_margin: float) -> chex.Array:
  """m_c = max_margin · (n_min / n_c)^{1/4}: the rarest class gets the largest margin.

  The n^{-1/4} profile is LDAM's (Cao et al. 2019), which RoBal's class-aware margin
  builds on. Returns (C,).
  """
  counts = jnp.asarray(class_counts, jnp.float32)
  return max_margin * (jnp.min(counts) / counts) ** 0.25


def robal_train_logits(*, cosine: chex.Array, labels: chex.Array | None,
                       class_counts: chex.Array, scale: float, max_margin: float,
                       tau_b: float) -> chex.Array:
  """RoBal training logits: s·(cos − m_y·1[c=y]) + τ_b·log π_c (B.3).

  ``cosine`` are the *unscaled* cosines (B, C). With ``labels=None`` no margin is
  applied (used inside the attack, where the label-dependent margin is not wanted).
  """
  logits = scale * cosine
  if labels is not None:
    margins = class_aware_margins(class_counts, max_margin=max_margin)
    onehot = jax.nn.one_hot(labels, cosine.shape[-1], dtype=cosine.dtype)
    logits = logits - scale * onehot * margins[labels][:, None]
  return logits + tau_b * log_prior(class_counts)[None, :]


def robal_inference_logits(*, cosine: chex.Array, class_counts: chex.Array, scale: float,
                           tau_p: float) -> chex.Array:
  """RoBal inference: s·cos − τ_p·log π (post-hoc logit adjustment, B.3). Returns (B, C)."""
  return scale * cosine - tau_p * log_prior(class_counts)[None, :]


def robal_loss(*, clean_cosine: chex.Array, adv_cosine: chex.Array, labels: chex.Array,
               class_counts: chex.Array, scale: float, max_margin: float, tau_b: float,
               beta: float) -> chex.Array:
  """RoBal outer loss: margin+logit-adjusted CE on x' plus the TRADES term (B.3).

  CE(s(cos(x') − m_y) + τ_b log π, y) + β·KL(f(x) || f(x')) with f the adjusted
  logits without margin. Returns (B,).
  """
  kw = dict(class_counts=class_counts, scale=scale, max_margin=max_margin, tau_b=tau_b)
  ce = softmax_cross_entropy(
      logits=robal_train_logits(cosine=adv_cosine, labels=labels, **kw), labels=labels)
  kl = kl_divergence(p_logits=robal_train_logits(cosine=clean_cosine, labels=None, **kw),
                     q_logits=robal_train_logits(cosine=adv_cosine, labels=None, **kw))
  return ce + beta * kl
