"""Reader for the MMRec folder layout (METHODS.md A.3), the field's standard format.

A dataset folder holds

* ``<name>.inter``: tab-separated text, header exactly
  ``userID itemID rating timestamp x_label``; one interaction per line; ``x_label``
  0/1/2 = train/valid/test. ``rating`` and ``timestamp`` are carried by the format but
  unused by implicit-feedback training, so they are not parsed.
* ``<modality>_feat.npy``: one (n_items, d_m) float16/float32 array per modality, row =
  item id. Any modality names (``image``, ``text``, ``audio`` ...).
* optionally ``user_groups.npy``: (n_users,) integer planted user groups (written by the
  synthetic generator; used by the cross-modal mismatch diagnostics, A.5). Only this
  name is read: any other ``.npy`` (e.g. ``groups.npy``) is ignored with a warning, and
  the attack outputs say which grouping they used ("planted from <file>" or k-means).

Everything is validated before an :class:`InteractionData` is returned; bad input raises
:class:`~uatmc_jax.core.errors.DataFormatError` naming the file, the line or array and what
was expected. Parsing is vectorised numpy (one read of the file, no per-line Python), so
TikTok (68k lines) and Baby (160k lines) load in a fraction of a second.
"""
from __future__ import annotations

import pathlib
import warnings
from typing import Mapping, Sequence

import numpy as np

from uatmc_jax.core.errors import ConfigError, DataFormatError
from uatmc_jax.recsys.data.interactions import InteractionData

INTER_HEADER = ("userID", "itemID", "rating", "timestamp", "x_label")
FEATURE_SUFFIX = "_feat.npy"
USER_GROUPS_FILE = "user_groups.npy"
SPLIT_NAMES = ("train", "valid", "test")
_MAX_ID = np.iinfo(np.int32).max


def _line_text(lines_bytes: bytes, line_index: int) -> str:
  """The text of body line ``line_index`` (0-based), truncated for messages."""
  line = lines_bytes.split(b"\n", line_index + 1)[line_index]
  text = line.decode("utf-8", errors="replace")
  return repr(text if len(text) <= 80 else text[:77] + "...")


def _parse_column(column: np.ndarray, body: bytes, path: pathlib.Path, field: str,
                  dtype=np.int64) -> np.ndarray:
  """Bytes column -> ``dtype``; on failure names the first bad line (header = line 1)."""
  try:
    return column.astype(dtype)
  except (ValueError, OverflowError):
    pass
  for row, token in enumerate(column):  # error path only
    try:
      dtype(token.decode("utf-8", errors="replace"))
    except (ValueError, OverflowError):
      kind = "an integer" if dtype is np.int64 else "a number"
      raise DataFormatError(
          f"{path}: line {row + 2}: column {field!r} must be {kind}, got "
          f"{token.decode('utf-8', errors='replace')!r} (line {_line_text(body, row)})"
      ) from None
  raise AssertionError("unreachable: astype failed but every token parsed")


def _x_label_text(tokens, labels, row) -> str:
  if tokens is None:
    return str(int(labels[row]))
  return tokens[row, 4].decode("utf-8", errors="replace")


