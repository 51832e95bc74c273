"""Input pipeline for image classification (METHODS.md B.1, B.3).

Training batches: shuffled every epoch, standard CIFAR augmentation (random 32x32
crop of the image zero-padded by 4 pixels on each side, horizontal flip with
probability 1/2), ``float32`` in ``[0, 1]``, fixed batch size with the remainder
dropped (so a jitted step never recompiles).

Design (measured in benchmarks/bench_input_pipeline.py, docs/results/performance.md):
* Augmentation is vectorised numpy on the host: the rows of a batch are grouped by
  crop offset (at most 81 groups) and each group is one block copy; flips are one
  fancy-indexed reversal; no Python loop over images. A background thread builds batches ``prefetch`` ahead of the consumer;
  numpy and XLA release the GIL, so batch preparation overlaps the train step. On
  CPU this beats augmenting inside the jitted step because the host work runs on the
  otherwise idle time of the step instead of lengthening it; on an accelerator it keeps
  the device free for the model. ``random_crop_flip_jax`` does the same augmentation
  on device for users who prefer that (same distribution, different random stream).
* Determinism: the order and augmentation of epoch ``e`` depend only on
  ``(seed, e)``: ``np.random.default_rng([seed, e])`` draws the permutation, then
  each batch's crop offsets and flips in batch order.
* Multi-host: the randomness is drawn for the *global* batch on every process and
  each process keeps its contiguous slice ``[p·B/P, (p+1)·B/P)`` of every global
  batch, so the global batch (and the run) is the same for any process count. Pass
  the per-process arrays to ``parallel.mesh.shard_batch``.

Evaluation batches (``eval_batches``) keep the data order, pad the last batch to the
fixed size and carry a ``mask`` (1 = real row) so metrics ignore the padding.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from uatmc_jax.core.errors import ConfigError

CIFAR_PAD = 4


def random_crop_flip_numpy(rng: np.random.Generator, images: np.ndarray, *,
                           pad: int = CIFAR_PAD, flip: bool = True) -> np.ndarray:
  """Random crop (zero padding ``pad``) and horizontal flip of a batch, vectorised.

  Args:
    rng: numpy generator (draws ``B`` x-offsets, ``B`` y-offsets, then ``B`` flips).
    images: ``(B, H, W, C)`` any dtype.
    pad: padding on each side; crop offsets are uniform in ``[0, 2·pad]``.
    flip: whether to flip horizontally with probability 1/2.

  Returns:
    ``(B, H, W, C)``, same dtype: ``out[i] = padded[i, dy:dy+H, dx:dx+W]`` (flipped
    left-right when drawn).
  """
  b, h, w, _ = images.shape
  dy = rng.integers(0, 2 * pad + 1, size=b)
  dx = rng.integers(0, 2 * pad + 1, size=b)
  do_flip = rng.random(b) < 0.5 if flip else np.zeros(b, bool)
  return crop_flip_numpy(images, dy, dx, do_flip, pad)


def crop_flip_numpy(images: np.ndarray, dy: np.ndarray, dx: np.ndarray,
                    do_flip: np.ndarray, pad: int = CIFAR_PAD) -> np.ndarray:
  """Crops ``images`` ``(B, H, W, C)`` zero-padded by ``pad`` at offsets ``(dy, dx)``
  (``(B,)`` ints in ``[0, 2·pad]``), then flips left-right the rows with ``do_flip``.

  ``out[i] = padded[i, dy[i]:dy[i]+H, dx[i]:dx[i]+W]`` (reversed along W if flipped).
  """
  b, h, w, c = images.shape
  padded = np.zeros((b, h + 2 * pad, w + 2 * pad, c), images.dtype)
  padded[:, pad:pad + h, pad:pad + w] = images
  out = np.empty_like(images)
  # Group the rows by crop offset (at most (2·pad+1)² groups) so each group is one
  # strided block copy; ~3x faster than a per-element gather through a
  # sliding_window_view, and the loop is over offsets, not over rows.
  order = np.lexsort((dx, dy))
  key = dy[order] * (2 * pad + 1) + dx[order]
  for grp in np.split(order, np.flatnonzero(np.diff(key)) + 1):
    if grp.size:
      y, x = dy[grp[0]], dx[grp[0]]
      out[grp] = padded[grp, y:y + h, x:x + w]
  flipped = np.flatnonzero(do_flip)
  out[flipped] = out[flipped, :, ::-1]
  return out


def random_crop_flip_jax(key: jax.Array, images: jax.Array, *, pad: int = CIFAR_PAD,
                         flip: bool = True) -> jax.Array:
  """On-device version of ``random_crop_flip_numpy`` (jit-able, vmapped per image)."""
  b, h, w, c = images.shape
  k_y, k_x, k_f = jax.random.split(key, 3)
  dy = jax.random.randint(k_y, (b,), 0, 2 * pad + 1)
  dx = jax.random.randint(k_x, (b,), 0, 2 * pad + 1)
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  crops = jax.vmap(lambda im, y, x: jax.lax.dynamic_slice(im, (y, x, 0), (h, w, c)))(
      padded, dy, dx)
  if not flip:
    return crops
  do_flip = jax.random.bernoulli(k_f, 0.5, (b,))
  return jnp.where(do_flip[:, None, None, None], crops[:, :, ::-1], crops)


def to_float(images: np.ndarray) -> np.ndarray:
  """uint8 ``[0, 255]`` -> float32 ``[0, 1]``."""
  return images.astype(np.float32) * np.float32(1.0 / 255.0)


def _prefetch(gen_fn, depth: int) -> Iterator:
  """Runs ``gen_fn()`` in a daemon thread, ``depth`` items ahead; re-raises errors."""
  if depth <= 0:
    yield from gen_fn()
    return
  q: queue.Queue = queue.Queue(maxsize=depth)
  stop = threading.Event()
  done = object()

  def worker():
    try:
      for item in gen_fn():
        while not stop.is_set():
          try:
            q.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if stop.is_set():
          return
      q.put(done)
    except BaseException as e:  # forwarded to the consumer
      q.put(e)

  t = threading.Thread(target=worker, daemon=True)
  t.start()
  try:
    while True:
      item = q.get()
      if item is done:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:  # consumer stopped early (break / close / error): let the worker exit
    stop.set()
    while t.is_alive():
      try:
        q.get_nowait()
      except queue.Empty:
        pass
      t.join(timeout=0.05)


class TrainPipeline:
  """Shuffled, augmented, fixed-size training batches with background prefetch.

  Example::

      pipe = TrainPipeline(ds.images, ds.labels, batch_size=128, seed=0)
      for epoch in range(epochs):
        for batch in pipe.epoch(epoch):      # dict(image=(b,32,32,3) f32, label=(b,) i32)
          state = train_step(state, shard_batch(batch, mesh))

  Args:
    images: ``(N, H, W, 3)`` uint8.
    labels: ``(N,)`` int.
    batch_size: the *global* batch size (over all processes).
    seed: base seed; epoch ``e`` uses ``(seed, e)``.
    augment: random crop + flip (default True).
    shuffle: new permutation each epoch (default True).
    pad: crop padding (4 for CIFAR).
    prefetch: batches prepared ahead in a background thread (0 = synchronous).
    process_index, process_count: this process's slice of each global batch
      (default ``jax.process_index()`` / ``jax.process_count()``).
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray, *, batch_size: int, seed: int,
               augment: bool = True, shuffle: bool = True, pad: int = CIFAR_PAD,
               prefetch: int = 2, process_index: int | None = None,
               process_count: int | None = None):
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4 or images.dtype != np.uint8:
      raise ConfigError(f"pipeline: images must be (N, H, W, C) uint8, got "
                        f"{images.shape} {images.dtype}")
    if labels.shape != (images.shape[0],):
      raise ConfigError(f"pipeline: labels must be ({images.shape[0]},), got {labels.shape}")
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    if batch_size < 1 or batch_size % self.process_count:
      raise ConfigError(f"pipeline: batch_size {batch_size} must be positive and divisible "
                        f"by the process count {self.process_count}")
    if batch_size > images.shape[0]:
      raise ConfigError(f"pipeline: batch_size {batch_size} exceeds the {images.shape[0]} "
                        f"training images (the remainder is dropped, so no batch would run)")
    if not 0 <= self.process_index < self.process_count:
      raise ConfigError(f"pipeline: process_index {self.process_index} not in "
                        f"[0, {self.process_count})")
    self.images, self.labels = images, labels.astype(np.int32)
    self.batch_size, self.seed = batch_size, seed
    self.augment, self.shuffle, self.pad, self.prefetch = augment, shuffle, pad, prefetch
    self.local_batch_size = batch_size // self.process_count

  @property
  def steps_per_epoch(self) -> int:
    return self.images.shape[0] // self.batch_size

  def _batches(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
    rng = np.random.default_rng([self.seed, epoch])
    n = self.images.shape[0]
    order = rng.permutation(n) if self.shuffle else np.arange(n)
    lo = self.process_index * self.local_batch_size
    hi = lo + self.local_batch_size
    b = self.batch_size
    for s in range(self.steps_per_epoch):
      idx = order[s * b:(s + 1) * b]
      if self.augment:  # drawn for the global batch: same stream on every process
        dy = rng.integers(0, 2 * self.pad + 1, size=b)
        dx = rng.integers(0, 2 * self.pad + 1, size=b)
        flip = rng.random(b) < 0.5
        imgs = crop_flip_numpy(self.images[idx[lo:hi]], dy[lo:hi], dx[lo:hi], flip[lo:hi],
                                self.pad)
      else:
        imgs = self.images[idx[lo:hi]]
      yield {"image": to_float(imgs), "label": self.labels[idx[lo:hi]]}

  def epoch(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
    """This process's batches of epoch ``epoch``: ``image (b, H, W, 3)`` float32 in
    [0, 1] and ``label (b,)`` int32, ``b = batch_size / process_count``;
    ``steps_per_epoch`` of them."""
    return _prefetch(lambda: self._batches(epoch), self.prefetch)


def eval_batches(images: np.ndarray, labels: np.ndarray, *, batch_size: int,
                 process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Fixed-size evaluation batches in data order, the last one padded.

  Yields this process's slice of each global batch: ``image`` float32 ``(b, H, W, 3)``,
  ``label`` int32 ``(b,)`` and ``mask`` float32 ``(b,)`` (1 for real rows, 0 for
  padding; padded rows repeat image 0 and have label 0).
  """
  p = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if batch_size < 1 or batch_size % pc:
    raise ConfigError(f"eval_batches: batch_size {batch_size} must be positive and "
                      f"divisible by the process count {pc}")
  n = images.shape[0]
  local = batch_size // pc
  lo, hi = p * local, (p + 1) * local
  for s in range(0, n, batch_size):
    idx = np.arange(s, s + batch_size)
    valid = idx < n
    idx = np.where(valid, idx, 0)[lo:hi]
    yield {"image": to_float(images[idx]), "label": np.asarray(labels)[idx].astype(np.int32),
           "mask": valid[lo:hi].astype(np.float32)}
