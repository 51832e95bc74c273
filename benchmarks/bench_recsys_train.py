"""Training and evaluation speed of the recommenders (METHODS.md A.3 protocol).

Prints, per model and setting, the steady-state seconds of one training epoch (BPR,
batch 2048, Adam; the first epoch, which compiles, is reported separately) and the
full-ranking evaluation throughput in users/s (all items scored, train items masked,
top-50, every metric). Settings:

* tiktok: ../shared/data/tiktok (9,308 users x 6,710 items, 59,541 train, 128-d
  image/audio);
* baby: ../shared/data/baby interactions (19,445 x 7,050, 118,551 train) with random
  4096-d image and 384-d text features (the real MMRec widths).

Model ``mmgcn_segment`` is MMGCN with its earlier segment-sum forward (per-modality
``segment_sum`` message passing Â (x W_conv) over all nodes, the loss taking its batch rows
from the full encode), the in-run baseline for the CSR / batch-rows forward of ``mmgcn``:
same parameters, same function (tests/test_graph_propagation.py), same run conditions.
MMRec's MMGCN takes 13.6 s per TikTok epoch on this CPU (docs/results/performance.md).

Reference: a straightforward PyTorch VBPR-MLP with the same protocol on this 2-core CPU
takes 4.7 s per TikTok epoch; the goal is at least 2x faster (<= 2.35 s). On a shared
machine the wall time depends on the load; the process CPU seconds of an epoch (all
threads) are printed too: on an idle machine with P cores the wall time is at least
CPU s / P.

  python benchmarks/bench_recsys_train.py                       # all models, both settings
  python benchmarks/bench_recsys_train.py --models vbpr_mlp --settings tiktok --epochs 3

MFU: FLOPs of one training step and of one evaluation batch from XLA's cost analysis
(``uatmc_jax.core.parallel.throughput``; a scan body is counted once, so the epoch's FLOPs
are one step's times the number of steps), over the chip's peak: the table in
``throughput.PEAK_FLOPS`` on GPU/TPU, ``--peak_gflops`` (or ``UATMC_CPU_PEAK_FLOPS``) on
CPU, default 256 GFLOP/s = 2 cores x 2.0 GHz x 2 AVX-512 FMA units x 16 fp32 lanes x 2.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from uatmc_jax.core.parallel import throughput  # noqa: E402
from uatmc_jax.core.parallel.mesh import make_mesh  # noqa: E402
from uatmc_jax.recsys import metrics as ranking_metrics  # noqa: E402
from uatmc_jax.recsys import trainer as recsys_trainer  # noqa: E402
from uatmc_jax.recsys.data.mmrec import load_mmrec  # noqa: E402
from uatmc_jax.recsys.models import base as base  # noqa: E402
from uatmc_jax.recsys.models.mmgcn import MMGCN  # noqa: E402
from uatmc_jax.recsys.models.registry import build_recommender  # noqa: E402
from uatmc_jax.recsys.trainer import RecsysTrainer  # noqa: E402

REFERENCE_TIKTOK_EPOCH_SECONDS = 4.7
MMREC_MMGCN_TIKTOK_EPOCH_SECONDS = 13.6  # METHODS.md A.3, MMRec on this 2-core CPU
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")


class SegmentSumMMGCN(MMGCN):
  """MMGCN with its earlier segment-sum forward (the benchmark's baseline; same parameters)."""

  def _forward(self, projected_all, rows=None):
    base.check_features(projected_all, self.modalities, self.n_items)
    ids = self.id_embedding[...]
    n_nodes = self.n_users + self.n_items
    edges = (self.edge_dst[...], self.edge_src[...], self.edge_weight[...])
    out = [ids]
    for m in self.modalities:
      x = base.l2_normalize(jnp.concatenate([self.preferences[m][...], projected_all[m]], 0))
      for layer in self.branches[m]:
        x = layer(x, ids, *edges, n_nodes)
      out.append(x)
    nodes = jnp.concatenate(out, axis=-1)
    return nodes if rows is None else jnp.take(nodes, rows, axis=0)


def build_model(name: str, data):
  if name == "mmgcn_segment":
    dims = {m: int(f.shape[1]) for m, f in data.features.items()}
    return SegmentSumMMGCN(data.n_users, data.n_items, dims, data.train, rngs=nnx.Rngs(0))
  return build_recommender(name, data, {}, nnx.Rngs(0))


def load_setting(name: str):
  if name == "tiktok":
    return load_mmrec(os.path.join(DATA, "tiktok"))
  if name == "baby":
    return load_mmrec(os.path.join(DATA, "baby"), random_features={"image": 4096, "text": 384})
  raise SystemExit(f"unknown setting {name!r} (tiktok, baby)")


def bench(model_name: str, data, epochs: int, eval_repeats: int, max_batches: int = 0) -> dict:
  """Epoch seconds (first = with compile; then min/median of ``epochs``) and eval users/s.

  With ``max_batches`` > 0 the timed epoch uses only that many batches of the (shuffled)
  train set and the reported epoch seconds are scaled by full_batches / max_batches.
  """
  import dataclasses
  import numpy as np
  full_batches = -(-len(data.train) // 2048)
  scale = 1.0
  train_data = data
  if max_batches and max_batches < full_batches:
    rows = np.random.default_rng(0).permutation(len(data.train))[:max_batches * 2048]
    train_data = dataclasses.replace(data, train=data.train[np.sort(rows)])
    scale = full_batches / max_batches
  model = build_model(model_name, train_data)
  trainer = RecsysTrainer(model, train_data, {"log": False}, mesh=make_mesh())
  t0 = time.perf_counter()
  trainer.train_epoch(0)
  first = time.perf_counter() - t0
  times, cpu_times = [], []
  for e in range(1, epochs + 1):
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train_epoch(e)
    times.append(time.perf_counter() - t0)
    cpu_times.append(time.process_time() - c0)
  times = [t * scale for t in times]
  cpu_times = [t * scale for t in cpu_times]
  trainer.evaluate("test")  # compile
  ev = trainer.evaluators["test"]
  t0 = time.perf_counter()
  for _ in range(eval_repeats):
    jax.block_until_ready(trainer.evaluate("test"))
  eval_s = (time.perf_counter() - t0) / eval_repeats
  # FLOPs (per device): one step (a 1-step epoch) x steps; one eval batch x batches.
  batches = trainer._device_epoch(0)
  n_steps = int(batches["users"].shape[0])
  step_flops = throughput.flops_of(
      recsys_trainer._run_epoch, *trainer._static, trainer.params, trainer.opt_state,
      trainer.rest, trainer.features, jax.tree.map(lambda x: x[:1], batches),
      jax.random.key(0))
  users, items = trainer.vectors()
  eval_flops = throughput.flops_of(ranking_metrics._add_user_batch_sums,
                                   ranking_metrics.zero_totals(ev.ks), users, items,
                                   ev._batches[0], ev.ks)
  return {"epoch_flops": step_flops and step_flops * n_steps * scale,
          "eval_flops": eval_flops and eval_flops * len(ev._batches),
          "epoch_cpu_s": min(cpu_times), "first_epoch_s": first, "epoch_s": min(times), "epoch_s_median": sorted(times)[len(times) // 2],
          "eval_users_per_s": ev.n_users / eval_s, "eval_s": eval_s, "eval_users": ev.n_users}


def _rate(flops, seconds, peak) -> str:
  if not flops:
    return "n/a"
  return f"{flops / seconds / 1e9:,.1f} ({100 * throughput.mfu(flops, seconds, peak):.1f}%)"


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default="vbpr_mlp,vbpr,mmgcn,mmgcn_segment")
  p.add_argument("--settings", default="tiktok,baby")
  p.add_argument("--epochs", type=int, default=3, help="timed epochs after the first")
  p.add_argument("--eval_repeats", type=int, default=2)
  p.add_argument("--max_batches", type=int, default=0,
                 help="time only this many batches per epoch and scale up (0 = full epochs)")
  p.add_argument("--peak_gflops", type=float, default=None,
                 help="chip peak for MFU (default: GPU/TPU table; CPU 256)")
  args = p.parse_args()
  peak = (args.peak_gflops * 1e9 if args.peak_gflops else throughput.peak_flops(dtype="float32")
          or 256e9)
  print(f"devices: {jax.devices()} ({os.cpu_count()} CPUs visible)")
  print(f"MFU against a peak of {peak / 1e9:,.0f} GFLOP/s per device (float32)")
  print("| setting | model | first epoch s (compile) | epoch s (min) | epoch s (median) | "
        "epoch CPU s (all threads) | train ex/s | eval users/s | train GFLOP/s (MFU) | "
        "eval GFLOP/s (MFU) |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for setting in args.settings.split(","):
    data = load_setting(setting)
    for name in args.models.split(","):
      r = bench(name, data, args.epochs, args.eval_repeats, args.max_batches)
      print(f"| {setting} | {name} | {r['first_epoch_s']:.2f} | {r['epoch_s']:.3f} | "
            f"{r['epoch_s_median']:.3f} | {r['epoch_cpu_s']:.2f} | "
            f"{len(data.train) / r['epoch_s']:,.0f} | "
            f"{r['eval_users_per_s']:,.0f} | {_rate(r['epoch_flops'], r['epoch_s'], peak)} | "
            f"{_rate(r['eval_flops'], r['eval_s'], peak)} |", flush=True)
      if setting == "tiktok" and name == "vbpr_mlp":
        print(f"  (VBPR-MLP TikTok epoch: {REFERENCE_TIKTOK_EPOCH_SECONDS / r['epoch_s']:.2f}x "
              f"faster than the {REFERENCE_TIKTOK_EPOCH_SECONDS} s PyTorch reference; goal 2x)",
              flush=True)
      if setting == "tiktok" and name.startswith("mmgcn"):
        print(f"  ({name} TikTok epoch: {MMREC_MMGCN_TIKTOK_EPOCH_SECONDS / r['epoch_s']:.2f}x "
              f"faster than MMRec's {MMREC_MMGCN_TIKTOK_EPOCH_SECONDS} s; goal 10x)", flush=True)


if __name__ == "__main__":
  main()
