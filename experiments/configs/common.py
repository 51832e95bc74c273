"""Parsing of big_vision-style config arguments: ``--config=path.py:k=v,k2=v2``.

Values are typed by their literal form: ``True``/``False`` -> bool, ints, floats,
anything else a string. Lists use ``;`` or ``+`` between items (``seeds=1+2+3``,
``epsilon=0.05;0.1``) because ``,`` separates arguments.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from uatmc_jax.core.errors import ConfigError


def _literal(v: str) -> Any:
  s = v.strip()
  if s in ("True", "true"):
    return True
  if s in ("False", "false"):
    return False
  if s in ("None", "none", ""):
    return None
  for cast in (int, float):
    try:
      return cast(s)
    except ValueError:
      pass
  return s


def parse_arg(arg: str | None, allowed: Sequence[str] | None = None, **defaults: Any) -> dict:
  """Parses ``"k=v,k2=v2"`` over ``defaults``.

  Args:
    arg: the string after ``:`` in ``--config`` (may be None or empty).
    allowed: accepted keys (default: the keys of ``defaults``); others raise ConfigError.
    **defaults: default values.

  Returns:
    dict of defaults updated by the parsed values.
  """
  out = dict(defaults)
  allowed = set(allowed if allowed is not None else defaults)
  if not arg:
    return out
  for part in arg.split(","):
    part = part.strip()
    if not part:
      continue
    if "=" not in part:
      raise ConfigError(f"config argument {part!r}: expected key=value (got {arg!r})")
    k, v = part.split("=", 1)
    k = k.strip()
    if k not in allowed:
      raise ConfigError(f"config argument {k!r} is unknown; expected one of {sorted(allowed)}")
    out[k] = _literal(v)
  return out


def as_list(value: Any, cast: Callable[[Any], Any] = lambda x: x) -> list:
  """``"1;2;3"`` / ``"1+2+3"`` / ``3`` / ``[1, 2]`` -> typed list."""
  if value is None:
    return []
  if isinstance(value, (list, tuple)):
    return [cast(v) for v in value]
  if isinstance(value, str):
    sep = ";" if ";" in value else "+"
    return [cast(_literal(v)) for v in value.split(sep) if v.strip()]
  return [cast(value)]


def as_bool(value: Any, name: str = "value") -> bool:
  """``True``/``False`` (or 0/1) -> bool; anything else raises ConfigError naming ``name``."""
  if isinstance(value, bool):
    return value
  if value in (0, 1):
    return bool(value)
  raise ConfigError(f"config argument {name}={value!r}: expected True or False")
