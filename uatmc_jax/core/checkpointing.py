"""Orbax checkpointing shared by every trainer: one checkpoint per epoch plus the best.

A run restarted with the same command restores the newest checkpoint (model state,
optimiser state, RNG key, epoch counter and the early-stopping record) and continues;
because every random draw is derived from ``(seed, epoch, step)`` and not from a
stateful generator, the resumed run is bit-identical to an uninterrupted one.

Layout under ``directory``::

  latest/<epoch>/   the last ``max_to_keep`` epoch checkpoints
  best/<epoch>/     the checkpoint with the best selection metric so far
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def _to_numpy_tree(tree: Any) -> Any:
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


class CheckpointStore:
  """Saves/restores ``{"state": pytree, "meta": json-able dict}`` per epoch and the best.

  Args:
    directory: root folder (created if needed).
    max_to_keep: how many epoch checkpoints to keep under ``latest/``.
  """

  def __init__(self, directory: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    os.makedirs(self.directory, exist_ok=True)
    opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    self._latest = ocp.CheckpointManager(os.path.join(self.directory, "latest"), options=opts)
    self._best = ocp.CheckpointManager(
        os.path.join(self.directory, "best"),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))

  # -- saving ---------------------------------------------------------------
  def save(self, epoch: int, state: Any, meta: dict, *, is_best: bool = False) -> None:
    """Saves the epoch checkpoint (and the best one when ``is_best``); blocks until written."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    self._latest.save(epoch, args=args, force=True)
    self._latest.wait_until_finished()
    if is_best:
      args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
      self._best.save(epoch, args=args, force=True)
      self._best.wait_until_finished()

  # -- restoring ------------------------------------------------------------
  def latest_epoch(self) -> int | None:
    return self._latest.latest_step()

  def best_epoch(self) -> int | None:
    return self._best.latest_step()

  def _restore(self, manager: ocp.CheckpointManager, step: int, template: Any):
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    out = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  def restore_latest(self, template: Any) -> tuple[Any, dict] | None:
    """Returns ``(state, meta)`` of the newest epoch checkpoint, or None if there is none.

    ``template`` is a pytree with the target structure/shapes/shardings (e.g. the
    freshly initialised state); restored arrays take its shardings.
    """
    step = self.latest_epoch()
    if step is None:
      return None
    return self._restore(self._latest, step, template)

  def restore_best(self, template: Any) -> tuple[Any, dict] | None:
    step = self.best_epoch()
    if step is None:
      return None
    return self._restore(self._best, step, template)

  def close(self) -> None:
    self._latest.close()
    self._best.close()
