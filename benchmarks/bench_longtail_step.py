"""PGD-k adversarial-training throughput (images/s) and MFU for long-tail AT (B.3/B.4),
optionally against an equivalent PyTorch model timed in the same run.

One full training step of ``LongTailTrainer`` (PGD-k inner maximisation with BN in
inference mode + the outer SGD update with BN in training mode) on random 32x32
images; default ResNet-18 (CIFAR stem) with PGD-AT, optionally MCAT (MS-PGD with
T_z = 5 latent steps through the class-conditional generators, plus the ETF term).

``--torch`` builds the same small CNN in PyTorch (conv3x3 without bias - BN - ReLU -
2x2 max-pool per width, global average pool, linear head; BN momentum 0.1, eps 1e-5;
SGD momentum 0.9, coupled weight decay 5e-4) and the same step (uniform random start in
the ε-ball, k signed-gradient steps with BN in eval mode, clip to ball and box, then one
train-mode forward/backward and SGD update), and times the two frameworks in
alternating rounds so that both see the same machine load. PyTorch is an optional,
benchmark-only dependency (``pip install torch``); without it the benchmark says
"torch not installed" and times JAX alone. ``--torch`` supports ``--model small_cnn``
with ``--method pgd_at`` only.

FLOPs: XLA's cost analysis (``parallel.throughput.flops_of``) of the compiled pieces
without loops (it does not multiply a ``while`` body by its trip count), combined as
    attack_steps x [eval fwd + input-grad bwd]  +  [train fwd + param-grad bwd]
(+ the manifold refresh for MCAT); the PyTorch step does the same arithmetic, so the same
count is used for its MFU. MFU = achieved FLOP/s / peak; the CPU peak is
``UATMC_CPU_PEAK_FLOPS`` if set, else ``--peak_gflops``, else an estimate from
/proc/cpuinfo: cores x MHz x FLOPs/cycle/core (64 with AVX-512, 32 with AVX2+FMA: two
FMA units x 8 fp32 lanes x 2).

  python benchmarks/bench_longtail_step.py                       # ResNet-18, PGD-AT
  python benchmarks/bench_longtail_step.py --method mcat --steps 2
  python benchmarks/bench_longtail_step.py --model small_cnn --widths 16+32+64+128 --torch
  python benchmarks/bench_longtail_step.py --model small_cnn --torch --single_thread

``--conv_rule_ab`` also times a second trainer whose convolutions skip conv_ops'
few-input-channel path (``few_input_channels=0``, the general rewrite for every layer),
alternating with the default in each round, and prints the ratio (PGD-k AT step with the
few-channel first layer vs without; docs/results/performance.md):

  XLA_FLAGS=--xla_cpu_multi_thread_eigen=false taskset -c 1 python \
      benchmarks/bench_longtail_step.py --model small_cnn --widths 16+32+64+128 \
      --attack_steps 3 --single_thread --conv_rule_ab --rounds 5
"""
from __future__ import annotations

import argparse
import functools
import os
import pathlib
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--single_thread" in sys.argv:  # before jax is imported: one intra-op thread for XLA
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen"
                             "=false intra_op_parallelism_threads=1").strip()
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from uatmc_jax.core.parallel import mesh as mesh_lib  # noqa: E402
from uatmc_jax.core.parallel import throughput  # noqa: E402
from uatmc_jax.longtail import losses as cl  # noqa: E402
from uatmc_jax.longtail import manifold as manifold_lib  # noqa: E402
from uatmc_jax.longtail import methods as longtail_methods  # noqa: E402
from uatmc_jax.longtail import trainer as longtail_trainer  # noqa: E402
from uatmc_jax.longtail.models import conv_ops  # noqa: E402
from uatmc_jax.longtail.models import image_classifiers as ic  # noqa: E402
from uatmc_jax.longtail.train_config import LongTailTrainConfig  # noqa: E402


def cpu_peak_flops_estimate() -> tuple[float | None, str]:
  """(peak FLOP/s of this process's CPU cores, how it was derived) from /proc/cpuinfo."""
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read()
  except OSError:
    return None, "no /proc/cpuinfo"
  flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines()
                if ln.startswith("flags")), [])
  mhz = [float(ln.split(":", 1)[1]) for ln in info.splitlines() if ln.startswith("cpu MHz")]
  per_cycle = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= set(flags) else 16
  cores = len(os.sched_getaffinity(0))
  if not mhz:
    return None, "no cpu MHz in /proc/cpuinfo"
  peak = cores * mhz[0] * 1e6 * per_cycle
  return peak, (f"estimated {cores} cores x {mhz[0]:.0f} MHz x {per_cycle} fp32 FLOP/cycle "
                f"({'AVX-512' if per_cycle == 64 else 'AVX2+FMA' if per_cycle == 32 else 'SSE'})")


