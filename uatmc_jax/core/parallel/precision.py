"""Mixed precision: float32 parameters and optimiser state, bfloat16 compute.

The policy every trainer applies when ``config.compute_dtype = "bfloat16"``:

* parameters and optimiser state stay float32 (the master copy the optimiser updates);
* inside the loss, floating parameters and floating inputs are cast to the compute
  dtype, so matmuls / convolutions / gathers run in bfloat16 on accelerators;
* the loss (and any scalar metric) is cast back to float32.

Gradients flow back through the casts, so ``jax.grad`` of a loss written this way
returns float32 gradients for float32 parameters (the transpose of a convert is a
convert). Integer leaves (ids, edge lists, step counters) are never touched. On CPU
bfloat16 is supported but usually not faster: the option exists for GPU/TPU.

Usage inside a trainer's loss::

    policy = precision.Policy.from_name(config.get("compute_dtype", "float32"))
    def loss(params, batch):
      model = nnx.merge(graphdef, policy.cast_to_compute(params), rest)
      out = loss_fn(model, policy.cast_to_compute(batch), ...)
      return policy.cast_to_output(out)
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from uatmc_jax.core.errors import ConfigError

# float16 is refused: it needs loss scaling (not implemented) and its 5-bit exponent
# underflows squared norms (NaN in l2_normalize of small rows); bfloat16 has float32's
# exponent range.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Matmul precision of float32 dot products / convolutions (``jax.default_matmul_precision``):
# "default" lets the backend choose (TF32 on recent NVIDIA GPUs, one bfloat16 pass on
# TPU, exact float32 on CPU); "high" is bf16_3x on TPU / TF32 on GPU; "highest" is full
# float32 everywhere.
MATMUL_PRECISIONS = ("default", "high", "highest")
DEFAULT_TRAIN_MATMUL_PRECISION = "default"
# Ranking and evaluation always use full float32: a top-K cut at rank 20 of ~10^4 items
# turns the ~1e-3 relative error of a TF32 / bf16 pass into reordered neighbours.
EVAL_MATMUL_PRECISION = "highest"


def check_matmul_precision(name: str | None) -> str:
  """``name`` (None -> the training default) validated against MATMUL_PRECISIONS."""
  key = DEFAULT_TRAIN_MATMUL_PRECISION if name in (None, "") else str(name)
  if key not in MATMUL_PRECISIONS:
    raise ConfigError(f"matmul_precision={name!r} is unknown; expected one of "
                      f"{list(MATMUL_PRECISIONS)}")
  return key


def matmul_precision(name: str | None):
  """Context manager: float32 matmuls traced inside run at ``name``'s precision.

  Use it around a jitted call (the setting is part of JAX's compilation cache key, so
  programs of different precisions never share an executable) or inside a traced
  function. ``"default"`` leaves JAX's global setting alone.
  """
  key = check_matmul_precision(name)
  if key == "default":
    return contextlib.nullcontext()
  return jax.default_matmul_precision(key)


def evaluation_precision():
  """The context every ranking / evaluation program runs under (full float32)."""
  return jax.default_matmul_precision(EVAL_MATMUL_PRECISION)


def cast_floating(tree: Any, dtype: Any) -> Any:
  """Casts every floating leaf of ``tree`` to ``dtype``; other leaves pass unchanged."""

  def cast(x):
    if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
      return jnp.asarray(x).astype(dtype)
    return x

  return jax.tree.map(cast, tree)


@dataclasses.dataclass(frozen=True)
class Policy:
  """Which dtype the forward pass computes in (parameters stay ``param_dtype``)."""
  compute_dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  output_dtype: Any = jnp.float32

  @classmethod
  def from_name(cls, name: str | None) -> "Policy":
    """``"float32"`` (default, a no-op policy) or ``"bfloat16"``; anything else (float16
    included: no loss scaling) raises ConfigError naming ``compute_dtype``."""
    key = "float32" if name in (None, "") else str(name)
    if key not in COMPUTE_DTYPES:
      raise ConfigError(f"compute_dtype={name!r} is unknown; expected one of "
                        f"{sorted(COMPUTE_DTYPES)}")
    return cls(compute_dtype=COMPUTE_DTYPES[key])

  @property
  def is_mixed(self) -> bool:
    return jnp.dtype(self.compute_dtype) != jnp.dtype(self.param_dtype)

  def cast_to_compute(self, tree: Any) -> Any:
    """Floating leaves -> compute dtype (identity for the float32 policy)."""
    return cast_floating(tree, self.compute_dtype) if self.is_mixed else tree

  def cast_to_param(self, tree: Any) -> Any:
    """Floating leaves -> parameter dtype (e.g. BatchNorm statistics written back)."""
    return cast_floating(tree, self.param_dtype) if self.is_mixed else tree

  def cast_to_output(self, tree: Any) -> Any:
    """Floating leaves -> output dtype (losses, metrics)."""
    return cast_floating(tree, self.output_dtype)


def mixed_precision_loss(loss_fn, policy: Policy):
  """Wraps a recommender loss seam ``loss_fn(model, batch, features, key) -> (loss, aux)``
  so the model's floating state and the item features enter in the compute dtype and
  the loss and aux come out float32. Identity for the float32 policy.

  The merged model is split and re-merged with cast state; gradients w.r.t. the
  caller's float32 parameters flow back through the casts (float32 gradients).
  """
  if not policy.is_mixed:
    return loss_fn
  from flax import nnx  # local: this module is otherwise framework-free

  def wrapped(model, batch, features, key):
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, policy.cast_to_compute(state))
    loss, aux = loss_fn(model, batch, policy.cast_to_compute(features), key)
    return policy.cast_to_output(loss), policy.cast_to_output(aux)

  return wrapped
