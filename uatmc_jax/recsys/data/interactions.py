"""The in-memory form of a multimodal recommendation dataset (MMRec layout, A.3)."""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class InteractionData:
  """A loaded multimodal recommendation dataset.

  Attributes:
    name: dataset name (the ``<name>`` of ``<name>.inter``).
    n_users: number of users (ids are dense, 0..n_users-1).
    n_items: number of items (= rows of every feature matrix).
    train, valid, test: int32 arrays of shape (n, 2) with columns (user, item).
    features: modality name -> float32 (n_items, d_m) raw features, in a fixed order
      (sorted by modality name) that every model and attack uses for concatenation.
    user_groups: optional int32 (n_users,) planted user-group ids (synthetic data) or
      None; used by the cross-modal mismatch diagnostics.
    user_groups_source: where ``user_groups`` came from (the file path for a folder's
      ``user_groups.npy``), for the attack outputs' "planted from <source>".
  """
  name: str
  n_users: int
  n_items: int
  train: np.ndarray
  valid: np.ndarray
  test: np.ndarray
  features: dict[str, np.ndarray]
  user_groups: np.ndarray | None = None
  user_groups_source: str | None = None

  @property
  def modalities(self) -> tuple[str, ...]:
    return tuple(self.features)

  def item_popularity(self) -> np.ndarray:
    """Train interactions per item, (n_items,) int64."""
    return np.bincount(self.train[:, 1], minlength=self.n_items)

  def summary(self) -> str:
    dims = ", ".join(f"{m}:{f.shape[1]}" for m, f in self.features.items())
    return (f"{self.name}: {self.n_users} users, {self.n_items} items, train/valid/test "
            f"{len(self.train)}/{len(self.valid)}/{len(self.test)}, features [{dims}]")
