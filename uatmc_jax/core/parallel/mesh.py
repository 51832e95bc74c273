"""Device meshes, data-parallel sharding and multi-host initialisation.

Everything here is a thin layer over JAX's own runtime: ``jax.distributed`` for
multi-host, ``jax.make_mesh`` for meshes and ``NamedSharding`` for placement.
Sharding strategy is chosen by config (mesh shape / axis names), not by code.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
MODEL_AXIS = "model"

_DISTRIBUTED_INITIALISED = False


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None,
                                 local_device_ids: Sequence[int] | None = None) -> None:
  """Initialises ``jax.distributed`` when a multi-process run is requested.

  A no-op for a single process (``num_processes`` in (None, 1) and no coordinator),
  so every launcher can call it unconditionally. ``coordinator_address="auto"`` calls
  ``jax.distributed.initialize()`` without arguments, so JAX detects the cluster itself
  (Cloud TPU pods, SLURM, Open MPI).
  """
  global _DISTRIBUTED_INITIALISED
  if _DISTRIBUTED_INITIALISED:
    return
  if not coordinator_address and (num_processes is None or num_processes <= 1):
    return
  # CPU-only processes need a cross-process collectives backend (gloo ships with jaxlib);
  # GPU/TPU use their own (NCCL / ICI), for which this setting is ignored.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address == "auto":
    jax.distributed.initialize()
    _DISTRIBUTED_INITIALISED = True
    return
  kwargs: dict[str, Any] = dict(coordinator_address=coordinator_address,
                                num_processes=num_processes, process_id=process_id)
  if local_device_ids is not None:
    kwargs["local_device_ids"] = list(local_device_ids)
  jax.distributed.initialize(**kwargs)
  _DISTRIBUTED_INITIALISED = True


def make_mesh(data: int = -1, model: int = 1,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Builds a ``(data, model)`` mesh over all (global) devices.

  Args:
    data: size of the data-parallel axis; -1 means "all remaining devices".
    model: size of the model axis (embedding tables are sharded over it).
    devices: devices to use (default: ``jax.devices()``, all hosts).

  Returns:
    A mesh with axis names ``("data", "model")`` and ``Auto`` axis types, so that
    ``jit`` propagates shardings from the inputs.
  """
  devices = list(devices) if devices is not None else jax.devices()
  n = len(devices)
  if model < 1 or n % model:
    raise ValueError(f"mesh: model axis {model} does not divide {n} devices")
  if data == -1:
    data = n // model
  if data < 1 or data * model > n:
    raise ValueError(f"mesh: data*model = {data}*{model} needs more than the {n} devices")
  # A smaller mesh than the machine (e.g. mesh_data=1 for a single-device baseline)
  # uses the first data*model devices.
  devices = devices[:data * model]
  auto = jax.sharding.AxisType.Auto
  return jax.make_mesh((data, model), (DATA_AXIS, MODEL_AXIS), axis_types=(auto, auto),
                       devices=devices)


def data_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading axis split over ``data``; the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_axis_size(mesh: jax.sharding.Mesh) -> int:
  return mesh.shape[DATA_AXIS]


def shard_batch(batch: Any, mesh: jax.sharding.Mesh) -> Any:
  """Places a host-global batch (pytree of arrays, leading axis = batch) on the mesh.

  Single-process: ``device_put`` with a data sharding. Multi-process: each process
  passes *its own* slice and the global array is assembled with
  ``jax.make_array_from_process_local_data``.
  """
  sharding = data_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Replicates a pytree over every device of the mesh.

  One process: ``jax.device_put``. Several processes: host values (identical on every
  process, e.g. item features, initial parameters) are placed with
  ``make_array_from_process_local_data`` (``multihost.put_replicated``) -- a
  ``device_put`` of a host array across processes first all-gathers it to check that
  every process passed the same value; arrays already global stay on device and are
  resharded there.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, replicated(mesh))
  from uatmc_jax.core.parallel import multihost  # local: multihost builds on this module
  target = replicated(mesh)

  def put(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.device_put(x, target)  # global already: an on-device reshard
    return multihost.put_replicated(x, mesh)

  return jax.tree.map(put, tree)


def process_slice(n: int) -> slice:
  """The contiguous slice of ``n`` global rows this process feeds (n divisible)."""
  p, c = jax.process_index(), jax.process_count()
  if n % c:
    raise ValueError(f"{n} rows do not split over {c} processes")
  per = n // c
  return slice(p * per, (p + 1) * per)


def pad_to_multiple(x: np.ndarray, multiple: int, fill: Any = 0) -> tuple[np.ndarray, int]:
  """Pads the leading axis to a multiple; returns the padded array and the valid count."""
  n = x.shape[0]
  rem = (-n) % multiple
  if rem == 0:
    return x, n
  pad = np.full((rem,) + x.shape[1:], fill, dtype=x.dtype)
  return np.concatenate([x, pad], axis=0), n


def is_primary_process() -> bool:
  """True on the process that writes results (process 0)."""
  return jax.process_index() == 0
