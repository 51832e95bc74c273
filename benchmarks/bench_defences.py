"""Training cost of each defence relative to vanilla BPR (issue 4; METHODS.md A.7).

Prints the steady-state seconds of one training epoch (the A.3 protocol: batch 2048,
Adam, one jitted scan per epoch; the first, compiling epoch is reported separately) for
vanilla, APR, AMR, UAT-MC without alignment and UAT-MC (second-order alignment term
included) on ../shared/data/tiktok (9,308 users x 6,710 items, 59,541 train pairs,
128-d image/audio), and each one's ratio to vanilla. Goal: UAT-MC <= 3x vanilla.

  python benchmarks/bench_defences.py                     # vbpr_mlp, all defences, 3 epochs
  python benchmarks/bench_defences.py --model mmgcn --epochs 2
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from uatmc_jax.data.mmrec import load_mmrec  # noqa: E402
from uatmc_jax.defences import DEFENCES  # noqa: E402
from uatmc_jax.models.registry import build_recommender  # noqa: E402
from uatmc_jax.parallel.mesh import make_mesh  # noqa: E402
from uatmc_jax.training.recsys_trainer import RecsysTrainer  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")


def epoch_seconds(model_name: str, data, defence: str, epochs: int) -> tuple[float, float]:
  """(first epoch seconds incl. compile, mean steady-state epoch seconds)."""
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
  return first, sum(times) / len(times)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="vbpr_mlp")
  p.add_argument("--dataset", default=os.path.join(DATA, "tiktok"))
  p.add_argument("--defences", default=",".join(DEFENCES))
  p.add_argument("--epochs", type=int, default=3, help="timed epochs after the first")
  a = p.parse_args()
  data = load_mmrec(a.dataset)
  print(f"{data.summary()}\nmodel {a.model}, {jax.device_count()} {jax.devices()[0].platform} "
        f"device(s), batch 2048, {a.epochs} timed epochs")
  rows = {}
  for name in a.defences.split(","):
    rows[name] = epoch_seconds(a.model, data, name, a.epochs)
    print(f"  {name:16s} first epoch {rows[name][0]:7.2f} s   steady {rows[name][1]:7.3f} s/epoch",
          flush=True)
  base = rows.get("vanilla", (None, None))[1]
  print("\n| defence | s/epoch | x vanilla | first epoch (compile) s |\n|---|---|---|---|")
  for name, (first, steady) in rows.items():
    ratio = f"{steady / base:.2f}" if base else "-"
    print(f"| {name} | {steady:.3f} | {ratio} | {first:.1f} |")
  if base and "uat_mc" in rows:
    r = rows["uat_mc"][1] / base
    print(f"\nUAT-MC (with the second-order alignment term) / vanilla = {r:.2f}x "
          f"(goal <= 3x: {'met' if r <= 3 else 'NOT met'})")


if __name__ == "__main__":
  main()
