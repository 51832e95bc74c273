"""CheckpointStore refusals (core/checkpointing.py): another config's fingerprint,
arrays of other shapes, corrupt files -> ConfigError naming the checkpoint directory;
the best checkpoint is written before the epoch checkpoint."""
import glob
import os

import jax.numpy as jnp
import numpy as np
import pytest

from uatmc_jax.core.checkpointing import CheckpointStore
from uatmc_jax.core.errors import ConfigError


def _state(width=4):
  return {"w": jnp.ones((3, width)), "opt": {"count": jnp.zeros((), jnp.int32),
                                            "mu": jnp.zeros((3, width))}}


def test_round_trip_and_fingerprint_refusal(tmp_path):
  d = str(tmp_path / "ck")
  store = CheckpointStore(d, fingerprint={"embedding_dim": 4, "lr": 0.1, "widths": (4, 8)})
  store.save(0, _state(), {"epoch": 0})
  store.close()
  same = CheckpointStore(d, fingerprint={"embedding_dim": 4, "lr": 0.1, "widths": [4, 8]})
  state, meta = same.restore_latest(_state())
  assert meta["epoch"] == 0
  np.testing.assert_array_equal(state["w"], np.ones((3, 4)))
  same.close()
  other = CheckpointStore(d, fingerprint={"embedding_dim": 8, "lr": 0.1, "widths": (4, 8)})
  with pytest.raises(ConfigError, match=r"latest/0: .*embedding_dim: stored 4 vs this run 8"):
    other.restore_latest(_state())
  other.close()


def test_shape_refusal_without_fingerprint(tmp_path):
  d = str(tmp_path / "ck")
  store = CheckpointStore(d)
  store.save(0, _state(4), {"epoch": 0})
  store.close()
  fresh = CheckpointStore(d)  # a new process: nothing restored before
  with pytest.raises(ConfigError, match=r"latest/0: this checkpoint does not fit .*"
                                        r"stored \(3, 4\) vs this run \(3, 6\)"):
    fresh.restore_latest(_state(6))
  with pytest.raises(ConfigError, match="arrays stored vs"):
    fresh.restore_latest({"w": jnp.ones((3, 4))})
  fresh.close()


@pytest.mark.parametrize("damage", ["truncate", "garble", "delete"])
def test_corrupt_checkpoint_refused(tmp_path, damage):
  d = str(tmp_path / "ck")
  store = CheckpointStore(d)
  for e in range(2):
    store.save(e, _state(), {"epoch": e})
  files = sorted(f for f in glob.glob(f"{d}/latest/1/state/**/*", recursive=True)
                 if os.path.isfile(f) and os.path.basename(os.path.dirname(f)) == "d")
  assert files
  if damage == "truncate":
    with open(files[0], "r+b") as f:
      f.truncate(1)
  elif damage == "garble":
    with open(files[0], "r+b") as f:
      data = bytearray(f.read())
      data[len(data) // 2] ^= 0xFF
      f.seek(0)
      f.write(data)
  else:
    os.remove(files[0])
  with pytest.raises(ConfigError, match=r"latest/1: the checkpoint is corrupt or truncated"):
    store.restore_latest(_state())
  store.close()


def test_best_is_written_before_the_epoch_checkpoint(tmp_path, monkeypatch):
  """A kill between the two writes must not leave an epoch checkpoint whose record
  names a best epoch that was never written."""
  store = CheckpointStore(str(tmp_path / "ck"))
  order = []
  for kind, manager in (("best", store._best), ("latest", store._latest)):
    real = manager.save
    monkeypatch.setattr(manager, "save",
                        lambda *a, _k=kind, _r=real, **kw: (order.append(_k), _r(*a, **kw))[1])
  store.save(0, _state(), {"epoch": 0}, is_best=True)
  assert order == ["best", "latest"]
  store.close()


def test_manifest_digests_read_remote_trees_like_local_ones(tmp_path, monkeypatch):
  """The corruption manifest walks a remote (gs://) tree as it walks a local one: epath,
  no os.walk / abspath (an in-memory filesystem stands in for GCS)."""
  from etils import epath
  from etils.epath import backend
  from fsspec.implementations.memory import MemoryFileSystem
  from uatmc_jax.core import checkpointing

  files = {"a.bin": b"\x00\x01" * 1000, "d/b.json": b'{"x": 1}', "d/e/c": b""}
  for name, data in files.items():
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_bytes(data)
  mem = MemoryFileSystem()
  monkeypatch.setattr(backend._FileSystemSpecBackend, "fs", lambda self, path: mem)
  for name, data in files.items():
    mem.pipe(f"gs://bucket/ck/{name}", data)
  local = checkpointing._file_digests(epath.Path(tmp_path))
  remote = checkpointing._file_digests(epath.Path("gs://bucket/ck"))
  assert local == remote and sorted(local) == sorted(files)
  assert local["a.bin"][0] == 2000
