"""Throughput and model-FLOP utilisation (MFU) from the compiler's own cost model.

``flops_of(jitted_fn, *args)`` asks XLA for the FLOPs of one call
(``jitted_fn.lower(*args).compile().cost_analysis()["flops"]``); for a program
partitioned over a mesh this is the FLOP count of the *per-device* program, so

    MFU = flops_per_call / seconds_per_call / peak_flops(device)

is the per-chip utilisation (equal for every chip of a data-parallel step). Peak
numbers are the vendors' dense (no sparsity) figures per chip:

=========================  ===========  ==========
chip                       bf16 TFLOP/s  fp32 TFLOP/s
=========================  ===========  ==========
NVIDIA H100 / H200 (SXM)   989          67
NVIDIA H100 PCIe           756          51
NVIDIA A100                312          19.5
TPU v4                     275          -
TPU v5e (v5 lite)          197          -
TPU v5p                    459          -
TPU v6e (Trillium)         918          -
=========================  ===========  ==========

CPUs have no table entry: pass ``peak=`` or set ``UATMC_CPU_PEAK_FLOPS`` (FLOP/s of all
the cores the process uses), e.g. cores x GHz x FLOPs/cycle (AVX-512 FMA fp32: 64).
Without one, MFU is reported as unavailable rather than guessed.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax

# (substring of device_kind, lower-case) -> {dtype: peak FLOP/s per chip}. More specific
# names first: the first substring found wins.
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("h100 pcie", {"bfloat16": 756e12, "float32": 51e12}),
    ("h200", {"bfloat16": 989e12, "float32": 67e12}),
    ("h100", {"bfloat16": 989e12, "float32": 67e12}),
    ("a100", {"bfloat16": 312e12, "float32": 19.5e12}),
    ("tpu v4", {"bfloat16": 275e12}),
    ("tpu v5 lite", {"bfloat16": 197e12}),
    ("tpu v5e", {"bfloat16": 197e12}),
    ("tpu v5p", {"bfloat16": 459e12}),
    ("tpu v5", {"bfloat16": 459e12}),
    ("tpu v6", {"bfloat16": 918e12}),
)
CPU_PEAK_ENV = "UATMC_CPU_PEAK_FLOPS"


def _cost_dict(cost: Any) -> dict:
  # Older jax returned a list with one dict per program.
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})


def flops_of(fn: Callable, *args, **kwargs) -> float | None:
  """FLOPs of one call of ``fn(*args, **kwargs)`` per device, from XLA's cost analysis.

  Caveat: XLA counts the body of a ``while`` loop (``lax.scan``, ``fori_loop``) *once*,
  not times its trip count; for a function that loops N identical steps, measure one
  step (e.g. a 1-step scan) and multiply by N.

  Args:
    fn: a ``jax.jit``-wrapped function (a plain function is jitted here).
    *args, **kwargs: arguments or ``jax.ShapeDtypeStruct`` placeholders.

  Returns:
    The FLOP count, or None when the backend reports none.
  """
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
  compiled = jitted.lower(*args, **kwargs).compile()
  flops = _cost_dict(compiled.cost_analysis()).get("flops")
  return float(flops) if flops is not None and flops >= 0 else None


def peak_flops(device: jax.Device | None = None, dtype: str = "bfloat16") -> float | None:
  """Peak dense FLOP/s of one chip for ``dtype`` ("bfloat16" or "float32").

  GPUs/TPUs come from :data:`PEAK_FLOPS` by ``device.device_kind``; a CPU from the
  ``UATMC_CPU_PEAK_FLOPS`` environment variable. None when unknown.
  """
  device = device if device is not None else jax.devices()[0]
  if device.platform == "cpu":
    value = os.environ.get(CPU_PEAK_ENV)
    return float(value) if value else None
  kind = str(getattr(device, "device_kind", "")).lower()
  for name, table in PEAK_FLOPS:
    if name in kind:
      return table.get(dtype)
  return None


def mfu(flops_per_call: float | None, seconds_per_call: float,
        peak: float | None) -> float | None:
  """Model-FLOP utilisation in [0, 1] (None when a number is missing)."""
  if not flops_per_call or not peak or seconds_per_call <= 0:
    return None
  return flops_per_call / seconds_per_call / peak


@dataclasses.dataclass(frozen=True)
class Throughput:
  """One benchmark measurement: items/s, achieved FLOP/s per chip and MFU."""
  items_per_second: float
  seconds_per_call: float
  flops_per_call: float | None
  peak_flops: float | None
  unit: str = "examples"

  @property
  def achieved_flops(self) -> float | None:
    return self.flops_per_call / self.seconds_per_call if self.flops_per_call else None

  @property
  def mfu(self) -> float | None:
    return mfu(self.flops_per_call, self.seconds_per_call, self.peak_flops)

  def line(self) -> str:
    """``123.4 examples/s, 0.52 s/call, 1.23 TFLOP/s per chip, MFU 12.3%``."""
    parts = [f"{self.items_per_second:,.1f} {self.unit}/s",
             f"{self.seconds_per_call:.4g} s/call"]
    if self.achieved_flops is not None:
      parts.append(f"{self.achieved_flops / 1e12:.3g} TFLOP/s per chip")
    m = self.mfu
    parts.append(f"MFU {100 * m:.2f}%" if m is not None else
                 "MFU n/a (no peak for this chip; set " + CPU_PEAK_ENV + " on CPU)")
    return ", ".join(parts)


def measure(fn: Callable, *args, items_per_call: int, repeats: int = 5, warmup: int = 1,
            dtype: str = "bfloat16", peak: float | None = None,
            unit: str = "examples") -> Throughput:
  """Times ``fn(*args)`` (jitted; results blocked on) and reports throughput and MFU.

  Args:
    fn: a jitted function without donated arguments (the same args are reused).
    *args: its arguments.
    items_per_call: examples (users, images, targets...) processed by one call.
    repeats: timed calls (their mean time is reported).
    warmup: untimed calls first (compilation).
    dtype: which peak to compare with ("bfloat16" or "float32").
    peak: overrides :func:`peak_flops`.
    unit: name of the items in the printout.
  """
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
  flops = flops_of(jitted, *args)
  for _ in range(warmup):
    jax.block_until_ready(jitted(*args))
  t0 = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(jitted(*args))
  secs = (time.perf_counter() - t0) / repeats
  peak = peak if peak is not None else peak_flops(dtype=dtype)
  return Throughput(items_per_second=items_per_call / secs, seconds_per_call=secs,
                    flops_per_call=flops, peak_flops=peak, unit=unit)
