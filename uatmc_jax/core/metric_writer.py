"""Scalar metrics to TensorBoard event files, through the ``tensorboard`` package.

``ScalarWriter(logdir).write(step, {"train/loss": 1.2, ...})`` appends one event per
scalar to an ``events.out.tfevents.*`` file in ``logdir`` (view with
``tensorboard --logdir <workdir>``); ``read_scalars(logdir)`` reads every scalar back
with TensorBoard's own reader (``EventAccumulator``), as ``{tag: [(step, value), ...]}``.

The writer is ``tensorboard``'s ``EventFileWriter`` (the one ``torch.utils.tensorboard``
uses); it needs neither TensorFlow nor clu (clu's metric writers import TensorFlow,
which this project does not install). In a multi-process run only process 0 writes.

API for any trainer or experiment stage: ``ScalarWriter(logdir, enabled=
mesh_lib.is_primary_process())`` (a context manager), ``.write(step, {tag: value})``,
``.flush()``, ``.close()``; tags use ``/`` groups (``train/loss``, ``valid/recall@20``).
"""
from __future__ import annotations

import math
import os
import time
from typing import Mapping

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter


class ScalarWriter:
  """Appends scalar summaries to a TensorBoard event file.

  Args:
    logdir: the folder of the event file (created if missing).
    enabled: False makes every call a no-op (non-primary processes).
  """

  def __init__(self, logdir: str, *, enabled: bool = True):
    self.logdir = logdir
    self._writer = None
    if enabled:
      if "://" not in str(logdir):  # remote (gs://...): the writer's gfile layer creates it
        os.makedirs(logdir, exist_ok=True)
      self._writer = EventFileWriter(logdir)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    """One event per finite scalar at ``step`` (NaN/inf values and ``None`` are skipped)."""
    if self._writer is None:
      return
    values = [summary_pb2.Summary.Value(tag=tag, simple_value=float(v))
              for tag, v in scalars.items() if v is not None and math.isfinite(float(v))]
    if values:
      self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                             summary=summary_pb2.Summary(value=values)))

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def __enter__(self) -> "ScalarWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """Every scalar in the event files of ``logdir``: ``{tag: [(step, value), ...]}``."""
  from tensorboard.backend.event_processing import event_accumulator

  acc = event_accumulator.EventAccumulator(
      logdir, size_guidance={event_accumulator.SCALARS: 0})  # 0 = keep all
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
          for tag in acc.Tags()["scalars"]}
