"""PGD-10 adversarial-training throughput (images/s) and MFU for long-tail AT (B.3/B.4).

One full training step of ``LongTailTrainer`` (PGD-10 inner maximisation with BN in
inference mode + the outer SGD update with BN in training mode) at batch 128 on random
32x32 images; default ResNet-18 (CIFAR stem) with PGD-AT, optionally MCAT (MS-PGD with
T_z = 5 latent steps through the class-conditional generators, plus the ETF term).

FLOPs: XLA's cost analysis of the compiled pieces without loops (it does not multiply a
``while`` body by its trip count), combined as
    attack_steps x [eval fwd + input-grad bwd]  +  [train fwd + param-grad bwd]
(+ the manifold refresh for MCAT). MFU = achieved FLOP/s / assumed peak; the CPU peak is
stated by ``--peak_gflops`` (default: 2 cores x 2.0 GHz x 2 AVX-512 FMA units x 16 fp32
lanes x 2 = 256 GFLOP/s for the 2-core Xeon (Sapphire Rapids) of the build machine).

  python benchmarks/bench_longtail_step.py                       # ResNet-18, PGD-AT
  python benchmarks/bench_longtail_step.py --method mcat --steps 2
  python benchmarks/bench_longtail_step.py --model small_cnn --steps 5
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

from uatmc_jax.models import image_classifiers as ic  # noqa: E402
from uatmc_jax.objectives import classification_losses as cl  # noqa: E402
from uatmc_jax.objectives import manifold as manifold_lib  # noqa: E402
from uatmc_jax.parallel import mesh as mesh_lib  # noqa: E402
from uatmc_jax.training import longtail_methods, longtail_trainer  # noqa: E402


def _flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", 0.0))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="resnet18")
  p.add_argument("--method", default="pgd_at")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
  p.add_argument("--num_classes", type=int, default=10)
  p.add_argument("--peak_gflops", type=float, default=256.0)
  p.add_argument("--dtype", default="float32")
  args = p.parse_args()

  method = longtail_methods.resolve_method(args.method)
  config = longtail_trainer.LongTailTrainConfig(
      model=args.model, model_kwargs={"dtype": args.dtype}, num_epochs=1,
      batch_size=args.batch, manifold_warmup_epochs=0)
  counts = np.floor(5000 * 0.01 ** (np.arange(args.num_classes) / (args.num_classes - 1)))
  mesh = mesh_lib.make_mesh()
  trainer = longtail_trainer.LongTailTrainer(config, method, num_classes=args.num_classes,
                                             class_counts=counts, steps_per_epoch=100,
                                             mesh=mesh)
  state = trainer.init_state()
  rng = np.random.default_rng(0)
  batch = mesh_lib.shard_batch({
      "image": rng.random((args.batch, 32, 32, 3), np.float32),
      "label": rng.integers(0, args.num_classes, args.batch).astype(np.int32)}, mesh)
  flags = trainer.step_flags(10**6)

  # FLOPs of the loop-free pieces.
  params, stats = state["params"], state["batch_stats"]
  x, y = batch["image"], batch["label"]

  def attack_grad(xa):
    return jax.grad(lambda z: cl.softmax_cross_entropy(
        logits=ic.apply_logits(trainer.graphdef, params, stats, z, train=False)[0],
        labels=y).sum())(xa)

  def outer(p_):
    return jax.grad(lambda q: cl.softmax_cross_entropy(
        logits=ic.apply_logits(trainer.graphdef, q, stats, x, train=True)[0], labels=y).mean())(p_)

  per_attack_step = _flops(attack_grad, x)
  outer_flops = _flops(outer, params) * (2 if method.needs_clean_logits else 1)
  extra = 0.0
  if method.uses_manifold:
    mp = manifold_lib.ManifoldParams(*state["manifold"]["params"])
    phi = ic.apply_features(trainer.graphdef, params, stats, x, train=False)[0]
    # d_My's cost per attack step: T_z latent grad steps + final generator pass + its
    # φ-gradient; measured by unrolling the T_z steps (no loop).
    def dist_grad(ph):
      def d(ph):
        z = jax.lax.stop_gradient(manifold_lib.encode(mp.encoder, ph, y))
        for _ in range(config.latent_steps):
          z = z - config.latent_step_size * jax.grad(lambda zz: jnp.sum(
              (ph - manifold_lib.generate(mp.generator, zz, y)) ** 2))(z)
        return jnp.sum((ph - manifold_lib.generate(mp.generator, jax.lax.stop_gradient(z), y)) ** 2)
      return jax.grad(d)(ph)
    per_attack_step += _flops(dist_grad, phi)
    if flags.fit_manifold:
      extra += config.manifold_fit_steps * _flops(
          jax.grad(manifold_lib.reconstruction_loss), mp, phi, y)
  step_flops = config.attack_steps * per_attack_step + outer_flops + extra

  key = jax.random.key(0)
  t0 = time.perf_counter()
  state, m = trainer.train_step(state, batch, key, flags=flags)
  jax.block_until_ready(m["loss"])
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(args.steps):
    t0 = time.perf_counter()
    state, m = trainer.train_step(state, batch, jax.random.fold_in(key, i + 1), flags=flags)
    jax.block_until_ready(m["loss"])
    times.append(time.perf_counter() - t0)
  sec = float(np.median(times))
  ips = args.batch / sec
  achieved = step_flops / sec
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  model={args.model} "
        f"method={method.name} batch={args.batch} dtype={args.dtype}")
  print(f"first step (compile+run): {compile_s:.1f} s; timed steps: "
        f"{', '.join(f'{t:.2f}' for t in times)} s")
  print(f"PGD-{config.attack_steps} AT step: {sec:.2f} s -> {ips:.2f} images/s")
  print(f"FLOPs/step (cost analysis): {step_flops / 1e9:.1f} GFLOP "
        f"(attack step {per_attack_step / 1e9:.2f}, outer {outer_flops / 1e9:.2f}, "
        f"manifold refresh {extra / 1e9:.2f}); achieved {achieved / 1e9:.1f} GFLOP/s; "
        f"MFU {100 * achieved / (args.peak_gflops * 1e9):.1f}% of an assumed "
        f"{args.peak_gflops:.0f} GFLOP/s peak")


if __name__ == "__main__":
  main()
