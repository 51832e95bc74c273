"""Host work of recommender training: epoch sampling per process and evaluation padding.

  python -m benchmarks.bench_recsys_host --pairs=5000000 --users=500000 --items=100000

Prints (1) the host seconds to build one epoch's batches for process counts 1, 2, 4
(a process samples only its batch columns, recsys/data/sampling.py; simulated here by
building one process's share) and (2) the id-list padding ratio of the full-ranking
evaluator (padded id cells / real cells) on ../shared/data/tiktok with one split-wide
width (``bucket=False``) and with per-batch power-of-two buckets (default).
"""
from __future__ import annotations

import os
import time

import numpy as np
from absl import app, flags

from uatmc_jax.recsys.data.sampling import NegativeSampler, epoch_batches

flags.DEFINE_integer("pairs", 5_000_000, "train pairs of the synthetic epoch")
flags.DEFINE_integer("users", 500_000, "users")
flags.DEFINE_integer("items", 100_000, "items")
flags.DEFINE_integer("batch_size", 2048, "global batch size")
flags.DEFINE_integer("repeats", 3, "timed repeats (best is reported)")
flags.DEFINE_string("tiktok", "../shared/data/tiktok", "MMRec folder for the padding ratio")
FLAGS = flags.FLAGS


def _best(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  users = rng.integers(0, FLAGS.users, FLAGS.pairs)
  items = rng.integers(0, FLAGS.items, FLAGS.pairs)
  train = np.unique(np.stack([users, items], 1), axis=0).astype(np.int32)
  sampler = NegativeSampler(train, FLAGS.users, FLAGS.items)
  bs = FLAGS.batch_size
  print(f"epoch of {len(train):,} pairs, batch {bs}")
  old = lambda: sampler.sample(train[np.random.default_rng(1).permutation(len(train)), 0],
                               np.random.default_rng(1))
  print(f"  one global rng stream (before): {_best(old, FLAGS.repeats):.2f} s per epoch")
  for p in (1, 2, 4):
    share = slice(0, bs // p)
    sec = _best(lambda: epoch_batches(sampler, train, bs, 1, 1, columns=share), FLAGS.repeats)
    print(f"  {p} process(es): {sec:.2f} s per epoch per process")
  if os.path.isdir(FLAGS.tiktok):
    from uatmc_jax.recsys.data.mmrec import load_dataset
    from uatmc_jax.recsys.metrics import RankingEvaluator
    data = load_dataset(FLAGS.tiktok)
    for split in ("valid", "test"):
      a = RankingEvaluator(data, split, batch_size=2048, bucket=False)
      b = RankingEvaluator(data, split, batch_size=2048)
      print(f"  {data.name} {split}: padding ratio {a.padding_ratio:.1f} (one width) -> "
            f"{b.padding_ratio:.2f} (buckets, {b.n_programs} programs)")


if __name__ == "__main__":
  app.run(main)
