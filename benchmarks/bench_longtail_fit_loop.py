"""Training-loop host overhead of the long-tail trainer: steps/s of ``LongTailTrainer.fit``
(step metrics kept on device and fetched once per epoch, next batch copied ahead) against
the same loop without fit's checkpoint writes ("deferred"), and against
the same loop with a host sync after every step (metrics fetched per step, as the loop
was before), on the cpu_small model (small CNN 16/32/64/128, PGD-3, batch 64) and
random 32x32 images. Both loops run the same jitted step (compiled before timing) on the
same batches, alternating rounds so that both see the same machine load.

  python benchmarks/bench_longtail_fit_loop.py --epochs 2 --rounds 2
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--n_images", type=int, default=640)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--attack_steps", type=int, default=3)
  p.add_argument("--epochs", type=int, default=2)
  p.add_argument("--rounds", type=int, default=2)
  args = p.parse_args()

  import jax
  from uatmc_jax.core.parallel import mesh as mesh_lib
  from uatmc_jax.core.parallel import multihost
  from uatmc_jax.longtail import epoch_metrics
  from uatmc_jax.longtail import methods as lm
  from uatmc_jax.longtail import trainer as lt
  from uatmc_jax.longtail.data.image_pipeline import TrainPipeline
  from uatmc_jax.longtail.train_config import LongTailTrainConfig

  rng = np.random.default_rng(0)
  labels = (np.arange(args.n_images) % 10).astype(np.int32)
  images = rng.integers(0, 256, (args.n_images, 32, 32, 3)).astype(np.uint8)
  pipe = TrainPipeline(images, labels, batch_size=args.batch, seed=0)
  config = LongTailTrainConfig(model="small_cnn",
                               model_kwargs=dict(widths=(16, 32, 64, 128)),
                               num_epochs=args.epochs, batch_size=args.batch,
                               attack_steps=args.attack_steps)
  trainer = lt.LongTailTrainer(config, lm.resolve_method("pgd_at"), num_classes=10,
                               class_counts=np.bincount(labels),
                               steps_per_epoch=pipe.steps_per_epoch)

  def per_step_sync():
    state = trainer.init_state()
    for epoch in range(args.epochs):
      for step, batch in enumerate(pipe.epoch(epoch)):
        dev = mesh_lib.shard_batch(batch, trainer.mesh)
        state, metrics = trainer.train_step(state, dev, trainer.step_key(epoch, step),
                                            flags=trainer.step_flags(epoch))
        multihost.to_host(metrics.pop("per_class"))
        _ = {k: float(v) for k, v in metrics.items()}
    jax.block_until_ready(state)

  def deferred():
    # fit's loop body without its checkpoint / TensorBoard writes
    state = trainer.init_state()
    for epoch in range(args.epochs):
      hist = []
      for step, dev in enumerate(trainer._device_batches(pipe.epoch(epoch))):
        state, metrics = trainer.train_step(state, dev, trainer.step_key(epoch, step),
                                            flags=trainer.step_flags(epoch))
        hist.append(metrics)
      epoch_metrics.epoch_sums(multihost.to_host(hist))
    jax.block_until_ready(state)

  def fit():
    with tempfile.TemporaryDirectory() as d:
      state, _ = trainer.fit(pipe, os.path.join(d, "w"), progress_every_seconds=-1)
      jax.block_until_ready(state)

  per_step_sync()  # compile
  steps = args.epochs * pipe.steps_per_epoch
  times = {"per_step_sync": [], "deferred": [], "fit": []}
  for _ in range(args.rounds):
    for name, fn in (("per_step_sync", per_step_sync), ("deferred", deferred), ("fit", fit)):
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  load = os.getloadavg()[0]
  for name, ts in times.items():
    print(f"{name}: {steps / min(ts):.2f} steps/s (best of {len(ts)}; {steps} steps; "
          f"fit includes its per-epoch checkpoint writes)")
  print(f"devices: {jax.device_count()} {jax.devices()[0].platform}; load average {load:.1f}")


if __name__ == "__main__":
  main()
