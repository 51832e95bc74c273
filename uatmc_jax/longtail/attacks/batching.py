"""Running a jitted per-batch function over a data set in fixed-size batches.

The last batch is padded by repeating its first row, so a jitted function sees one
shape and never recompiles; padded rows are dropped from the outputs.

`run_until_fooled` is the work queue of the evaluation attacks: each point runs an
attack up to ``n_runs`` times (AutoAttack's target classes), stops at its first
success, and the still-robust (point, run) pairs of any run number are packed into
full fixed-size batches, so only a stage's very last batch is padded. With
``buckets`` (e.g. ``bucket_sizes(128, 16)`` = 16, 32, 64, 128 rows) a batch that the
queue cannot fill runs at the smallest bucket that holds it instead of the full batch
(a few compiled shapes per attack instead of one, and little padding: the last few
robust points of a 5000-query Square stage no longer run as 128 rows).
`StageProgress` prints its progress line; `counted_jit` counts traces (one per
attack and batch shape is the contract the tests check).
"""

import time
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np


def map_in_fixed_batches(fn: Callable[..., Tuple[np.ndarray, ...]],
                         arrays: Sequence[np.ndarray],
                         batch_size: int,
                         *extra_args) -> Tuple[np.ndarray, ...]:
  """Applies fn(*batch_arrays, batch_index, *extra_args) over rows of `arrays`.

  Args:
    fn: returns a tuple of arrays whose leading axis is the batch.
    arrays: same-length arrays (N, ...).
    batch_size: fixed batch size (the jitted shape).
    *extra_args: passed after the batch index (e.g. a target rank).

  Returns:
    The concatenated outputs (N, ...) as NumPy arrays; empty-length arrays when
    N = 0 (fn is then never called and the caller must not rely on shapes).
  """
  n = len(arrays[0])
  if any(len(a) != n for a in arrays):
    raise ValueError(f"arrays have different lengths: {[len(a) for a in arrays]}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  outputs = []
  for b, start in enumerate(range(0, n, batch_size)):
    stop = min(start + batch_size, n)
    batch = pad_rows([a[start:stop] for a in arrays], batch_size)
    out = fn(*batch, b, *extra_args)
    outputs.append(tuple(np.asarray(o)[:stop - start] for o in out))
  if not outputs:
    return ()
  return tuple(np.concatenate(parts, axis=0) for parts in zip(*outputs))


def pad_rows(arrays: Sequence[np.ndarray], batch_size: int) -> list:
  """Pads same-length (n <= batch_size, ...) arrays to batch_size rows by repeating
  their first row."""
  out = []
  for a in arrays:
    a = np.asarray(a)
    pad = batch_size - len(a)
    if pad < 0:
      raise ValueError(f"{len(a)} rows do not fit a batch of {batch_size}")
    out.append(np.concatenate([a, np.repeat(a[:1], pad, axis=0)], axis=0) if pad else a)
  return out


def counted_jit(counts: Dict[str, int], name: str, fn: Callable) -> Callable:
  """``jax.jit(fn)`` that adds 1 to ``counts[name]`` each time it is traced."""
  import jax

  def traced(*args):
    counts[name] = counts.get(name, 0) + 1
    return fn(*args)
  return jax.jit(traced)


class StageProgress:
  """One attack stage's progress line: runs done / total, robust so far, time, ETA.

  ``total`` is an upper bound while points can still stop early (a point fooled by
  its first target class skips the others); ETA = elapsed / done · remaining.
  ``log`` None: silent. Lines are written at most every ``min_interval`` seconds,
  plus the last one.
  """

  def __init__(self, name: str, total: int, n_points: int,
               log: Optional[Callable[[str], None]] = None, unit: str = "runs",
               min_interval: float = 0.):
    self.name, self.total, self.n_points, self.log = name, int(total), int(n_points), log
    self.unit, self.min_interval = unit, float(min_interval)
    self.start = time.time()
    self._last = -np.inf

  def update(self, done: int, total: int, robust: int) -> None:
    self.total = int(total)
    now = time.time()
    if self.log is None or (done < total and now - self._last < self.min_interval):
      return
    self._last = now
    elapsed = now - self.start
    eta = elapsed / done * (total - done) if done else float("nan")
    self.log(f"{self.name}: {done}/{total} {self.unit}, robust {robust}/{self.n_points}, "
             f"{elapsed:.1f}s, ETA {eta:.0f}s")


def bucket_sizes(batch_size: int, min_rows: int, multiple: int = 1) -> Tuple[int, ...]:
  """Batch shapes batch_size, batch_size/2, batch_size/4, ... down to ``min_rows``
  (ascending; halving stops at an odd size or one not divisible by ``multiple``, e.g.
  a mesh's device count). ``bucket_sizes(128, 16) == (16, 32, 64, 128)``;
  ``min_rows >= batch_size`` gives ``(batch_size,)``, a single shape."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  sizes = [int(batch_size)]
  while (sizes[-1] % 2 == 0 and sizes[-1] // 2 >= max(int(min_rows), 1)
         and (sizes[-1] // 2) % multiple == 0):
    sizes.append(sizes[-1] // 2)
  return tuple(sorted(sizes))


def run_until_fooled(fn: Callable, images: np.ndarray, labels: np.ndarray,
                     points: np.ndarray, n_runs: int, batch_size: int, *extra_args,
                     progress: Optional[StageProgress] = None,
                     robust_before: Optional[int] = None,
                     buckets: Optional[Sequence[int]] = None,
                     with_ids: bool = False,
                     on_batch: Optional[Callable[[int, int], None]] = None,
                     exact_multiple: Optional[int] = None
                     ) -> Tuple[np.ndarray, np.ndarray]:
  """Runs an attack on ``points`` (indices into images) until each is fooled.

  Point p runs ``fn(x, y, run, batch_index, *extra_args) -> (x_adv, still_robust)``
  for run = 0, 1, ... n_runs − 1 (e.g. AutoAttack's target classes) and stops after
  its first success. The pending (point, next run) pairs, whatever their run number,
  fill fixed-size batches in first-in-first-out order; ``run`` is a per-row int32
  vector and ``batch_index`` counts the batches. When fewer pairs are pending than a
  batch holds, the rows that would be padding take the same points' following runs
  ahead of time; a point's outcome is then its lowest successful run, as if its runs
  had gone one by one, so every batch but the last is full even with few points.

  Returns (still_robust (P,), x_adv (P, ...)): x_adv is the first fooling example
  where fooled, else that of the point's last run. ``robust_before``: robust points
  of the whole data set before this stage, for the progress line (default P).

  ``buckets``: allowed batch shapes (ascending, the largest ``batch_size``; default
  ``(batch_size,)``). A batch the queue cannot fill takes the smallest bucket that
  holds its pending pairs, and only that bucket's free rows get later runs ahead of
  time. ``with_ids``: call ``fn(x, y, run, ids, batch_index, *extra_args)`` with ids
  (B,) int32 the rows' indices into ``images`` (padding repeats row 0), so that an
  attack can draw each row's randomness from (point, run) alone and give the same
  per-point result whatever batch, bucket or row the point lands in.
  ``on_batch(rows, real_rows)``: called after each batch (its shape and the rows that
  were not padding), e.g. to count the work.
  ``exact_multiple``: instead of a bucket, a batch the queue cannot fill runs at its
  pending count rounded up to a multiple of this (1: no padding at all; a mesh's device
  count: divisible over it), i.e. a shape per distinct count. Worth it where a row costs
  more than a compile, e.g. Square's 5000 forward passes per row.
  """
  points = np.asarray(points, np.int64)
  n = len(points)
  buckets = tuple(sorted(int(b) for b in buckets)) if buckets else (int(batch_size),)
  if buckets[-1] != batch_size:
    raise ValueError(f"buckets {buckets} must end with batch_size {batch_size}")
  still = np.ones(n, bool)
  adv = np.array(images[points], copy=True)
  queue_pos = np.arange(n)             # positions into `points`
  queue_run = np.zeros(n, np.int32)    # their next run
  done, b = 0, 0
  robust = n if robust_before is None else int(robust_before)
  while len(queue_pos):
    pos, run = queue_pos[:batch_size], queue_run[:batch_size]
    queue_pos, queue_run = queue_pos[batch_size:], queue_run[batch_size:]
    if exact_multiple and len(pos) < batch_size:
      size = min(batch_size, -(-len(pos) // int(exact_multiple)) * int(exact_multiple))
    else:
      size = next(bk for bk in buckets if bk >= len(pos))
    if len(pos) < size:  # the whole queue fits: fill the rest with later runs
      extra_pos, extra_run = [pos], [run]
      free = size - len(pos)
      for ahead in range(1, n_runs):  # a loop over runs (<= 9), not rows
        later = np.flatnonzero(run + ahead < n_runs)[:free]
        if not later.size or not free:
          break
        extra_pos.append(pos[later])
        extra_run.append(run[later] + ahead)
        free -= later.size
      pos, run = np.concatenate(extra_pos), np.concatenate(extra_run).astype(np.int32)
    rows = points[pos]
    if with_ids:
      batch = pad_rows([images[rows], labels[rows], run, rows.astype(np.int32)], size)
    else:
      batch = pad_rows([images[rows], labels[rows], run], size)
    x_out, ok = fn(*batch, b, *extra_args)
    if on_batch is not None:
      on_batch(size, len(pos))
    x_out, ok = np.asarray(x_out)[:len(pos)], np.asarray(ok, bool)[:len(pos)]
    # Per point of this batch (its rows are consecutive runs): the lowest fooling run,
    # else its highest run, which decides the next one.
    order = np.lexsort((np.where(ok, run + n_runs, run), pos))
    first = np.r_[True, pos[order][1:] != pos[order][:-1]]
    head = order[first]                     # per point: lowest fooling run, or lowest run
    last = order[np.r_[first[1:], True]]    # per point: its highest run in the batch
    fooled = ~ok[head]
    p_fooled, p_kept = pos[head[fooled]], pos[last[~fooled]]
    still[p_fooled] = False
    adv[p_fooled] = x_out[head[fooled]]
    adv[p_kept] = x_out[last[~fooled]]
    robust -= int(fooled.sum())
    nxt = run[last[~fooled]] + 1
    again = nxt < n_runs
    queue_pos = np.concatenate([queue_pos, p_kept[again]])
    queue_run = np.concatenate([queue_run, nxt[again]]).astype(np.int32)
    done += len(pos)
    b += 1
    if progress is not None:
      # Upper bound of the runs left: every queued pair may run to the last target.
      remaining = int(np.sum(n_runs - queue_run))
      progress.update(done, done + remaining, robust)
  return still, adv


class OnMesh:
  """A per-batch function run with its batch split over every device of a mesh.

  ``OnMesh(fn, mesh, n_batch_args)(*args)``: the first ``n_batch_args`` arguments are
  host-global numpy batches (the same values on every process); each process feeds only
  its devices' rows (``multihost.put_global``, split over all mesh axes), the rest
  (batch index, target rank, ε) are passed as they are. ``fn`` is jitted and per-example,
  so XLA partitions it along the batch: every device attacks only its rows, and random
  draws do not depend on the split (threefry is partitionable). Outputs come back as
  numpy with the full batch on every process. ``local_rows`` counts the rows this
  process fed (its share of the work, padding included). Arrays ``fn`` closes over must
  be replicated on ``mesh`` (or uncommitted) in a multi-process run.
  """

  def __init__(self, fn: Callable, mesh, n_batch_args: int):
    from jax.sharding import NamedSharding, PartitionSpec as P
    self.fn, self.mesh, self.n_batch_args = fn, mesh, int(n_batch_args)
    self.sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    self.local_rows = 0

  def check_batch_size(self, batch_size: int) -> None:
    if batch_size % self.mesh.size:
      raise ValueError(f"batch_size {batch_size} must be divisible by the {self.mesh.size} "
                       f"devices of the evaluation mesh")

  def __call__(self, *args):
    from uatmc_jax.core.parallel import multihost
    batch = multihost.put_global(tuple(np.asarray(a) for a in args[:self.n_batch_args]),
                                 self.sharding)
    shards = batch[0].addressable_shards
    self.local_rows += sum(s.data.shape[0] for s in shards)
    return multihost.to_host(self.fn(*batch, *args[self.n_batch_args:]))


def on_mesh(fn: Callable, mesh, n_batch_args: int) -> Callable:
  """``fn`` itself without a mesh or on one device of one process, else ``OnMesh``."""
  import jax
  if mesh is None or (mesh.size == 1 and jax.process_count() == 1):
    return fn
  return OnMesh(fn, mesh, n_batch_args)
