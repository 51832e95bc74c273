"""Training and evaluation speed of the recommenders (issue 2; METHODS.md A.3 protocol).

Prints, per model and setting, the steady-state seconds of one training epoch (BPR,
batch 2048, Adam; the first epoch, which compiles, is reported separately) and the
full-ranking evaluation throughput in users/s (all items scored, train items masked,
top-50, every metric). Settings:

* tiktok: ../shared/data/tiktok (9,308 users x 6,710 items, 59,541 train, 128-d
  image/audio);
* baby: ../shared/data/baby interactions (19,445 x 7,050, 118,551 train) with random
  4096-d image and 384-d text features (the real MMRec widths).

Reference: a straightforward PyTorch VBPR-MLP with the same protocol on this 2-core CPU
takes 4.7 s per TikTok epoch; the goal is at least 2x faster (<= 2.35 s).

  python benchmarks/bench_recsys_train.py                       # all models, both settings
  python benchmarks/bench_recsys_train.py --models vbpr_mlp --settings tiktok --epochs 3
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from uatmc_jax.data.mmrec import load_mmrec  # noqa: E402
from uatmc_jax.models.registry import build_recommender  # noqa: E402
from uatmc_jax.parallel.mesh import make_mesh  # noqa: E402
from uatmc_jax.training.recsys_trainer import RecsysTrainer  # noqa: E402

REFERENCE_TIKTOK_EPOCH_SECONDS = 4.7
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")


def load_setting(name: str):
  if name == "tiktok":
    return load_mmrec(os.path.join(DATA, "tiktok"))
  if name == "baby":
    return load_mmrec(os.path.join(DATA, "baby"), random_features={"image": 4096, "text": 384})
  raise SystemExit(f"unknown setting {name!r} (tiktok, baby)")


def bench(model_name: str, data, epochs: int, eval_repeats: int) -> dict:
  model = build_recommender(model_name, data, {}, nnx.Rngs(0))
  trainer = RecsysTrainer(model, data, {"log": False}, mesh=make_mesh())
  t0 = time.perf_counter()
  trainer.train_epoch(0)
  first = time.perf_counter() - t0
  times = []
  for e in range(1, epochs + 1):
    t0 = time.perf_counter()
    trainer.train_epoch(e)
    times.append(time.perf_counter() - t0)
  trainer.evaluate("test")  # compile
  ev = trainer.evaluators["test"]
  t0 = time.perf_counter()
  for _ in range(eval_repeats):
    jax.block_until_ready(trainer.evaluate("test"))
  eval_s = (time.perf_counter() - t0) / eval_repeats
  return {"first_epoch_s": first, "epoch_s": min(times), "epoch_s_median": sorted(times)[len(times) // 2],
          "eval_users_per_s": ev.n_users / eval_s, "eval_s": eval_s, "eval_users": ev.n_users}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default="vbpr_mlp,vbpr,mmgcn")
  p.add_argument("--settings", default="tiktok,baby")
  p.add_argument("--epochs", type=int, default=3, help="timed epochs after the first")
  p.add_argument("--eval_repeats", type=int, default=2)
  args = p.parse_args()
  print(f"devices: {jax.devices()} ({os.cpu_count()} CPUs visible)")
  print("| setting | model | first epoch s (compile) | epoch s (min) | epoch s (median) | "
        "train ex/s | eval users/s |")
  print("|---|---|---|---|---|---|---|")
  for setting in args.settings.split(","):
    data = load_setting(setting)
    for name in args.models.split(","):
      r = bench(name, data, args.epochs, args.eval_repeats)
      print(f"| {setting} | {name} | {r['first_epoch_s']:.2f} | {r['epoch_s']:.3f} | "
            f"{r['epoch_s_median']:.3f} | {len(data.train) / r['epoch_s']:,.0f} | "
            f"{r['eval_users_per_s']:,.0f} |", flush=True)
      if setting == "tiktok" and name == "vbpr_mlp":
        print(f"  (VBPR-MLP TikTok epoch: {REFERENCE_TIKTOK_EPOCH_SECONDS / r['epoch_s']:.2f}x "
              f"faster than the {REFERENCE_TIKTOK_EPOCH_SECONDS} s PyTorch reference; goal 2x)",
              flush=True)


if __name__ == "__main__":
  main()
