"""Parsing of big_vision-style config arguments: ``--config=path.py:k=v,k2=v2``.

Values are typed by their literal form: ``True``/``False`` -> bool, ints, floats,
anything else a string. Lists use ``;`` or ``+`` between items (``seeds=1+2+3``,
``epsilon=0.05;0.1``) because ``,`` separates arguments.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

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
  allowed_map = allowed if isinstance(allowed, Mapping) else None
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
    reference = defaults.get(k) if k in defaults else (
        allowed_map.get(k) if allowed_map is not None else None)
    check_type(k, v, out[k], reference)
  return out


def _type_name(reference: Any) -> str:
  if isinstance(reference, bool):
    return "True or False"
  return "an integer" if isinstance(reference, int) else "a number"


def _fits(value: Any, reference: Any) -> bool:
  if value is None:
    return True
  if isinstance(reference, bool):
    return isinstance(value, bool) or value in (0, 1)
  if isinstance(reference, int):
    return isinstance(value, int) and not isinstance(value, bool)
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_type(key: str, raw: str, value: Any, reference: Any) -> None:
  """Raises ConfigError when ``value`` cannot be of the type of the default ``reference``.

  Only bool / int / float defaults are checked (a None or string default accepts any
  text). A ``;``/``+`` list of such values passes when every item fits (``seeds=1+2+3``
  over the default 3, ``epsilon=0.05;0.1`` over 0.05).
  """
  if reference is None or isinstance(reference, str) or not isinstance(
      reference, (bool, int, float)):
    return
  items = [value]
  if isinstance(value, str) and (";" in value or "+" in value):
    items = [_literal(x) for x in value.replace(";", "+").split("+") if x.strip()]
  if not all(_fits(x, reference) for x in items):
    raise ConfigError(f"config argument {key}={raw.strip()!r}: expected "
                      f"{_type_name(reference)} (default {reference!r})")


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
