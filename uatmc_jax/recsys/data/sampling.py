"""BPR training triples: uniform negatives among items a user has not interacted with.

METHODS.md A.3: one negative per (user, positive) train pair, drawn uniformly from the
items outside the user's train set. Sampling is vectorised rejection sampling: draw
candidates for every row at once, test membership of the (user, item) key in the sorted
array of train keys with ``np.searchsorted``, redraw only the rejected rows; the loop
runs over rounds (a handful), never over rows. The epoch's order comes from
``np.random.default_rng((seed, epoch))``; the negative candidates of a row come from a
counter-based hash of (seed, epoch, global row position, round) (:func:`row_uniform_ints`),
so an epoch's batches are a function of (seed, epoch) alone (a resumed run sees exactly
the batches of an uninterrupted one) and any subset of columns -- one process's share
of a data-parallel epoch -- is sampled alone with the values the whole epoch would
give it.
"""
from __future__ import annotations

import numpy as np

from uatmc_jax.core.errors import DataFormatError


class NegativeSampler:
  """Membership test and rejection sampler over a user–item train set.

  Args:
    train: int (n, 2) (user, item) train pairs.
    n_users, n_items: id ranges.
  """

  def __init__(self, train: np.ndarray, n_users: int, n_items: int):
    train = np.asarray(train, np.int64)
    self.n_users, self.n_items = int(n_users), int(n_items)
    self.keys = np.unique(train[:, 0] * self.n_items + train[:, 1])
    degree = np.bincount(self.keys // self.n_items, minlength=self.n_users)
    full = np.flatnonzero(degree >= self.n_items)
    if full.size:
      raise DataFormatError(
          f"user {int(full[0])} interacted with all {self.n_items} items in train; BPR "
          "needs at least one non-interacted item per user")

  def contains(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """bool array: whether each (user, item) pair is in the train set."""
    keys = np.asarray(users, np.int64) * self.n_items + np.asarray(items, np.int64)
    pos = np.searchsorted(self.keys, keys)
    pos = np.minimum(pos, self.keys.size - 1)
    return self.keys[pos] == keys

  def sample(self, users: np.ndarray, rng: np.random.Generator,
             max_rounds: int = 1000) -> np.ndarray:
    """One uniform non-train item per entry of ``users`` (int32, same shape)."""
    users = np.asarray(users)
    neg = rng.integers(0, self.n_items, size=users.shape)
    todo = np.flatnonzero(self.contains(users, neg))
    for _ in range(max_rounds):
      if todo.size == 0:
        return neg.astype(np.int32)
      neg[todo] = rng.integers(0, self.n_items, size=todo.size)
      todo = todo[self.contains(users[todo], neg[todo])]
    raise RuntimeError(f"negative sampling did not finish in {max_rounds} rounds")

  def sample_rows(self, users: np.ndarray, rows: np.ndarray, seed: int, epoch: int,
                  max_rounds: int = 1000) -> np.ndarray:
    """One uniform non-train item per entry of ``users``, drawn from the counter hash of
    (seed, epoch, ``rows``, round): the value of a row does not depend on which other
    rows are sampled in the same call (int32, same shape as ``users``)."""
    users = np.asarray(users)
    rows = np.asarray(rows, np.uint64)
    neg = row_uniform_ints(seed, epoch, rows, 0, self.n_items)
    todo = np.flatnonzero(self.contains(users, neg))
    for r in range(1, max_rounds + 1):
      if todo.size == 0:
        return neg.astype(np.int32)
      neg[todo] = row_uniform_ints(seed, epoch, rows[todo], r, self.n_items)
      todo = todo[self.contains(users[todo], neg[todo])]
    raise RuntimeError(f"negative sampling did not finish in {max_rounds} rounds")


_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64's finaliser (Steele et al. 2014), vectorised over uint64."""
  with np.errstate(over="ignore"):
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & _M64
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
    return x ^ (x >> np.uint64(31))


def row_uniform_ints(seed: int, epoch: int, rows: np.ndarray, round_: int,
                     n: int) -> np.ndarray:
  """Uniform ints in [0, n) per row: a hash of (seed, epoch, row, round) (the modulo
  bias is below n / 2^64)."""
  with np.errstate(over="ignore"):
    base = _splitmix64(np.uint64(int(seed) & 0xFFFFFFFF) << np.uint64(32)
                       | np.uint64(int(epoch) & 0xFFFFFFFF))
    base = _splitmix64(base ^ np.uint64(int(round_)))
    h = _splitmix64(np.asarray(rows, np.uint64) ^ base)
  return (h % np.uint64(n)).astype(np.int64)


def epoch_batches(sampler: NegativeSampler, train: np.ndarray, batch_size: int,
                  seed: int, epoch: int, columns: slice | None = None) -> dict[str, np.ndarray]:
  """The BPR batches of one epoch, as fixed-shape arrays (all columns, or a share).

  The train pairs are shuffled, each gets a sampled negative, and the rows are padded
  to a multiple of ``batch_size`` (padding rows repeat row 0 with ``mask`` 0), so every
  step of a jitted train loop has the same shapes. Global row ``r`` is step
  ``r // batch_size``, column ``r % batch_size``.

  Args:
    columns: the batch columns to build (a process's share of a data-parallel epoch
      whose columns are split over the data axis); None = all. Only those rows are
      sampled, with the values the whole epoch gives them.

  Returns:
    {"users", "pos", "neg": int32 (n_batches, width), "mask": float32 (same)}, width =
    batch_size or the number of ``columns``.
  """
  rng = np.random.default_rng((int(seed), int(epoch)))
  n = train.shape[0]
  order = rng.permutation(n)
  n_batches = -(-n // batch_size)
  cols = np.arange(batch_size)[columns if columns is not None else slice(None)]
  rows = (np.arange(n_batches)[:, None] * batch_size + cols[None, :]).reshape(-1)
  real = rows < n
  src = order[np.where(real, rows, 0)]  # padding rows repeat the epoch's row 0
  users = train[src, 0].astype(np.int32)
  pos = train[src, 1].astype(np.int32)
  neg = sampler.sample_rows(users, np.where(real, rows, 0), seed, epoch)
  shape = (n_batches, cols.size)
  return {"users": users.reshape(shape), "pos": pos.reshape(shape),
          "neg": neg.reshape(shape), "mask": real.astype(np.float32).reshape(shape)}
