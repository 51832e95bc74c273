"""Running a jitted per-batch function over a data set in fixed-size batches.

The last batch is padded by repeating its first row, so a jitted function sees one
shape and never recompiles; padded rows are dropped from the outputs.
"""

from typing import Callable, Sequence, Tuple

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
    pad = batch_size - (stop - start)
    batch = []
    for a in arrays:
      chunk = np.asarray(a[start:stop])
      if pad:
        chunk = np.concatenate([chunk, np.repeat(chunk[:1], pad, axis=0)], axis=0)
      batch.append(chunk)
    out = fn(*batch, b, *extra_args)
    outputs.append(tuple(np.asarray(o)[:stop - start] for o in out))
  if not outputs:
    return ()
  return tuple(np.concatenate(parts, axis=0) for parts in zip(*outputs))


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
    from uatmc_jax.parallel import multihost
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
