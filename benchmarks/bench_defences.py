"""Training cost of each defence relative to vanilla BPR (METHODS.md A.7).

Prints the steady-state seconds of one training epoch (the A.3 protocol: batch 2048,
Adam, one jitted scan per epoch; the first, compiling epoch is reported separately) for
vanilla, APR, AMR, UAT-MC without alignment and UAT-MC (second-order alignment term
included) on ../shared/data/tiktok (9,308 users x 6,710 items, 59,541 train pairs,
128-d image/audio), and each one's ratio to vanilla. Goal: UAT-MC <= 3x vanilla.

  python benchmarks/bench_defences.py                     # vbpr_mlp, all defences, 3 epochs
  python benchmarks/bench_defences.py --model mmgcn --epochs 2

Also printed: achieved GFLOP/s and MFU per defence (FLOPs of a 1-step epoch from XLA's
cost analysis x steps, since a scan body is counted once; peak from
``uatmc_jax.core.parallel.throughput`` on GPU/TPU, ``--peak_gflops`` on CPU, default 256 =
2 cores x 2.0 GHz x 2 AVX-512 FMA x 16 fp32 lanes x 2).
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from uatmc_jax.core.parallel import throughput  # noqa: E402
from uatmc_jax.core.parallel.mesh import make_mesh  # noqa: E402
from uatmc_jax.recsys import trainer as recsys_trainer  # noqa: E402
from uatmc_jax.recsys.data.mmrec import load_mmrec  # noqa: E402
from uatmc_jax.recsys.defences import DEFENCES  # noqa: E402
from uatmc_jax.recsys.models.registry import build_recommender  # noqa: E402
from uatmc_jax.recsys.trainer import RecsysTrainer  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")


def epoch_flops(trainer) -> float | None:
  """Per-device FLOPs of one epoch: a 1-step epoch's cost analysis x the step count."""
  batches = trainer._device_epoch(0)
  one = throughput.flops_of(recsys_trainer._run_epoch, *trainer._static, trainer.params,
                            trainer.opt_state, trainer.rest, trainer.features,
                            jax.tree.map(lambda x: x[:1], batches), jax.random.key(0))
  return one and one * int(batches["users"].shape[0])


def epoch_seconds(model_name: str, data, defence: str, epochs: int):
  """(first epoch seconds incl. compile, mean steady-state epoch seconds, epoch FLOPs)."""
  model = build_recommender(model_name, data, {}, nnx.Rngs(0))
  trainer = RecsysTrainer(model, data, {"loss": defence, "log": False}, mesh=make_mesh())
  t0 = time.perf_counter()
  trainer.train_epoch(0)
  jax.block_until_ready(trainer.params)
  first = time.perf_counter() - t0
  times = []
  for e in range(1, epochs + 1):
    t0 = time.perf_counter()
    trainer.train_epoch(e)
    jax.block_until_ready(trainer.params)
    times.append(time.perf_counter() - t0)
  return first, sum(times) / len(times), epoch_flops(trainer)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="vbpr_mlp")
  p.add_argument("--dataset", default=os.path.join(DATA, "tiktok"))
  p.add_argument("--defences", default=",".join(DEFENCES))
  p.add_argument("--epochs", type=int, default=3, help="timed epochs after the first")
  p.add_argument("--peak_gflops", type=float, default=None,
                 help="chip peak for MFU (default: GPU/TPU table; CPU 256)")
  a = p.parse_args()
  peak = (a.peak_gflops * 1e9 if a.peak_gflops else throughput.peak_flops(dtype="float32")
          or 256e9)
  data = load_mmrec(a.dataset)
  print(f"{data.summary()}\nmodel {a.model}, {jax.device_count()} {jax.devices()[0].platform} "
        f"device(s), batch 2048, {a.epochs} timed epochs")
  rows = {}
  for name in a.defences.split(","):
    rows[name] = epoch_seconds(a.model, data, name, a.epochs)
    print(f"  {name:16s} first epoch {rows[name][0]:7.2f} s   steady {rows[name][1]:7.3f} s/epoch",
          flush=True)
  print(f"\nMFU against {peak / 1e9:,.0f} GFLOP/s per device (float32 peak)")
  base = rows.get("vanilla", (None, None, None))[1]
  print("\n| defence | s/epoch | x vanilla | first epoch (compile) s | GFLOP/s (MFU) |\n"
        "|---|---|---|---|---|")
  for name, (first, steady, flops) in rows.items():
    ratio = f"{steady / base:.2f}" if base else "-"
    rate = (f"{flops / steady / 1e9:,.1f} ({100 * throughput.mfu(flops, steady, peak):.1f}%)"
            if flops else "n/a")
    print(f"| {name} | {steady:.3f} | {ratio} | {first:.1f} | {rate} |")
  if base and "uat_mc" in rows:
    r = rows["uat_mc"][1] / base
    print(f"\nUAT-MC (with the second-order alignment term) / vanilla = {r:.2f}x "
          f"(goal <= 3x: {'met' if r <= 3 else 'NOT met'})")


if __name__ == "__main__":
  main()