def _torch_step_fn(widths, num_classes, batch, attack_steps, epsilon, step_size, lr):
  """An equivalent PyTorch small CNN and its PGD-k AT step; returns (step, threads) or
  raises ImportError."""
  import torch
  import torch.nn.functional as F
  from torch import nn

  torch.manual_seed(0)
  layers, c = [], 3
  for w in widths:
    layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
               nn.MaxPool2d(2)]
    c = w
  net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))
  opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
  g = torch.Generator().manual_seed(0)
  x = torch.rand(batch, 3, 32, 32, generator=g)
  y = torch.randint(0, num_classes, (batch,), generator=g)

  def step():
    net.eval()
    delta = (torch.rand_like(x) * 2 - 1) * epsilon
    x_adv = (x + delta).clamp(0, 1)
    for _ in range(attack_steps):
      x_adv.requires_grad_(True)
      loss = F.cross_entropy(net(x_adv), y)
      (grad,) = torch.autograd.grad(loss, x_adv)
      x_adv = x_adv.detach() + step_size * grad.sign()
      x_adv = torch.min(torch.max(x_adv, x - epsilon), x + epsilon).clamp(0, 1)
    net.train()
    loss = F.cross_entropy(net(x_adv), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()

  return step, torch.get_num_threads()


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="resnet18")
  p.add_argument("--widths", default=None, help="small_cnn widths, e.g. 16+32+64")
  p.add_argument("--method", default="pgd_at")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--attack_steps", type=int, default=10, help="PGD steps in the train step")
  p.add_argument("--steps", type=int, default=2,
                 help="timed steps (per framework and round) after one warm-up step")
  p.add_argument("--rounds", type=int, default=1, help="alternating JAX/PyTorch rounds")
  p.add_argument("--num_classes", type=int, default=10)
  p.add_argument("--peak_gflops", type=float, default=None)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--torch", action="store_true", help="also time the PyTorch equivalent")
  p.add_argument("--single_thread", action="store_true",
                 help="one compute thread for both frameworks (a fairer comparison on an "
                      "oversubscribed machine, where OpenMP/Eigen thread pools contend)")
  p.add_argument("--conv_rule_ab", action="store_true",
                 help="also time the step without conv_ops' few-input-channel path")
  args = p.parse_args()

  widths = tuple(int(w) for w in args.widths.split("+")) if args.widths else None
  model_kwargs = {"dtype": args.dtype}
  if widths:
    model_kwargs["widths"] = widths
  method = longtail_methods.resolve_method(args.method)
  config = LongTailTrainConfig(
      model=args.model, model_kwargs=model_kwargs, num_epochs=1, batch_size=args.batch,
      attack_steps=args.attack_steps, manifold_warmup_epochs=0)
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

  per_attack_step = throughput.flops_of(attack_grad, x) or 0.0
  outer_flops = (throughput.flops_of(outer, params) or 0.0) * (
      2 if method.needs_clean_logits else 1)
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
    per_attack_step += throughput.flops_of(dist_grad, phi) or 0.0
    if flags.fit_manifold:
      extra += config.manifold_fit_steps * (throughput.flops_of(
          jax.grad(manifold_lib.reconstruction_loss), mp, phi, y) or 0.0)
  step_flops = config.attack_steps * per_attack_step + outer_flops + extra

  if args.peak_gflops:
    peak, peak_note = args.peak_gflops * 1e9, "--peak_gflops"
  elif throughput.peak_flops(dtype=args.dtype) is not None:
    peak, peak_note = throughput.peak_flops(dtype=args.dtype), "device table / env"
  elif jax.devices()[0].platform == "cpu":
    peak, peak_note = cpu_peak_flops_estimate()
  else:
    peak, peak_note = None, "unknown device"

  torch_step, torch_note = None, ""
  if args.torch:
    if args.model != "small_cnn" or method.name != "pgd_at":
      sys.exit("--torch: only --model small_cnn --method pgd_at has a PyTorch equivalent here")
    try:
      torch_step, threads = _torch_step_fn(
          widths or (32, 64, 128), args.num_classes, args.batch, config.attack_steps,
          config.epsilon, config.attack_step_size, config.learning_rate)
      import torch
      if args.single_thread:
        torch.set_num_threads(1)
        threads = 1
      torch_note = f"torch {torch.__version__}, {threads} threads"
    except ImportError:
      torch_note = "torch not installed (pip install torch to compare)"

  general = None  # (trainer, state) with few_input_channels=0
  if args.conv_rule_ab:
    if args.torch:
      sys.exit("--conv_rule_ab and --torch are separate comparisons; pass one")
    general_trainer = longtail_trainer.LongTailTrainer(
        config, method, num_classes=args.num_classes, class_counts=counts,
        steps_per_epoch=100, mesh=mesh)
    model = nnx.merge(general_trainer.graphdef, state["params"], state["batch_stats"])
    conv_fn = functools.partial(conv_ops.conv_general_dilated, few_input_channels=0)
    for _, m in nnx.iter_graph(model):
      if isinstance(m, nnx.Conv):
        m.conv_general_dilated = conv_fn
    general_trainer.graphdef = ic.split_classifier(model)[0]
    general = [general_trainer, jax.tree.map(jnp.copy, state)]
    general[1], m = general_trainer.train_step(general[1], batch, jax.random.key(0), flags=flags)
    jax.block_until_ready(m["loss"])

  key = jax.random.key(0)
  t0 = time.perf_counter()
  state, m = trainer.train_step(state, batch, key, flags=flags)
  jax.block_until_ready(m["loss"])
  compile_s = time.perf_counter() - t0
  if torch_step is not None:
    torch_step()  # warm-up
  times = {"jax": [], "torch": [], "jax general conv": []}
  calls = 0
  for _ in range(args.rounds):
    for _ in range(args.steps):
      calls += 1
      t0 = time.perf_counter()
      state, m = trainer.train_step(state, batch, jax.random.fold_in(key, calls), flags=flags)
      jax.block_until_ready(m["loss"])
      times["jax"].append(time.perf_counter() - t0)
    if general is not None:
      for _ in range(args.steps):
        calls += 1
        t0 = time.perf_counter()
        general[1], m = general[0].train_step(general[1], batch, jax.random.fold_in(key, calls),
                                              flags=flags)
        jax.block_until_ready(m["loss"])
        times["jax general conv"].append(time.perf_counter() - t0)
    if torch_step is not None:
      for _ in range(args.steps):
        t0 = time.perf_counter()
        torch_step()
        times["torch"].append(time.perf_counter() - t0)

  load = os.getloadavg()
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  model={args.model} "
        f"widths={widths} method={method.name} batch={args.batch} dtype={args.dtype}  "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
  print(f"peak: {peak / 1e9:.0f} GFLOP/s ({peak_note})" if peak else f"peak: n/a ({peak_note})")
  print(f"FLOPs/step (cost analysis): {step_flops / 1e9:.2f} GFLOP (attack step "
        f"{per_attack_step / 1e9:.3f}, outer {outer_flops / 1e9:.3f}, manifold refresh "
        f"{extra / 1e9:.3f})")
  print(f"JAX first step (compile+run): {compile_s:.1f} s")
  results = {}
  for name, ts in times.items():
    if not ts:
      continue
    sec = float(np.median(ts))
    results[name] = throughput.Throughput(items_per_second=args.batch / sec,
                                          seconds_per_call=sec, flops_per_call=step_flops,
                                          peak_flops=peak, unit="images")
    print(f"{name:5s} PGD-{config.attack_steps} AT step: {results[name].line()}  "
          f"(steps: {', '.join(f'{t:.3f}' for t in ts)} s)")
  if "jax general conv" in results:
    pairs = zip(times["jax general conv"], times["jax"])
    print(f"few-channel first layer: step time general / default = "
          f"{results['jax general conv'].seconds_per_call / results['jax'].seconds_per_call:.2f}x"
          f" (per step pair {', '.join(f'{g / d:.2f}' for g, d in pairs)})")
  if args.torch and torch_step is None:
    print(f"torch: {torch_note}")
  elif "torch" in results:
    print(f"torch: {torch_note}; JAX / PyTorch images/s = "
          f"{results['jax'].items_per_second / results['torch'].items_per_second:.2f}x")


if __name__ == "__main__":
  main()
