"""Results as JSON, readable Markdown tables and progress lines."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Iterable, Mapping, Sequence

import numpy as np


def _process_index() -> int:
  # jax is imported lazily so reading/writing results never needs it.
  if "jax" not in sys.modules:
    return 0
  return sys.modules["jax"].process_index()


def _jsonable(x: Any) -> Any:
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.generic,)):
    return x.item()
  if hasattr(x, "shape") and hasattr(x, "dtype"):  # numpy / jax arrays
    return np.asarray(x).tolist()
  if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
    return None if math.isnan(x) else (1e308 if x > 0 else -1e308)
  return x


def write_json(path: str, obj: Any, *, all_processes: bool = False) -> None:
  """Writes ``obj`` as indented JSON atomically (tmp file + rename).

  In a multi-process (multi-host) run only process 0 writes (every launcher's results
  come from one process), unless ``all_processes``.
  """
  if not all_processes and _process_index() != 0:
    return
  text = json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n"
  if is_remote_path(path):  # gs://... : through etils.epath (orbax's path layer)
    from etils import epath
    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def is_remote_path(path: Any) -> bool:
  """True for a ``scheme://`` location (``gs://bucket/run``); such paths are used as
  given, never passed through ``os.path.abspath``."""
  import re
  return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", str(path)) is not None


def write_text(path: str, text: str) -> None:
  """Writes ``text`` to a local or remote path (process 0 only), making its folder."""
  if _process_index() != 0:
    return
  from etils import epath
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  target.write_text(text)


def read_json(path: str) -> Any:
  if is_remote_path(path):
    from etils import epath
    return json.loads(epath.Path(path).read_text())
  with open(path) as f:
    return json.load(f)


def format_value(v: Any, digits: int = 4) -> str:
  if isinstance(v, Mapping) and "mean" in v:
    std = v.get("std")
    if std is None:
      return format_value(v["mean"], digits)
    return f"{v['mean']:.{digits}f} ± {std:.{digits}f}"
  if isinstance(v, float):
    return f"{v:.{digits}f}"
  return str(v)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 4) -> str:
  """A GitHub-flavoured Markdown table; floats and {mean, std} dicts are formatted."""
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  for row in rows:
    lines.append("| " + " | ".join(format_value(v, digits) for v in row) + " |")
  return "\n".join(lines)


STD_NOTE = "sample std (ddof 1)"


def mean_std(values: Sequence[float]) -> dict:
  """``{"mean", "std"}`` with the sample std (ddof 1; ``None`` for a single value).

  Over a few seeds the sample std (divisor n − 1) is the unbiased-variance estimate
  readers expect; the population std (divisor n) understates the spread, by a factor
  1/√2 for two seeds. One value has no spread: its std is ``None`` (JSON ``null``) and
  :func:`format_value` prints the mean alone. Table headers say so via
  :func:`std_header`.
  """
  a = np.asarray(values, dtype=np.float64)
  return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else None}


def std_header(n: int | str, what: str = "seeds") -> str:
  """"mean ± sample std (ddof 1) over <n> <what>", the wording of every table header;
  for n = 1 it says that the cells hold the single values, without a spread."""
  if str(n) == "1":
    one = "seed" if what == "seeds" else what
    return f"the values of 1 {one} (no ±: one value has no spread)"
  return f"mean ± {STD_NOTE} over {n} {what}"


class ProgressLogger:
  """One line per epoch: loss, selection metric, throughput; to stderr by default."""

  def __init__(self, name: str, stream=None, enabled: bool = True):
    self.name = name
    self.stream = stream or sys.stderr
    self.enabled = enabled
    self._t0 = time.perf_counter()

  def log(self, epoch: int, *, examples: int | None = None, seconds: float | None = None,
          **metrics: Any) -> None:
    if not self.enabled:
      return
    parts = [f"[{self.name}] epoch {epoch:4d}"]
    for k, v in metrics.items():
      parts.append(f"{k}={v:.5f}" if isinstance(v, float) else f"{k}={v}")
    if examples is not None and seconds:
      parts.append(f"{examples / seconds:,.0f} ex/s")
    if seconds is not None:
      parts.append(f"{seconds:.2f}s")
    parts.append(f"elapsed {time.perf_counter() - self._t0:.1f}s")
    print("  ".join(parts), file=self.stream, flush=True)


def finish_accuracy_axes(ax, xlabel: str) -> None:
  """Common styling of a per-class accuracy panel (accuracy in [0, 1], grid, legend)."""
  ax.set_xlabel(xlabel)
  ax.set_ylabel("accuracy")
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3)
  ax.legend()


def save_figure(fig, path: str) -> None:
  """Tight layout, save at 120 dpi and close (matplotlib figures are not freed otherwise)."""
  import matplotlib.pyplot as plt
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
