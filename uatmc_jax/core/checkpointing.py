"""Orbax checkpointing shared by every trainer: one checkpoint per epoch plus the best.

A run restarted with the same command restores the newest checkpoint (model state,
optimiser state, RNG key, epoch counter and the early-stopping record) and continues;
because every random draw is derived from ``(seed, epoch, step)`` and not from a
stateful generator, the resumed run is bit-identical to an uninterrupted one.

Layout under ``directory``::

  latest/<epoch>/   the last ``max_to_keep`` epoch checkpoints
  best/<epoch>/     the checkpoint with the best selection metric so far

Refusals (``ConfigError`` naming the checkpoint directory, never a silent resume):

* a ``fingerprint`` (a json-able dict of the settings a run's state depends on, e.g.
  the trainer config) is stored in every checkpoint's meta; a restore with another
  fingerprint names the keys that differ;
* a checkpoint whose arrays do not fit the template (another model width, embedding
  size, optimiser) names the first differing leaves and their shapes, also when no
  fingerprint was given;
* a checkpoint that cannot be read (truncated or garbled files) says so and how to
  start over.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from uatmc_jax.core.errors import ConfigError

FINGERPRINT_KEY = "config_fingerprint"


def _to_numpy_tree(tree: Any) -> Any:
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


class CheckpointStore:
  """Saves/restores ``{"state": pytree, "meta": json-able dict}`` per epoch and the best.

  Args:
    directory: root folder (created if needed).
    max_to_keep: how many epoch checkpoints to keep under ``latest/``.
    fingerprint: json-able settings the saved state depends on; stored with every
      checkpoint and compared on restore (see the module doc).
  """

  def __init__(self, directory: str, max_to_keep: int = 2,
               fingerprint: Mapping[str, Any] | None = None):
    # Remote directories (``gs://...``) are kept as given; local ones made absolute.
    self.directory = str(directory) if "://" in str(directory) else os.path.abspath(directory)
    # Normalised through JSON so tuples/lists and numpy scalars compare as stored.
    self.fingerprint = (None if fingerprint is None
                        else json.loads(json.dumps(dict(fingerprint), default=str)))
    epath.Path(self.directory).mkdir(parents=True, exist_ok=True)
    opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    # Handlers given up front, so the stored array metadata (shapes) can be read before
    # any restore (the shape check below).
    handlers = lambda: {"state": ocp.StandardCheckpointHandler(),
                        "meta": ocp.JsonCheckpointHandler()}
    self._latest = ocp.CheckpointManager(os.path.join(self.directory, "latest"), options=opts,
                                         item_handlers=handlers())
    self._best = ocp.CheckpointManager(
        os.path.join(self.directory, "best"),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True),
        item_handlers=handlers())

  # -- saving ---------------------------------------------------------------
  def save(self, epoch: int, state: Any, meta: dict, *, is_best: bool = False) -> None:
    """Saves the epoch checkpoint (and the best one when ``is_best``); blocks until written."""
    if self.fingerprint is not None:
      meta = dict(meta, **{FINGERPRINT_KEY: self.fingerprint})
    # The best checkpoint first, the epoch checkpoint last: a resume starts from the
    # newest epoch checkpoint, so a kill between the two writes must leave that one
    # older (its epoch is then redone, identically, and the best rewritten), never a
    # newer epoch checkpoint whose record names a best epoch that was not written.
    if is_best:
      args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
      self._best.save(epoch, args=args, force=True)
      self._best.wait_until_finished()
      self._write_manifest(self._best, "best", epoch)
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    self._latest.save(epoch, args=args, force=True)
    self._latest.wait_until_finished()
    self._write_manifest(self._latest, "latest", epoch)

  # -- file manifests (corruption check) ---------------------------------------
  def _manifest_path(self, kind: str, step: int) -> epath.Path:
    return epath.Path(self.directory) / "manifests" / f"{kind}_{step}.json"

  def _write_manifest(self, manager, kind: str, step: int) -> None:
    """Size and SHA-1 of every file of the step's checkpoint (process 0 writes it)."""
    if jax.process_index() != 0:
      return
    folder = epath.Path(self.directory) / "manifests"
    folder.mkdir(parents=True, exist_ok=True)
    path = self._manifest_path(kind, step)
    tmp = folder / (path.name + ".tmp")
    tmp.write_text(json.dumps(_file_digests(epath.Path(str(manager.directory)) / str(step))))
    tmp.rename(path)
    keep = {f"{kind}_{s}.json" for s in manager.all_steps()}
    for old in folder.iterdir():
      if old.name.startswith(kind + "_") and old.name.endswith(".json") and old.name not in keep:
        old.unlink()

  def _verify_manifest(self, manager, kind: str, step: int, where: str) -> None:
    path = self._manifest_path(kind, step)
    if not path.exists():
      return  # written by an older version: orbax's own read errors still apply
    want = json.loads(path.read_text())
    have = _file_digests(epath.Path(where))
    bad = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    if bad:
      raise ConfigError(
          f"{where}: the checkpoint is corrupt or truncated ({len(bad)} file(s) differ "
          f"from what was written, e.g. {bad[0]}); refusing to resume from it. Delete "
          f"{where} to resume from an earlier epoch, or {self.directory} to start over")

  # -- restoring ------------------------------------------------------------
  def latest_epoch(self) -> int | None:
    return self._latest.latest_step()

  def best_epoch(self) -> int | None:
    return self._best.latest_step()

  def _restore(self, manager: ocp.CheckpointManager, step: int, template: Any):
    where = os.path.join(str(manager.directory), str(step))
    self._verify_manifest(manager, "latest" if manager is self._latest else "best", step,
                          where)
    meta = self._read_meta(manager, step, where)
    stored = meta.get(FINGERPRINT_KEY)
    if self.fingerprint is not None and stored is not None and stored != self.fingerprint:
      raise ConfigError(
          f"{where}: this checkpoint belongs to a run with other settings ("
          f"{_dict_diff(stored, self.fingerprint)}); resume with the same config, or use "
          f"another --workdir (or delete {self.directory}) to start over")
    self._check_shapes(manager, step, where, template)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    try:
      out = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax / tensorstore raise many types for unreadable files
      raise ConfigError(
          f"{where}: the checkpoint's arrays could not be read ({type(e).__name__}: "
          f"{_first_line(e)}); it is corrupt or truncated. Delete {where} to resume "
          f"from an earlier epoch, or {self.directory} to start over") from None
    return out["state"], out["meta"]

  def _read_meta(self, manager, step: int, where: str) -> dict:
    try:
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      meta = meta["meta"]
    except Exception as e:
      raise ConfigError(
          f"{where}: the checkpoint's meta could not be read ({type(e).__name__}: "
          f"{_first_line(e)}); it is corrupt or truncated. Delete {where} to resume "
          f"from an earlier epoch, or {self.directory} to start over") from None
    if not isinstance(meta, dict):
      raise ConfigError(f"{where}: the checkpoint's meta is not a JSON object; it is "
                        f"corrupt. Delete {self.directory} to start over")
    return meta

  def _check_shapes(self, manager, step: int, where: str, template: Any) -> None:
    """Refuses a checkpoint whose tree or array shapes differ from ``template``'s."""
    try:
      meta = manager.item_metadata(step)
      stored = meta["state"] if meta is not None else None
    except Exception:
      stored = None  # unreadable metadata: the restore below reports it
    if stored is None:
      return
    stored_leaves = jax.tree.leaves(getattr(stored, "tree", stored))
    new_leaves = jax.tree_util.tree_flatten_with_path(template)[0]
    diffs = []
    if len(stored_leaves) != len(new_leaves):
      diffs.append(f"{len(stored_leaves)} arrays stored vs {len(new_leaves)} in this run")
    else:
      for a, (path, b) in zip(stored_leaves, new_leaves):
        if not hasattr(a, "shape"):
          continue  # a stored Python scalar: nothing to compare
        sa, sb = tuple(a.shape), tuple(np.shape(b))
        if sa != sb:
          diffs.append(f"{jax.tree_util.keystr(path)} stored {sa} vs this run {sb}")
    if diffs:
      more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
      raise ConfigError(
          f"{where}: this checkpoint does not fit this run's model/optimiser state: "
          f"{'; '.join(diffs[:3])}{more}. It belongs to a run with another config "
          f"(e.g. another width or embedding size); use another --workdir (or delete "
          f"{self.directory}) to start over")

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


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return (text[0] if text else "")[:200]


def _dict_diff(old: Any, new: Any) -> str:
  if not (isinstance(old, dict) and isinstance(new, dict)):
    return f"stored {old!r} vs this run {new!r}"
  keys = sorted(set(old) | set(new))
  diffs = [f"{k}: stored {old.get(k)!r} vs this run {new.get(k)!r}" for k in keys
           if old.get(k) != new.get(k)]
  more = f" (and {len(diffs) - 4} more)" if len(diffs) > 4 else ""
  return "; ".join(diffs[:4]) + more


def _file_digests(root: epath.Path) -> dict[str, list]:
  """{relative path: [size, sha1]} of every file under ``root`` (local or remote)."""
  out = {}
  pending, files = [root], []
  while pending:  # a walk by iterdir: epath's rglob refuses remote trees
    for entry in pending.pop().iterdir():
      (pending if entry.is_dir() else files).append(entry)
  for full in files:
    h = hashlib.sha1()
    size = 0
    with full.open("rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
        size += len(chunk)
    out[os.path.relpath(str(full), str(root))] = [size, h.hexdigest()]
  return out
