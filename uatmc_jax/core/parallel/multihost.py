"""Host <-> global-array moves that are correct with one process or many.

In a multi-process (multi-host) run every process owns only its devices' shards of a
global array: ``jax.device_put`` cannot reach other hosts' devices and ``np.asarray``
of a global array fails. These helpers are the only data moves a trainer needs:

* :func:`put_global` — a *host-global* batch (the same numpy values on every process,
  e.g. an epoch's BPR triples drawn from ``(seed, epoch)``, or evaluation users) becomes
  a global array: each process feeds just its own slice, found from the sharding, with
  ``jax.make_array_from_process_local_data``;
* :func:`put_process_local` — a batch of which each process holds only its own rows
  (e.g. the image pipeline's per-process slices) becomes a global array;
* :func:`put_replicated` — identical host values (initial parameters) replicated;
* :func:`to_host` — a global array back to numpy, the full value on every process;
* :func:`to_local` — a global array as a full copy on this process's default device
  (e.g. a trained model that per-process code then uses, replicated);
* :func:`gather_process_local` — per-process numpy rows concatenated in process order.

With one process each reduces to the obvious ``device_put`` / ``np.asarray``.
"""
from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P


def _local_box(sharding: jax.sharding.Sharding, shape: tuple[int, ...]):
  """The bounding box (tuple of slices) of this process's shards, and whether the
  shards tile it exactly (so the box is this process's contiguous block)."""
  index_map = sharding.addressable_devices_indices_map(shape)
  starts = [[] for _ in shape]
  stops = [[] for _ in shape]
  distinct = set()
  for idx in index_map.values():
    key = []
    for d, s in enumerate(idx):
      lo, hi, _ = s.indices(shape[d])
      starts[d].append(lo)
      stops[d].append(hi)
      key.append((lo, hi))
    distinct.add(tuple(key))
  box = tuple(slice(min(a), max(b)) for a, b in zip(starts, stops))
  box_size = int(np.prod([b.stop - b.start for b in box]))
  covered = sum(int(np.prod([hi - lo for lo, hi in k])) for k in distinct)
  return box, covered == box_size


def put_global(tree: Any, sharding: jax.sharding.Sharding | Any) -> Any:
  """Host-global numpy pytree -> global arrays on ``sharding`` (a sharding or a tree of
  them); every process passes the same values and feeds its own block."""
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def put(x, s):
    x = np.asarray(x)
    box, contiguous = _local_box(s, x.shape)
    if contiguous:
      # np.array, not np.ascontiguousarray: the latter makes a 0-d value 1-d.
      return jax.make_array_from_process_local_data(s, np.array(x[box], order="C"), x.shape)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

  if isinstance(sharding, jax.sharding.Sharding):
    return jax.tree.map(lambda x: put(x, sharding), tree)
  return jax.tree.map(put, tree, sharding)


def put_process_local(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """Per-process rows (leading axis) -> global arrays whose leading axis concatenates
  the processes' rows in process order (``make_array_from_process_local_data``)."""
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def put_replicated(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Identical host values on every process -> arrays replicated over ``mesh``."""
  return put_global(jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree),
                    NamedSharding(mesh, P()))


def to_host(tree: Any) -> Any:
  """Global arrays -> numpy with the full global value, on every process."""

  def get(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(get, tree)


def to_local(tree: Any) -> Any:
  """Global arrays -> full copies on this process's default device (``to_host`` then
  ``jnp.asarray``); use it before process-local code that mixes them with local arrays."""
  import jax.numpy as jnp
  return jax.tree.map(jnp.asarray, to_host(tree))


def gather_process_local(tree: Any) -> Any:
  """Per-process numpy arrays -> their concatenation over processes (leading axis, in
  process order) on every process; the identity with one process."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  return jax.tree.map(
      lambda x: np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True)), tree)


def broadcast_from_primary(value: Any) -> Any:
  """``value`` as process 0 computed it, on every process (a JSON-able value).

  Decisions that read a workdir (resume or not): processes that do not share a disk
  (or see a remote one at different moments) could decide differently and then wait on
  each other's collectives forever. Process 0's reading is broadcast
  (``multihost_utils.broadcast_one_to_all``) as JSON bytes: first the length, then the
  bytes. On one process the value is returned unchanged.
  """
  if jax.process_count() == 1:
    return value
  primary = jax.process_index() == 0
  raw = json.dumps(value).encode() if primary else b""
  n = int(np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(len(raw), np.int32))))
  buf = np.zeros(n, np.int32)
  if primary:
    buf[:] = np.frombuffer(raw, np.uint8)
  got = np.asarray(multihost_utils.broadcast_one_to_all(buf)).astype(np.uint8)
  return json.loads(got.tobytes().decode())