def _digits_to_int(buf: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray | None:
  """Vectorised decimal parse of fields buf[start:end]; None unless all are 1-10 digits."""
  length = end - start
  if length.size == 0 or length.min() < 1 or length.max() > 10:
    return None
  place = np.arange(int(length.max()))
  present = place[None, :] < length[:, None]
  index = np.where(present, end[:, None] - 1 - place[None, :], 0)
  digits = buf[index].astype(np.int64) - ord("0")
  if np.any(present & ((digits < 0) | (digits > 9))):
    return None
  return np.sum(np.where(present, digits, 0) * 10**place, axis=1)


def _parse_plain_digit_columns(buf, newlines, tabs, n_lines):
  """Fast path for (userID, itemID, x_label) when every field is plain digits."""
  line_start = np.concatenate([[0], newlines + 1])
  line_end = np.concatenate([newlines, [len(buf)]])
  tabs = tabs.reshape(n_lines, len(INTER_HEADER) - 1)
  columns = (_digits_to_int(buf, line_start, tabs[:, 0]),
             _digits_to_int(buf, tabs[:, 0] + 1, tabs[:, 1]),
             _digits_to_int(buf, tabs[:, 3] + 1, line_end))
  return None if any(c is None for c in columns) else columns


def read_inter_file(path: str | pathlib.Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Parses an MMRec ``.inter`` file.

  Args:
    path: the ``<name>.inter`` file.

  Returns:
    ``(users, items, x_label)``, int64 arrays of shape (n_lines,) in file order.

  Raises:
    DataFormatError: missing file, wrong header, wrong column count, non-integer or
      negative ids, x_label outside {0, 1, 2}; the message names the line.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise DataFormatError(f"{path}: interaction file not found")
  raw = path.read_bytes()
  if raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark written by some editors
    raw = raw[3:]
  if b"\r" in raw:
    raw = raw.replace(b"\r\n", b"\n")
  header, _, body = raw.partition(b"\n")
  header_fields = tuple(header.decode("utf-8", errors="replace").strip().split("\t"))
  if header_fields != INTER_HEADER:
    raise DataFormatError(
        f"{path}: line 1: header must be the tab-separated fields {INTER_HEADER}, got "
        f"{header_fields}")
  body = body.rstrip(b"\n")
  if not body:
    raise DataFormatError(f"{path}: no interaction lines after the header")

  # Column count per line, vectorised: which line does each tab belong to.
  buf = np.frombuffer(body, dtype=np.uint8)
  newlines = np.flatnonzero(buf == ord("\n"))
  n_lines = len(newlines) + 1
  tabs = np.flatnonzero(buf == ord("\t"))
  tabs_per_line = np.bincount(np.searchsorted(newlines, tabs), minlength=n_lines)
  bad = np.flatnonzero(tabs_per_line != len(INTER_HEADER) - 1)
  if bad.size:
    row = int(bad[0])
    raise DataFormatError(
        f"{path}: line {row + 2}: expected {len(INTER_HEADER)} tab-separated columns "
        f"{INTER_HEADER}, found {tabs_per_line[row] + 1} (line {_line_text(body, row)})")

  columns = _parse_plain_digit_columns(buf, newlines, tabs, n_lines)
  if columns is not None:
    users, items, labels = columns
    tokens = None
  else:  # something other than plain digits somewhere: the slower, exact path
    tokens = np.array(body.replace(b"\t", b"\n").split(b"\n")).reshape(
        n_lines, len(INTER_HEADER))
    users = _parse_column(tokens[:, 0], body, path, "userID")
    items = _parse_column(tokens[:, 1], body, path, "itemID")
    # MMRec configs may type x_label as float ("0.0"); accept integral values only.
    labels = _parse_column(tokens[:, 4], body, path, "x_label", np.float64)
  for name, values in (("userID", users), ("itemID", items)):
    bad = np.flatnonzero((values < 0) | (values > _MAX_ID))
    if bad.size:
      row = int(bad[0])
      raise DataFormatError(
          f"{path}: line {row + 2}: {name} must be a non-negative integer below 2**31, "
          f"got {values[row]}")
  bad = np.flatnonzero(~np.isin(labels, (0.0, 1.0, 2.0)))
  if bad.size:
    row = int(bad[0])
    raise DataFormatError(
        f"{path}: line {row + 2}: x_label must be 0, 1 or 2 (train/valid/test), got "
        f"{_x_label_text(tokens, labels, row)!r}")
  return users, items, labels.astype(np.int64)


def _check_no_duplicates(path: pathlib.Path, users: np.ndarray, items: np.ndarray,
                         n_items: int) -> None:
  keys = users * np.int64(n_items) + items
  order = np.argsort(keys, kind="stable")
  same = np.flatnonzero(keys[order][1:] == keys[order][:-1])
  if same.size:
    # Report the duplicate whose second occurrence comes first in the file.
    second = order[same + 1]
    k = int(np.argmin(second))
    first_line, second_line = int(order[same[k]]) + 2, int(second[k]) + 2
    raise DataFormatError(
        f"{path}: duplicate (userID, itemID) pair ({users[second[k]]}, "
        f"{items[second[k]]}) on lines {first_line} and {second_line}; each pair must "
        "appear once across train/valid/test")


def read_feature_file(path: str | pathlib.Path) -> np.ndarray:
  """Loads one ``<modality>_feat.npy`` as a finite float32 (n_items, d) array."""
  path = pathlib.Path(path)
  try:
    array = np.load(path, allow_pickle=False)
  except FileNotFoundError:
    raise DataFormatError(f"{path}: feature file not found") from None
  except (ValueError, OSError, EOFError) as e:
    raise DataFormatError(f"{path}: not a readable .npy array ({e})") from None
  if array.ndim != 2:
    raise DataFormatError(
        f"{path}: feature array must be 2-D (n_items, dim), got shape {array.shape}")
  if not np.issubdtype(array.dtype, np.floating):
    raise DataFormatError(
        f"{path}: feature array must be floating point (float16/float32), got dtype "
        f"{array.dtype}")
  array = np.ascontiguousarray(array, dtype=np.float32)
  finite_rows = np.isfinite(array).all(axis=1)
  if not finite_rows.all():
    row = int(np.argmin(finite_rows))
    raise DataFormatError(
        f"{path}: feature array has NaN/inf values; first bad row (item id) {row} of "
        f"{array.shape[0]}")
  return array


def find_inter_file(folder: pathlib.Path, name: str | None) -> pathlib.Path:
  if name is not None:
    path = folder / f"{name}.inter"
    if not path.is_file():
      raise DataFormatError(f"{path}: interaction file not found")
    return path
  candidates = sorted(folder.glob("*.inter"))
  if len(candidates) != 1:
    found = [c.name for c in candidates] or "none"
    raise DataFormatError(
        f"{folder}: expected exactly one <name>.inter file (or pass name=), found {found}")
  return candidates[0]


def _warn_unknown_npy(folder: pathlib.Path) -> None:
  """Warns about ``.npy`` files the loader ignores (e.g. ``groups.npy``).

  Only ``<modality>_feat.npy`` and ``user_groups.npy`` are read; a planted grouping under
  another name would otherwise be silently replaced by k-means in the attacks.
  """
  ignored = sorted(p.name for p in folder.glob("*.npy")
                   if not p.name.endswith(FEATURE_SUFFIX) and p.name != USER_GROUPS_FILE)
  if ignored:
    warnings.warn(
        f"{folder}: ignoring {ignored}: planted user groups are read only from "
        f"{USER_GROUPS_FILE!r} and features only from <modality>{FEATURE_SUFFIX}; without "
        f"{USER_GROUPS_FILE} the attacks group users by k-means (rename the file to use "
        "it)", UserWarning, stacklevel=3)


def load_mmrec(folder: str | pathlib.Path,
               name: str | None = None,
               modalities: Sequence[str] | None = None,
               *,
               random_features: Mapping[str, int] | None = None,
               seed: int = 0) -> InteractionData:
  """Loads an MMRec-layout folder (METHODS.md A.3) into an :class:`InteractionData`.

  Args:
    folder: the dataset folder.
    name: dataset name, i.e. the stem of ``<name>.inter``; ``None`` finds the single
      ``*.inter`` file.
    modalities: which ``<modality>_feat.npy`` to load; ``None`` loads every one present.
      ``features`` is always ordered by sorted modality name.
    random_features: optional ``{modality: width}`` of extra standard-normal float32
      features to attach (e.g. ``{"image": 4096, "text": 384}`` for scale benchmarks on
      an interactions-only folder); names must not clash with files in the folder.
    seed: seed of ``random_features``.

  Returns:
    The validated dataset. ``n_users`` is ``max(userID) + 1``; ``n_items`` is the
    feature row count when features exist, else ``max(itemID) + 1``.

  Raises:
    DataFormatError: any problem with the files (see module docstring); nothing is
      returned half-loaded.
    ConfigError: a requested modality is absent, or random features clash with files.
  """
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise DataFormatError(f"{folder}: dataset folder not found")
  inter_path = find_inter_file(folder, name)
  name = inter_path.name[:-len(".inter")]
  users, items, labels = read_inter_file(inter_path)

  available = sorted(p.name[:-len(FEATURE_SUFFIX)] for p in folder.glob(f"*{FEATURE_SUFFIX}"))
  if modalities is None:
    wanted = available
  else:
    wanted = sorted(set(modalities))
    missing = [m for m in wanted if m not in available]
    if missing:
      raise ConfigError(
          f"{folder}: modalities {missing} requested but no {missing[0]}{FEATURE_SUFFIX}; "
          f"available: {available}")
  features = {m: read_feature_file(folder / f"{m}{FEATURE_SUFFIX}") for m in wanted}
  row_counts = {m: f.shape[0] for m, f in features.items()}
  if len(set(row_counts.values())) > 1:
    raise DataFormatError(
        f"{folder}: feature files have different row counts {row_counts}; every "
        f"<modality>{FEATURE_SUFFIX} must have one row per item")
  if features:
    n_items = next(iter(row_counts.values()))
    bad = np.flatnonzero(items >= n_items)
    if bad.size:
      row = int(bad[0])
      raise DataFormatError(
          f"{inter_path}: line {row + 2}: itemID {items[row]} is outside the feature "
          f"rows (the {', '.join(f + FEATURE_SUFFIX for f in features)} arrays have "
          f"{n_items} rows, ids must be < {n_items})")
  else:
    n_items = int(items.max()) + 1
  n_users = int(users.max()) + 1

  _check_no_duplicates(inter_path, users, items, n_items)
  pairs = np.stack([users, items], axis=1).astype(np.int32)
  splits = {}
  for label, split in enumerate(SPLIT_NAMES):
    rows = pairs[labels == label]
    if rows.shape[0] == 0:
      raise DataFormatError(
          f"{inter_path}: the {split} split (x_label={label}) has no users; every split "
          "needs at least one interaction")
    splits[split] = rows

  _warn_unknown_npy(folder)
  user_groups = None
  groups_path = folder / USER_GROUPS_FILE
  if groups_path.exists():
    try:
      groups = np.load(groups_path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
      raise DataFormatError(f"{groups_path}: not a readable .npy array ({e})") from None
    if groups.shape != (n_users,):
      raise DataFormatError(
          f"{groups_path}: expected one group id per user, shape ({n_users},), got "
          f"{groups.shape}")
    if not np.issubdtype(groups.dtype, np.integer) or (groups.size and groups.min() < 0):
      raise DataFormatError(
          f"{groups_path}: group ids must be non-negative integers, got dtype "
          f"{groups.dtype}")
    user_groups = groups.astype(np.int32)

  if random_features:
    clash = sorted(set(random_features) & set(features))
    if clash:
      raise ConfigError(
          f"random_features {clash} clash with feature files in {folder}; choose other "
          "names or modalities=")
    rng = np.random.default_rng(seed)
    for m in sorted(random_features):
      width = int(random_features[m])
      if width <= 0:
        raise ConfigError(f"random_features[{m!r}] must be a positive width, got {width}")
      features[m] = rng.standard_normal((n_items, width), dtype=np.float32)
  features = {m: features[m] for m in sorted(features)}

  return InteractionData(name=name, n_users=n_users, n_items=n_items,
                         train=splits["train"], valid=splits["valid"],
                         test=splits["test"], features=features,
                         user_groups=user_groups,
                         user_groups_source=None if user_groups is None else str(groups_path))


BUILTIN_DATASETS = ("synthetic",)


def load_dataset(name_or_path: str | pathlib.Path, **kwargs) -> InteractionData:
  """Loads a built-in dataset by name or any MMRec-layout folder by path.

  Args:
    name_or_path: ``"synthetic"`` (the embedded generator, :mod:`.synthetic`; no files
      needed) or the path of an MMRec-layout folder.
    **kwargs: forwarded to :func:`~uatmc_jax.recsys.data.synthetic.make_synthetic` or
      :func:`load_mmrec`.

  Raises:
    ConfigError: neither a built-in name nor an existing folder.
  """
  if str(name_or_path) == "synthetic":
    from uatmc_jax.recsys.data import synthetic  # same layer; deferred to avoid an import cycle
    return synthetic.make_synthetic(**kwargs)
  path = pathlib.Path(name_or_path).expanduser()
  if path.is_dir():
    return load_mmrec(path, **kwargs)
  raise ConfigError(
      f"dataset {str(name_or_path)!r} is neither a built-in dataset {BUILTIN_DATASETS} "
      "nor an existing MMRec-layout folder (containing <name>.inter and "
      "<modality>_feat.npy files)")
