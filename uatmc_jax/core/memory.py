"""Process memory probes used to keep long runs inside the OS's limits (docs/design.md)."""
from __future__ import annotations


def memory_map_usage() -> float | None:
  """This process's memory mappings as a share of Linux's ``vm.max_map_count`` (else None).

  XLA:CPU maps its code in many small regions per compiled program (~500 for an MMGCN
  attack chunk); a run that compiles ~100 of them (every neighbourhood bucket x attacker,
  capped and uncapped) reaches the default limit of 65,530 and aborts inside LLVM
  ("Unable to allocate section memory").
  """
  try:
    with open("/proc/sys/vm/max_map_count") as f:
      limit = int(f.read())
    with open("/proc/self/maps", "rb") as f:
      used = sum(1 for _ in f)
  except (OSError, ValueError):
    return None
  return used / max(limit, 1)
