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
