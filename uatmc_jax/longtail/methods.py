"""Long-tailed adversarial-training methods as compositions of pieces (METHODS.md B.3, B.4).

A method is (inner attack objective, outer loss, add-on terms), chosen by name:

| name     | inner (maximised by PGD-10)        | outer                                   |
|----------|------------------------------------|-----------------------------------------|
| pgd_at   | CE(f(x'), y)                       | CE(f(x'), y)                            |
| trades   | KL(f(x) ‖ f(x'))                   | CE(f(x), y) + β·KL(f(x) ‖ f(x'))        |
| mart     | CE(f(x'), y)                       | BCE(f(x'), y) + β·KL·(1 − p_y(x))       |
| at_bsl   | CE(f(x'), y)                       | CE(f(x') + log n, y)                    |
| robal    | KL of the adjusted cosine logits   | margin + τ_b log π CE on x' + β·KL      |
| mcat     | CE(f(x'), y) − λ_man·d_My(φ(x'))   | CE(f(x'), y) + λ_geom·L_ETF(W)          |

Add-ons compose with every base method: ``etf_weight`` adds λ_geom·L_ETF(W) to the
outer loss, ``manifold_weight`` subtracts λ_man·d_My(φ(x')) from the inner objective
(MS-PGD). ``"trades+etf"`` / ``"at_bsl+manifold"`` name such combinations with the
default weights (0.01 / 0.1), and explicit ``etf_weight=`` / ``manifold_weight=``
override. No method needs its own trainer.

The inner attack starts where each method's official code starts it: TRADES and MART
at x + 0.001·N(0, 1) (``attack_start="gaussian"``), the others uniformly in the ε-ball.

Everything below is a pure function of explicit arrays; ``LongTailTrainer`` supplies
the network outputs (φ and logits, BatchNorm in inference mode inside the attack).
"""
from __future__ import annotations

import dataclasses
import chex
import jax
import jax.numpy as jnp

from uatmc_jax.core.errors import ConfigError
from uatmc_jax.longtail import etf
from uatmc_jax.longtail import losses as cl
from uatmc_jax.longtail.attacks import linf

INNER_LOSSES = ("ce", "kl")
OUTER_LOSSES = ("ce", "balanced_ce", "trades", "mart", "robal")

DEFAULT_ETF_WEIGHT = 0.01        # B.4 "weight 0.01 as implemented"
DEFAULT_MANIFOLD_WEIGHT = 0.1    # B.4 λ_man

_BASE_METHODS = {
    "pgd_at": dict(inner_loss="ce", outer_loss="ce"),
    "trades": dict(inner_loss="kl", outer_loss="trades", attack_start="gaussian"),
    "mart": dict(inner_loss="ce", outer_loss="mart", attack_start="gaussian"),
    "at_bsl": dict(inner_loss="ce", outer_loss="balanced_ce"),
    "robal": dict(inner_loss="kl", outer_loss="robal", head="cosine"),
    "mcat": dict(inner_loss="ce", outer_loss="ce", etf_weight=DEFAULT_ETF_WEIGHT,
                 manifold_weight=DEFAULT_MANIFOLD_WEIGHT),
}
_ADD_ONS = {"etf": ("etf_weight", DEFAULT_ETF_WEIGHT),
            "manifold": ("manifold_weight", DEFAULT_MANIFOLD_WEIGHT)}

METHODS = tuple(_BASE_METHODS)


@dataclasses.dataclass(frozen=True)
class LongTailMethod:
  """A resolved method: which pieces, with which weights.

  Attributes:
    name: the requested name (e.g. ``"trades+etf"``).
    inner_loss: ``ce`` | ``kl`` — the attack's base objective.
    outer_loss: ``ce`` | ``balanced_ce`` | ``trades`` | ``mart`` | ``robal``.
    head: classifier head the model must be built with: ``linear`` | ``cosine``.
    beta: TRADES / MART / RoBal KL weight (6 in B.3).
    etf_weight: λ_geom of the ETF Gram penalty (0 = off).
    manifold_weight: λ_man of MS-PGD (0 = plain PGD; no manifold models are fitted).
    attack_start: the inner attack's random start, a key of ``linf.RANDOM_STARTS``:
      ``uniform`` in the ε-ball (PGD-AT, AT-BSL, RoBal, MCAT) or ``gaussian``
      x + 0.001·N(0, 1) (TRADES and MART, as their official code).
    robal_scale, robal_max_margin, robal_tau_b, robal_tau_p: RoBal's cosine scale s,
      the margin of the rarest class, the training logit adjustment τ_b and the
      inference adjustment τ_p.
  """
  name: str
  inner_loss: str
  outer_loss: str
  head: str = "linear"
  beta: float = 6.0
  etf_weight: float = 0.0
  manifold_weight: float = 0.0
  attack_start: str = "uniform"
  robal_scale: float = 16.0
  robal_max_margin: float = 0.2
  robal_tau_b: float = 1.0
  robal_tau_p: float = 0.5

  def __post_init__(self):
    if self.attack_start not in linf.RANDOM_STARTS:
      raise ConfigError(f"method {self.name!r}: attack_start must be one of "
                        f"{sorted(linf.RANDOM_STARTS)}, got {self.attack_start!r}")

  @property
  def uses_manifold(self) -> bool:
    return self.manifold_weight != 0.0

  @property
  def needs_clean_logits(self) -> bool:
    """The outer loss also needs f(x) in training mode (TRADES / MART / RoBal)."""
    return self.outer_loss in ("trades", "mart", "robal")


