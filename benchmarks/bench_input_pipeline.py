"""Throughput of the long-tail image input pipeline (METHODS.md B.1) on this machine.

Prints:
* load time of the CIFAR-10 image folder (../shared/data/cifar10/train; decode, and
  the cached reload when ``--cache_dir`` is given); random images when it is absent;
* images/s of ``TrainPipeline`` (host numpy crop+flip, float32) synchronous and with
  background prefetch, the consumer doing nothing (the pipeline's own ceiling);
* images/s with a consumer that runs a jitted step (a small-CNN forward+backward at
  batch 128) fed by the host pipeline (with and without prefetch) vs. augmenting on
  device inside the step (``random_crop_flip_jax`` on uint8 batches), in alternating
  rounds so that each mode sees the same background load.

  python benchmarks/bench_input_pipeline.py                      # CIFAR-10 folder
  python benchmarks/bench_input_pipeline.py --cache_dir runs/c10_cache  # + cached reload
  python benchmarks/bench_input_pipeline.py --synthetic           # no data needed
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from uatmc_jax.longtail.data import image_pipeline  # noqa: E402
from uatmc_jax.longtail.data.image_folder import load_image_folder  # noqa: E402
from uatmc_jax.longtail.models import image_classifiers  # noqa: E402

DEFAULT_FOLDER = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "train"


def _load(args):
  if args.synthetic or not DEFAULT_FOLDER.is_dir():
    print(f"data: random uint8 images ({args.n} x 32x32x3)")
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (args.n, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, 10, args.n).astype(np.int32))
  t = time.perf_counter()
  ds = load_image_folder(DEFAULT_FOLDER, cache_dir=args.cache_dir)
  print(f"load {DEFAULT_FOLDER}: {len(ds)} images in {time.perf_counter() - t:.2f} s "
        f"({'cache ' + str(args.cache_dir) if args.cache_dir else 'no cache'})")
  if args.cache_dir:
    t = time.perf_counter()
    load_image_folder(DEFAULT_FOLDER, cache_dir=args.cache_dir)
    print(f"reload from cache: {time.perf_counter() - t:.2f} s")
  return ds.images, ds.labels


def _pipeline_only(images, labels, batch, prefetch, epochs=1):
  pipe = image_pipeline.TrainPipeline(images, labels, batch_size=batch, seed=0,
                                      prefetch=prefetch, process_index=0, process_count=1)
  t = time.perf_counter()
  n = 0
  for e in range(epochs):
    for b in pipe.epoch(e):
      n += b["image"].shape[0]
  return n / (time.perf_counter() - t)


def _make_step():
  model = image_classifiers.build_classifier("small_cnn", 10, nnx.Rngs(0))
  g, params, stats = image_classifiers.split_classifier(model)
  opt = optax.sgd(0.1, momentum=0.9)
  opt_state = opt.init(params)

  def train_step(params, stats, opt_state, x, y):
    def loss_fn(p):
      logits, new_stats = image_classifiers.apply_logits(g, p, stats, x, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_stats
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  host_step = jax.jit(train_step, donate_argnums=(0, 1, 2))

  @jax.jit
  def device_aug_step(params, stats, opt_state, key, x_uint8, y):
    x = image_pipeline.random_crop_flip_jax(key, x_uint8.astype(jnp.float32) / 255.0)
    return train_step(params, stats, opt_state, x, y)

  return (params, stats, opt_state), host_step, device_aug_step


def _with_step(images, labels, batch, steps, rounds=2):
  """Images/s of a small-CNN SGD step fed three ways, measured in alternating rounds
  (the machine is shared, so each mode gets the same mix of load)."""
  (params, stats, opt_state), host_step, device_aug_step = _make_step()
  pipes = {pf: image_pipeline.TrainPipeline(images, labels, batch_size=batch, seed=0,
                                            prefetch=pf, process_index=0, process_count=1)
           for pf in (0, 2)}
  rng = np.random.default_rng(0)
  order = rng.permutation(images.shape[0])
  key = jax.random.key(0)

  def raw(s):
    start = (s * batch) % (images.shape[0] - batch)
    idx = order[start:start + batch]
    return images[idx], labels[idx]

  def run_host(prefetch, n):
    nonlocal params, stats, opt_state
    it = pipes[prefetch].epoch(0)
    t = time.perf_counter()
    for _ in range(n):
      b = next(it)
      params, stats, opt_state, loss = host_step(params, stats, opt_state, b["image"],
                                                 b["label"])
    loss.block_until_ready()
    it.close()
    return time.perf_counter() - t

  def run_device(n):
    nonlocal params, stats, opt_state
    t = time.perf_counter()
    for s in range(n):
      x, y = raw(s)
      params, stats, opt_state, loss = device_aug_step(params, stats, opt_state,
                                                       jax.random.fold_in(key, s), x, y)
    loss.block_until_ready()
    return time.perf_counter() - t

  modes = {"host pipeline, prefetch 2": lambda n: run_host(2, n),
           "host pipeline, no prefetch": lambda n: run_host(0, n),
           "on-device augmentation in the step": run_device}
  for fn in modes.values():  # compile
    fn(1)
  seconds = {m: 0.0 for m in modes}
  for _ in range(rounds):
    for m, fn in modes.items():
      seconds[m] += fn(steps)
  return {m: rounds * steps * batch / sec for m, sec in seconds.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--cache_dir", default=None)
  parser.add_argument("--synthetic", action="store_true")
  parser.add_argument("--n", type=int, default=50000, help="synthetic images")
  parser.add_argument("--steps", type=int, default=8,
                      help="train steps per mode and round (2 alternating rounds)")
  args = parser.parse_args()
  print(f"devices: {jax.devices()[0].platform} x {jax.device_count()}, "
        f"cpu cores: {os.cpu_count()}")
  images, labels = _load(args)
  for prefetch in (0, 2):
    ips = _pipeline_only(images, labels, args.batch, prefetch)
    print(f"TrainPipeline alone (crop+flip+float32, batch {args.batch}, prefetch "
          f"{prefetch}): {ips:,.0f} images/s")
  rates = _with_step(images, labels, args.batch, args.steps)
  for mode, ips in rates.items():
    print(f"small-CNN SGD step (batch {args.batch}) fed by {mode}: {ips:,.1f} images/s")


if __name__ == "__main__":
  main()
