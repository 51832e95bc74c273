"""What the stages of a UAT-MC experiment read, write and print (METHODS.md A.7-A.8).

Stage folders may be local or remote (``gs://...``): they go through ``etils.epath``,
the path library the checkpoints (orbax) use, and remote paths are never made absolute
or local. Whether a stage is finished is read on process 0 and broadcast
(:func:`saved_json`), so the processes of a pod never disagree about it. Used by the
training stages (``recsys.experiment``) and the attack stage (``recsys.attack_stage``).
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
from etils import epath

from uatmc_jax.core.parallel import multihost
from uatmc_jax.core.reporting import is_remote_path, read_json


def say(msg: str) -> None:
  """One progress line of the experiment."""
  print(f"[uatmc] {msg}", flush=True)


def plain(x: Any) -> Any:
  """A ConfigDict as a dict; anything else as it is."""
  return x.to_dict() if hasattr(x, "to_dict") else x


def json_plain(x: Any) -> Any:
  """``x`` as it reads back from JSON (tuples -> lists), for comparing with saved files."""
  return json.loads(json.dumps(plain(x)))


def join_path(*parts: str) -> str:
  return os.path.join(*[str(p) for p in parts])


def path_exists(path: str) -> bool:
  return epath.Path(path).exists()


def make_dirs(path: str) -> None:
  """Makes ``path`` and its parents (a remote one on process 0 only)."""
  if jax.process_index() == 0 or not is_remote_path(path):
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def saved_json(path: str) -> Any:
  """The JSON at ``path`` as process 0 reads it (None when absent there), on every process."""
  if jax.process_index() == 0:
    value = read_json(path) if path_exists(path) else None
  else:
    value = None
  return multihost.broadcast_from_primary(value)
