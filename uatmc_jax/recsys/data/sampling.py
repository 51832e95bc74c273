"""BPR training triples: uniform negatives among items a user has not interacted with.

METHODS.md A.3: one negative per (user, positive) train pair, drawn uniformly from the
items outside the user's train set. Sampling is vectorised rejection sampling: draw
candidates for every row at once, test membership of the (user, item) key in the sorted
array of train keys with ``np.searchsorted``, redraw only the rejected rows; the loop
runs over rounds (a handful), never over rows. Every draw comes from
``np.random.default_rng((seed, epoch))``, so an epoch's batches are a function of
(seed, epoch) alone: a resumed run sees exactly the batches of an uninterrupted one.
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


def epoch_batches(sampler: NegativeSampler, train: np.ndarray, batch_size: int,
                  seed: int, epoch: int) -> dict[str, np.ndarray]:
  """All BPR batches of one epoch, as fixed-shape arrays.

  The train pairs are shuffled, each gets a sampled negative, and the rows are padded
  to a multiple of ``batch_size`` (padding rows repeat row 0 with ``mask`` 0), so every
  step of a jitted train loop has the same shapes.

  Returns:
    {"users", "pos", "neg": int32 (n_batches, batch_size), "mask": float32 (same)}.
  """
  rng = np.random.default_rng((int(seed), int(epoch)))
  order = rng.permutation(train.shape[0])
  users = train[order, 0].astype(np.int32)
  pos = train[order, 1].astype(np.int32)
  neg = sampler.sample(users, rng)
  n = users.shape[0]
  n_batches = -(-n // batch_size)
  pad = n_batches * batch_size - n
  mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])

  def shaped(x):
    return np.concatenate([x, np.repeat(x[:1], pad)]).reshape(n_batches, batch_size)

  return {"users": shaped(users), "pos": shaped(pos), "neg": shaped(neg),
          "mask": mask.reshape(n_batches, batch_size)}
