"""AutoAttack throughput on CPU (or whatever JAX platform is present), METHODS.md B.5.

Two numbers, because AutoAttack's cost depends on how robust the model is:

1. Per-stage cost of one *robust* example (no early exit: APGD's 100 iterations,
   FAB-T's 100 iterations, Square's full query budget), from timed jitted batches after
   compilation; the worst-case standard-AutoAttack cost per robust example is
   APGD-CE + 9·APGD-T + 9·FAB-T + Square, and "apgd" is APGD-CE + 9·APGD-T. A
   non-robust example costs only up to the stage that fools it.
2. End-to-end `AutoAttack.run` examples/s (compilation excluded by a warm-up run on
   the same shapes) on the given model, labelled with its own predictions. An untrained
   network predicts almost one class everywhere and ε = 8/255 rarely changes that, so
   most points survive every stage: this is close to the worst case, not the cheap end.

  python benchmarks/bench_autoattack.py                          # small CNN, batch 32
  python benchmarks/bench_autoattack.py --model resnet18 --batch 8 --square_queries 500
"""
import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from uatmc_jax.core.parallel import throughput
from uatmc_jax.longtail.attacks import apgd, attack_losses, autoattack, fab, square  # noqa: E402
from uatmc_jax.longtail.models import image_classifiers as ic  # noqa: E402


def _time(fn, *args, repeats=1):
  jax.block_until_ready(fn(*args))  # compile + warm
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(fn(*args))
  return (time.perf_counter() - start) / repeats


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="small_cnn")
  p.add_argument("--num_classes", type=int, default=10)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--n", type=int, default=64, help="examples for the end-to-end run")
  p.add_argument("--apgd_iterations", type=int, default=100)
  p.add_argument("--square_queries", type=int, default=5000)
  p.add_argument("--skip_end_to_end", action="store_true")
  args = p.parse_args()

  model = ic.build_classifier(args.model, args.num_classes, nnx.Rngs(0))
  graphdef, params, stats = ic.split_classifier(model)
  logits_fn = lambda x: ic.apply_logits(graphdef, params, stats, x, train=False)[0]
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(size=(args.batch, 32, 32, 3)), jnp.float32)
  # Labels no attack can reach ("class −1" is never predicted) would break the losses;
  # instead time with early exits disabled on the model's own predictions.
  y = jnp.argmax(logits_fn(x), -1)
  eps = 8. / 255.
  key = jax.random.PRNGKey(0)
  b = args.batch
  print(f"device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform}), "
        f"model {args.model}, batch {b}")

  apgd_ce = jax.jit(lambda x, y: apgd.apgd_attack(
      logits_fn, x, y, epsilon=eps, key=key, num_iterations=args.apgd_iterations,
      early_stop=False).robust)
  apgd_t = jax.jit(lambda x, y: apgd.apgd_targeted_attack(
      logits_fn, x, y, epsilon=eps, target_rank=2, key=key,
      num_iterations=args.apgd_iterations, early_stop=False).robust)
  fab_t = jax.jit(lambda x, y: fab.fab_targeted_attack(logits_fn, x, y, target_rank=2).distance)
  sq = jax.jit(lambda x, y: square.square_attack(
      logits_fn, x, y, epsilon=eps, key=key, num_queries=args.square_queries,
      early_stop=False).robust)
  # Model FLOPs per stage (XLA counts a loop body once, so count per iteration):
  # F = one forward of the batch; an attack iteration with an input gradient is ~3F,
  # FAB's iteration needs the logits and the Jacobian rows of 2 classes (~5F), a Square
  # query is one forward.
  forward = throughput.flops_of(jax.jit(logits_fn), x) or 0.0
  peak = throughput.peak_flops(jax.devices()[0], "float32")
  stage_flops = {"apgd-ce": 3 * forward * args.apgd_iterations,
                 "apgd-t (1 target)": 3 * forward * args.apgd_iterations,
                 "fab-t (1 target)": 5 * forward * 100,
                 f"square ({args.square_queries} q)": forward * args.square_queries}
  per_example = {}
  for name, fn in (("apgd-ce", apgd_ce), ("apgd-t (1 target)", apgd_t),
                   ("fab-t (1 target)", fab_t), (f"square ({args.square_queries} q)", sq)):
    t = _time(fn, x, y)
    per_example[name] = t / b
    util = throughput.mfu(stage_flops[name], t, peak)
    print(f"  {name:24s} {t:8.2f} s/batch  {b / t:8.2f} examples/s  "
          f"{stage_flops[name] / t / 1e9:7.2f} model GFLOP/s  MFU "
          + (f"{100 * util:.2f}%" if util is not None else
             f"n/a (set {throughput.CPU_PEAK_ENV})"))
  square_full = per_example[f"square ({args.square_queries} q)"] * 5000 / args.square_queries
  apgd_scale = 100 / args.apgd_iterations
  worst_apgd = apgd_scale * (per_example["apgd-ce"] + 9 * per_example["apgd-t (1 target)"])
  worst_std = worst_apgd + 9 * per_example["fab-t (1 target)"] + square_full
  print(f"worst case per robust example (reference budgets): "
        f"apgd suite {worst_apgd:.2f} s ({1 / worst_apgd:.3f} ex/s), "
        f"standard {worst_std:.2f} s ({1 / worst_std:.3f} ex/s)")

  if not args.skip_end_to_end:
    images = rng.uniform(size=(args.n, 32, 32, 3)).astype(np.float32)
    labels = np.asarray(jax.jit(lambda z: jnp.argmax(logits_fn(z), -1))(images))
    aa = autoattack.AutoAttack(jax.jit(logits_fn), autoattack.AutoAttackConfig(
        epsilon=eps, batch_size=b, apgd_iterations=args.apgd_iterations,
        square_queries=args.square_queries))
    aa.run(images[:b], labels[:b])  # compile every stage on the batch shape
    start = time.perf_counter()
    res = aa.run(images, labels)
    t = time.perf_counter() - start
    print(f"end-to-end standard AutoAttack on the untrained model: {args.n / t:.2f} "
          f"examples/s ({t:.1f} s, robust {res.robust.sum()}/{args.n}, stage counts "
          f"{res.robust_after})")


if __name__ == "__main__":
  main()