def resolve_method(name: str, *, beta: float | None = None, etf_weight: float | None = None,
                   manifold_weight: float | None = None, **robal: float) -> LongTailMethod:
  """``"base[+etf][+manifold]"`` plus explicit overrides -> ``LongTailMethod``.

  Raises:
    ConfigError: unknown base method or add-on, or a negative weight.
  """
  parts = [p.strip() for p in str(name).split("+") if p.strip()]
  if not parts or parts[0] not in _BASE_METHODS:
    raise ConfigError(f"method: unknown base method {name!r}; expected one of "
                      f"{sorted(_BASE_METHODS)} optionally followed by "
                      f"{['+' + a for a in _ADD_ONS]}")
  fields = dict(_BASE_METHODS[parts[0]])
  for add_on in parts[1:]:
    if add_on not in _ADD_ONS:
      raise ConfigError(f"method {name!r}: unknown add-on {add_on!r}; expected one of "
                        f"{sorted(_ADD_ONS)}")
    key, default = _ADD_ONS[add_on]
    fields[key] = default
  for key, value in (("beta", beta), ("etf_weight", etf_weight),
                     ("manifold_weight", manifold_weight)):
    if value is not None:
      fields[key] = float(value)
  for key, value in robal.items():
    if value is None:
      continue
    if f"robal_{key}" not in {f.name for f in dataclasses.fields(LongTailMethod)}:
      raise ConfigError(f"method option robal_{key} is unknown")
    fields[f"robal_{key}"] = float(value)
  for key in ("etf_weight", "manifold_weight", "beta"):
    if fields.get(key, 0.0) < 0:
      raise ConfigError(f"method {name!r}: {key} must be >= 0, got {fields[key]}")
  return LongTailMethod(name=str(name), **fields)


# --- logits the pieces see --------------------------------------------------------------

def _robal_kwargs(method: LongTailMethod, class_counts) -> dict:
  return dict(class_counts=class_counts, scale=method.robal_scale,
              max_margin=method.robal_max_margin, tau_b=method.robal_tau_b)


def _cosines(method: LongTailMethod, logits: chex.Array) -> chex.Array:
  # The model's cosine head returns s·cos with s = robal_scale.
  return logits / method.robal_scale


def inference_logits(method: LongTailMethod, logits: chex.Array,
                     class_counts: chex.Array) -> chex.Array:
  """Logits used for prediction and evaluation attacks (RoBal: s·cos − τ_p log π)."""
  if method.outer_loss == "robal":
    return cl.robal_inference_logits(cosine=_cosines(method, logits), class_counts=class_counts,
                                     scale=method.robal_scale, tau_p=method.robal_tau_p)
  return logits


def logit_adjustment(method: LongTailMethod, class_counts: chex.Array) -> jax.Array:
  """The constant (C,) vector ``inference_logits`` adds to the model's logits."""
  if method.outer_loss == "robal":
    return -method.robal_tau_p * cl.log_prior(class_counts)
  return jnp.zeros((jnp.asarray(class_counts).shape[0],), jnp.float32)


# --- inner objective --------------------------------------------------------------------

def attack_head_loss(method: LongTailMethod, *, adv_logits: chex.Array, labels: chex.Array,
                     clean_logits: chex.Array | None, class_counts: chex.Array) -> chex.Array:
  """The inner objective's classification part, per example (B,) (maximised).

  ``ce``: CE(f(x'), y). ``kl``: KL(f(x) ‖ f(x')) with f(x) fixed (TRADES; RoBal on its
  τ_b-adjusted cosine logits without the label margin).
  """
  if method.inner_loss == "ce":
    return cl.softmax_cross_entropy(logits=adv_logits, labels=labels)
  if clean_logits is None:
    raise ValueError("the KL inner loss needs the clean logits")
  if method.outer_loss == "robal":
    kw = _robal_kwargs(method, class_counts)
    clean_logits = cl.robal_train_logits(cosine=_cosines(method, clean_logits), labels=None, **kw)
    adv_logits = cl.robal_train_logits(cosine=_cosines(method, adv_logits), labels=None, **kw)
  return cl.trades_attack_loss(clean_logits=clean_logits, adv_logits=adv_logits)


# --- outer objective --------------------------------------------------------------------

def outer_loss(method: LongTailMethod, *, adv_logits: chex.Array, labels: chex.Array,
               clean_logits: chex.Array | None, class_counts: chex.Array,
               classifier_weight: chex.Array) -> tuple[jax.Array, dict]:
  """The scalar training loss (batch mean + add-ons) and its parts for logging."""
  if method.needs_clean_logits and clean_logits is None:
    raise ValueError(f"method {method.name}: the outer loss needs the clean logits")
  kind = method.outer_loss
  if kind == "ce":
    per_example = cl.softmax_cross_entropy(logits=adv_logits, labels=labels)
  elif kind == "balanced_ce":
    per_example = cl.balanced_softmax_cross_entropy(logits=adv_logits, labels=labels,
                                                    class_counts=class_counts)
  elif kind == "trades":
    per_example = cl.trades_loss(clean_logits=clean_logits, adv_logits=adv_logits,
                                 labels=labels, beta=method.beta)
  elif kind == "mart":
    per_example = cl.mart_loss(clean_logits=clean_logits, adv_logits=adv_logits,
                               labels=labels, beta=method.beta)
  elif kind == "robal":
    per_example = cl.robal_loss(clean_cosine=_cosines(method, clean_logits),
                                adv_cosine=_cosines(method, adv_logits), labels=labels,
                                beta=method.beta, **_robal_kwargs(method, class_counts))
  else:
    raise ConfigError(f"outer loss {kind!r}: expected one of {OUTER_LOSSES}")
  base = jnp.mean(per_example)
  parts = {"base_loss": base}
  total = base
  if method.etf_weight:
    penalty = etf.etf_gram_penalty(classifier_weight)
    parts["etf_penalty"] = penalty
    total = total + method.etf_weight * penalty
  return total, parts
