"""Live progress of a training loop: step / epoch, metrics, images/s and ETA.

``StepProgress.update`` prints one line at most every ``every_seconds`` (and always at
the last step), e.g.::

  [longtail:pgd_at] epoch 3/15 step 52/240 (22%)  loss=1.8312 adv_train_acc=0.3125
    412 img/s  elapsed 0:31  ETA 1:52

Throughput and ETA are measured from the end of the first step on (the first call of a
jitted step includes compilation).
"""
from __future__ import annotations

import sys
import time
from typing import Any


def format_seconds(seconds: float) -> str:
  """``h:mm:ss`` / ``m:ss``."""
  s = int(round(max(seconds, 0.0)))
  h, rem = divmod(s, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class StepProgress:
  """Prints progress lines for a loop of ``total_steps`` steps of ``images_per_step``.

  Args:
    name: prefix of every line.
    total_steps: steps of the whole run (all epochs).
    images_per_step: global batch size.
    num_epochs: for the ``epoch e/E`` field.
    every_seconds: minimum time between two lines.
    stream: where to print (stderr).
    enabled: False = silent (non-primary processes, tests).
  """

  def __init__(self, name: str, *, total_steps: int, images_per_step: int, num_epochs: int,
               every_seconds: float = 10.0, stream=None,
               enabled: bool = True):
    self.name, self.total_steps, self.num_epochs = name, total_steps, num_epochs
    self.images_per_step = images_per_step
    self.every_seconds = every_seconds
    self.stream = stream or sys.stderr
    self.enabled = enabled
    self._t_start = time.perf_counter()
    self._t_last_print = None
    self._rate_origin: tuple[float, int] | None = None  # (time, step) at the 1st update

  def steps_per_second(self, step: int, now: float) -> float | None:
    if self._rate_origin is None or step <= self._rate_origin[1]:
      return None
    t0, s0 = self._rate_origin
    return (step - s0) / max(now - t0, 1e-9)

  def update(self, step: int, epoch: int, **metrics: Any) -> str | None:
    """Records that ``step`` (1-based count of steps done) finished in ``epoch`` (0-based);
    returns the printed line, or None when nothing was printed."""
    now = time.perf_counter()
    if self._rate_origin is None:
      self._rate_origin = (now, step)
    last = step >= self.total_steps
    if not self.enabled or (not last and self._t_last_print is not None
                            and now - self._t_last_print < self.every_seconds):
      return None
    self._t_last_print = now
    parts = [f"[{self.name}] epoch {epoch + 1}/{self.num_epochs} step {step}/"
             f"{self.total_steps} ({100 * step / max(self.total_steps, 1):.0f}%)"]
    parts.append(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in metrics.items()))
    rate = self.steps_per_second(step, now)
    if rate is not None:
      parts.append(f"{rate * self.images_per_step:,.0f} img/s")
    parts.append(f"elapsed {format_seconds(now - self._t_start)}")
    if rate is not None:
      parts.append(f"ETA {format_seconds((self.total_steps - step) / rate)}")
    line = "  ".join(p for p in parts if p)
    print(line, file=self.stream, flush=True)
    return line
