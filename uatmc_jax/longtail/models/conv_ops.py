"""A drop-in ``lax.conv_general_dilated`` whose input gradient XLA:CPU runs fast in loops.

Why: JAX's transpose rule writes the input gradient of a convolution as a convolution
with a reversed kernel and swapped kernel dimension numbers (``01oi``). Straight-line,
XLA:CPU rewrites that into its fast convolution path. Inside a ``while`` loop (every
PGD / APGD / CW attack here is a ``lax.fori_loop``), the kernel's layout change is hoisted
out of the body and the loop's convolutions then run on a slow path: on the 2-core
EPYC, a PGD-10 input-gradient loop of ``SmallCNN(16, 32, 64, 128)`` at batch 128 took
2.98 s as a loop vs 0.70 s fully unrolled (one thread, jax 0.10.2; docs/design.md, XLA:CPU pitfalls).

The fix is a ``custom_jvp`` whose tangent in the input is the same convolution written
with the kernel pre-transposed (``HWOI`` array) and the kernel dimension numbers swapped
accordingly. JAX's transpose of that tangent (reverse mode is linearise + transpose)
swaps the dimension numbers back, so the input gradient comes out as an ordinary
``HWIO`` convolution of the cotangent with an explicitly flipped, ``I<->O``-transposed
kernel (input dilation = the forward stride, padding ``k - 1 - lo`` / the remainder),
which XLA keeps on its fast path in and out of loops (the same loop: 0.62 s). The
kernel's tangent is the plain convolution, so the kernel gradient is JAX's own rule.
Being a ``custom_jvp`` (not a ``custom_vjp``), the rule serves both modes: ``jax.jvp``,
``jacfwd`` and forward-over-reverse work through every model that uses it. Values
equal ``lax.conv_general_dilated``'s values, gradients and directional derivatives up
to float rounding (tests/test_conv_ops.py). Cases outside the rewrite (dilations,
grouped convolutions, other layouts, padding wider than the kernel) call
``lax.conv_general_dilated`` unchanged.

Few input channels (the RGB stem; float32, C_in <= ``FEW_INPUT_CHANNELS`` = 4): XLA:CPU
runs both the 3 -> 16 convolution and its transpose at a fraction of the later layers'
rate. There the input tangent is im2col instead (the kh·kw shifted views of the padded
input concatenated to (N, H_out, W_out, kh·kw·C_in), one matmul with the reshaped
kernel): its transpose, the input gradient, is a matmul with the transposed kernel plus
pads and adds, 2.4x faster than the convolution transpose for the 3 -> 16 stem at batch
128, in and out of loops. The forward and the kernel tangent stay the plain convolution.
Measured alternatives (one thread, shared 2-core EPYC; docs/results/performance.md): a
forward as kh·kw·C_in broadcast multiply-adds is 6x faster alone, but in a model XLA
fuses it into every consumer and recomputes it (the PGD-10 loop 2.2x slower), and a
``lax.cond`` fence around it is turned into a select inside APGD's ``while`` loop (both
branches run: APGD-T 2.4x slower); an im2col forward, a reduction over the taps and
channel padding 3 -> 8 were no faster than the convolution in the model.
``few_input_channels=0`` turns the path off (benchmarks/bench_conv_first_layer.py).

``conv_general_dilated`` is passed to ``nnx.Conv(conv_general_dilated=...)`` on CPU only
(``image_classifiers._conv``): other backends keep JAX's rule (unmeasured there).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                 out_spec=(0, 3, 1, 2))


def _all_ones(v) -> bool:
  return v is None or all(int(d) == 1 for d in (v if isinstance(v, Sequence) else (v,)))


def _canonical_dn(dimension_numbers, ndim: int):
  if dimension_numbers is None:
    return None
  try:
    return lax.conv_dimension_numbers((1,) * ndim, (1,) * ndim, dimension_numbers)
  except (TypeError, ValueError):
    return None


# The largest input-feature count that takes the few-channel path (module doc).
FEW_INPUT_CHANNELS = 4


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None,
                         *, few_input_channels: int | None = None, **kwargs):
  """``lax.conv_general_dilated`` with a loop-friendly input gradient (see module doc).

  ``few_input_channels``: float32 convolutions with at most this many input features
  (RGB stems) take the few-channel path; 0 turns it off (benchmarks compare the two).
  None: the module's ``FEW_INPUT_CHANNELS``, read when the call is traced.
  """
  if few_input_channels is None:
    few_input_channels = FEW_INPUT_CHANNELS
  pads = None
  if (lhs.ndim == 4 and _canonical_dn(dimension_numbers, lhs.ndim) == _NHWC
      and _all_ones(lhs_dilation) and _all_ones(rhs_dilation) and feature_group_count == 1
      and batch_group_count == 1 and preferred_element_type is None
      and kwargs.get("out_sharding") is None):
    pads = _rewritable_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  if pads is None:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type, **kwargs)
  few = (lhs.shape[3] <= few_input_channels and lhs.dtype == jnp.float32
         and rhs.dtype == jnp.float32)
  return _conv_nhwc(lhs, rhs, tuple(int(s) for s in window_strides), pads, precision, few)


def _rewritable_pads(in_spatial, kernel, strides, padding):
  """Explicit ((lo, hi), (lo, hi)) padding, or None when a side exceeds k − 1."""
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(in_spatial, kernel, tuple(strides), padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  if all(0 <= lo <= k - 1 and 0 <= hi <= k - 1 for k, (lo, hi) in zip(kernel, pads)):
    return pads
  return None


def _plain(x, w, strides, pads, precision):
  return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC,
                                  precision=precision)


# The input tangent's kernel is an ``HWOI`` array: spatial dims 0, 1, output features at
# 2, input features at 3. JAX's transpose rule swaps the rhs spec's I and O entries, so the
# transposed (input-gradient) convolution sees the standard ``HWIO`` spec.
_NHWC_HWOI = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(2, 3, 0, 1),
                                      out_spec=(0, 3, 1, 2))


def _taps(x, kernel, strides, pads):
  """The kh·kw shifted (strided) views of the padded input, row-major over the window:
  each (N, H_out, W_out, C_in)."""
  n, h, w, c = x.shape
  (kh, kw), (sh, sw) = kernel, strides
  xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
  ho = (h + pads[0][0] + pads[0][1] - kh) // sh + 1
  wo = (w + pads[1][0] + pads[1][1] - kw) // sw + 1
  return [lax.slice(xp, (0, i, j, 0), (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c),
                    (1, sh, sw, 1))
          for i in range(kh) for j in range(kw)]


def _im2col(x, w, strides, pads, precision):
  """The convolution as one matmul of the (N, H_out, W_out, kh·kw·C_in) patches with the
  reshaped kernel; its transpose (the input gradient) is a matmul plus pads and adds."""
  kh, kw, c, o = w.shape
  cols = jnp.concatenate(_taps(x, (kh, kw), strides, pads), axis=-1)
  return lax.dot_general(cols, w.reshape(kh * kw * c, o), (((3,), (0,)), ((), ())),
                         precision=precision)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5))
def _conv_nhwc(x, w, strides, pads, precision, few):
  del few  # only the input tangent differs
  return _plain(x, w, strides, pads, precision)


@functools.partial(_conv_nhwc.defjvp, symbolic_zeros=True)
def _conv_jvp(strides, pads, precision, few, primals, tangents):
  x, w = primals
  x_dot, w_dot = tangents
  y = _plain(x, w, strides, pads, precision)
  zero = jax.custom_derivatives.SymbolicZero
  terms = []
  if not isinstance(x_dot, zero):
    if few:
      # im2col: the same linear map in x_dot, whose transpose avoids a convolution
      terms.append(_im2col(x_dot, w, strides, pads, precision))
    else:
      # The same linear map as _plain(x_dot, w); only its transpose's layout differs.
      w_oi = jnp.transpose(w, (0, 1, 3, 2))
      terms.append(lax.conv_general_dilated(x_dot, w_oi, strides, pads,
                                            dimension_numbers=_NHWC_HWOI,
                                            precision=precision))
  if not isinstance(w_dot, zero):
    terms.append(_plain(x, w_dot, strides, pads, precision))
  if not terms:
    return y, jnp.zeros_like(y)
  t = terms[0] if len(terms) == 1 else terms[0] + terms[1]
  return y, t.astype(y.dtype)
