"""Few-input-channel convolutions on CPU: the few-channel path of ``conv_ops`` against the
general rewrite (``few_input_channels=0``), timed alternately in one process.

Times, for ``SmallCNN(16, 32, 64, 128)`` on 32x32 images in inference mode: (a) the
forward pass at each ``--batches`` size, (b) a PGD-10 input-gradient loop
(``lax.fori_loop``: cross-entropy gradient, signed step, projection onto the ε-ball and
the box) at ``--loop_batch``; and (c) with ``--layer``, the first layer alone (3 -> 16
channels): forward, input gradient, kernel gradient. Prints median seconds per rule and
the ratio general / few-channel (> 1: the few-channel path is faster). The PGD-k
training step is ``bench_longtail_step.py --conv_rule_ab``. See
docs/results/performance.md.

  XLA_FLAGS=--xla_cpu_multi_thread_eigen=false taskset -c 1 \\
      python benchmarks/bench_conv_first_layer.py --rounds 5 --layer
"""
from __future__ import annotations

import argparse
import functools
import os
import pathlib
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax import lax  # noqa: E402

from uatmc_jax.longtail.models import conv_ops  # noqa: E402
from uatmc_jax.longtail.models import image_classifiers as ic  # noqa: E402

RULES = {"few": conv_ops.FEW_INPUT_CHANNELS, "general": 0}


def with_rule(module, few_input_channels: int):
  """Points every ``nnx.Conv`` of ``module`` at conv_ops with the given threshold."""
  fn = functools.partial(conv_ops.conv_general_dilated, few_input_channels=few_input_channels)
  for _, m in nnx.iter_graph(module):
    if isinstance(m, nnx.Conv):
      m.conv_general_dilated = fn
  return module


def _median(fn, args, reps):
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--widths", default="16+32+64+128")
  p.add_argument("--batches", default="32,128", help="forward batch sizes")
  p.add_argument("--loop_batch", type=int, default=128)
  p.add_argument("--loop_steps", type=int, default=10)
  p.add_argument("--rounds", type=int, default=5, help="alternating rounds")
  p.add_argument("--reps", type=int, default=10, help="forward calls per round")
  p.add_argument("--layer", action="store_true", help="also time the first layer alone")
  args = p.parse_args()
  widths = tuple(int(w) for w in args.widths.split("+"))
  eps, step = 8 / 255, 2 / 255

  models = {r: with_rule(ic.build_classifier("small_cnn", 10, nnx.Rngs(0), widths=widths), t)
            for r, t in RULES.items()}
  split = {r: ic.split_classifier(m) for r, m in models.items()}
  rng = np.random.default_rng(0)
  cases = []  # (label, {rule: (jitted fn, args)}, reps)

  for b in (int(v) for v in args.batches.split(",")):
    x = jnp.asarray(rng.random((b, 32, 32, 3), np.float32))
    fns = {r: (jax.jit(functools.partial(ic.apply_logits, gd, train=False)), (pa, st, x))
           for r, (gd, pa, st) in split.items()}
    cases.append((f"forward batch {b}", fns, args.reps))

  xb = jnp.asarray(rng.random((args.loop_batch, 32, 32, 3), np.float32))
  yb = jnp.asarray(rng.integers(0, 10, args.loop_batch).astype(np.int32))

  def pgd(gd, pa, st, x, y):
    def loss(z):
      logits = ic.apply_logits(gd, pa, st, z, train=False)[0]
      return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    def body(_, xa):
      xa = xa + step * jnp.sign(jax.grad(loss)(xa))
      return jnp.clip(jnp.clip(xa, x - eps, x + eps), 0.0, 1.0)
    return lax.fori_loop(0, args.loop_steps, body, x)

  cases.append((f"PGD-{args.loop_steps} loop batch {args.loop_batch}",
                {r: (jax.jit(functools.partial(pgd, gd)), (pa, st, xb, yb))
                 for r, (gd, pa, st) in split.items()}, 1))

  if args.layer:
    dn = ("NHWC", "HWIO", "NHWC")
    w = jnp.asarray(rng.normal(size=(3, 3, 3, widths[0])).astype(np.float32))
    g = jnp.asarray(rng.normal(size=(args.loop_batch, 32, 32, widths[0])).astype(np.float32))
    for what in ("forward", "input grad", "kernel grad"):
      fns = {}
      for r, t in RULES.items():
        conv = functools.partial(conv_ops.conv_general_dilated, window_strides=(1, 1),
                                 padding=((1, 1), (1, 1)), dimension_numbers=dn,
                                 few_input_channels=t)
        if what == "forward":
          f = lambda x_, w_, g_, conv=conv: conv(x_, w_)
        elif what == "input grad":
          f = lambda x_, w_, g_, conv=conv: jax.vjp(lambda z: conv(z, w_), x_)[1](g_)[0]
        else:
          f = lambda x_, w_, g_, conv=conv: jax.vjp(lambda v: conv(x_, v), w_)[1](g_)[0]
        fns[r] = (jax.jit(f), (xb, w, g))
      cases.append((f"first layer {what} batch {args.loop_batch}", fns, args.reps))

  for _, fns, _ in cases:  # compile
    for fn, a in fns.values():
      jax.block_until_ready(fn(*a))
  times = {label: {r: [] for r in RULES} for label, _, _ in cases}
  for _ in range(args.rounds):
    for label, fns, reps in cases:
      for r, (fn, a) in fns.items():
        times[label][r].append(_median(fn, a, reps))
  load = os.getloadavg()
  print(f"SmallCNN{widths}  rounds={args.rounds}  XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}  "
        f"cpus={sorted(os.sched_getaffinity(0))}  load average {load[0]:.2f} {load[1]:.2f} "
        f"{load[2]:.2f}")
  for label, by_rule in times.items():
    med = {r: float(np.median(v)) for r, v in by_rule.items()}
    ratios = [a / b for a, b in zip(by_rule["general"], by_rule["few"])]
    print(f"{label:34s} general {med['general'] * 1e3:9.2f} ms  few-channel "
          f"{med['few'] * 1e3:9.2f} ms  ratio {med['general'] / med['few']:.2f}x "
          f"(per round {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
  main()
