"""Reader for the image-folder layout: one sub-folder per class (METHODS.md B.1).

    root/
      airplane/0000.jpg
      airplane/0001.jpg
      ...
      truck/0999.jpg

This is the layout of ../shared/data/cifar10/{train,test} and of most custom
datasets. Images (JPEG, PNG, BMP, WebP, GIF; any other file is ignored, as are hidden
files) are decoded with PIL to RGB, and the whole folder is returned as an
``ImageDataset`` (uint8 ``(N, H, W, 3)``, int32 labels, class names). Class ``c`` is
the ``c``-th sorted sub-folder name unless ``class_names`` gives the order (and
selects a subset). Within a class, files are read in sorted name order.
``max_per_class=k`` keeps k files of each class: with ``seed`` a seeded subsample
(``longtail.class_sample``: the same files as reading everything and then taking
``longtail.longtail_indices`` with that seed), without one the first k by name.

Decoding runs on a thread pool (PIL releases the GIL while decoding). With
``cache_dir`` the decoded arrays are saved as an uncompressed ``.npz`` keyed by the
folder's absolute path, its class list, ``max_per_class`` and every class folder's
modification time, so a later call skips decoding (and listing), and any added,
removed or renamed file invalidates the cache (a directory's mtime changes then). A
file rewritten in place under the same name is not detected: delete the cache.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import io
import os
import pathlib
import tempfile
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from uatmc_jax.core.errors import DataFormatError
from uatmc_jax.longtail.data import longtail
from uatmc_jax.longtail.data.image_dataset import ImageDataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")
_CACHE_VERSION = "v2"
_CHUNK = 512  # images per decoding task


def _class_folder_names(root: pathlib.Path, class_names: Sequence[str] | None) -> list[str]:
  if not root.exists():
    raise DataFormatError(f"{root}: image folder does not exist (expected one sub-folder "
                          f"per class holding JPEG/PNG images)")
  if not root.is_dir():
    raise DataFormatError(f"{root}: is a file, expected a folder with one sub-folder per "
                          f"class")
  with os.scandir(root) as it:
    found = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
  if class_names is None:
    if not found:
      raise DataFormatError(f"{root}: no class sub-folders (expected root/<class>/<image>)")
    return found
  names = [str(c) for c in class_names]
  if not names:
    raise DataFormatError(f"{root}: class_names is empty")
  if len(set(names)) != len(names):
    raise DataFormatError(f"{root}: class_names has duplicates: {names}")
  missing = [c for c in names if c not in found]
  if missing:
    raise DataFormatError(f"{root}: class folder(s) {missing} not found; present: {found}")
  return names


def _image_files(root: pathlib.Path, names: Sequence[str], max_per_class: int | None,
                 seed: int | None = None) -> list[list[pathlib.Path]]:
  files = []
  for index, c in enumerate(names):
    with os.scandir(root / c) as it:  # d_type from the directory: no stat per file
      fs = sorted(root / c / e.name for e in it
                  if e.is_file() and not e.name.startswith(".")
                  and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)
    if not fs:
      raise DataFormatError(f"{root / c}: class folder {c!r} holds no images "
                            f"(expected files ending in {', '.join(IMAGE_EXTENSIONS)})")
    if max_per_class is not None and seed is not None:
      keep = longtail.class_sample(len(fs), min(max_per_class, len(fs)), seed, index)
      fs = [fs[i] for i in keep]
    elif max_per_class is not None:
      fs = fs[:max_per_class]
    files.append(fs)
  return files


def list_image_folder(root: str | os.PathLike, class_names: Sequence[str] | None = None,
                      max_per_class: int | None = None, seed: int | None = None
                      ) -> tuple[list[str], list[list[pathlib.Path]]]:
  """``(class_names, files_per_class)`` of an image folder, without decoding.

  Same class order, file order, subsample and errors (except decoding) as
  ``load_image_folder``.
  """
  root = pathlib.Path(root)
  names = _class_folder_names(root, class_names)
  return names, _image_files(root, names, max_per_class, seed)


def _decode(path: pathlib.Path) -> np.ndarray:
  try:
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      if im.mode != "RGB":
        im = im.convert("RGB")
      return np.asarray(im, dtype=np.uint8)
  except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
    raise DataFormatError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e


def _decode_into(out: np.ndarray, start: int, paths: Sequence[pathlib.Path],
                 expected: tuple[int, ...]) -> None:
  for i, p in enumerate(paths):
    a = _decode(p)
    if a.shape != expected:
      raise DataFormatError(f"{p}: image is {a.shape[1]}x{a.shape[0]} (WxH), expected "
                            f"{expected[1]}x{expected[0]} like the first image; all "
                            f"images of a folder must have the same size")
    out[start + i] = a


def _cache_path(cache_dir: pathlib.Path, root: pathlib.Path, names: Sequence[str],
                max_per_class: int | None, seed: int | None) -> pathlib.Path:
  # A directory's mtime changes whenever an entry is added, removed or renamed, so
  # the class folders' mtimes identify the file lists without listing 50k files.
  h = hashlib.sha256()
  h.update(f"{_CACHE_VERSION}\0{root.resolve()}\0{max_per_class}\0{seed}\0".encode())
  for c in names:
    h.update(f"{c}\0{(root / c).stat().st_mtime_ns}\0".encode())
  return cache_dir / f"image_folder_{root.name}_{h.hexdigest()[:20]}.npz"


def load_image_folder(root: str | os.PathLike, *, class_names: Sequence[str] | None = None,
                      max_per_class: int | None = None, seed: int | None = None,
                      cache_dir: str | os.PathLike | None = None,
                      num_threads: int | None = None) -> ImageDataset:
  """Reads an image folder (one sub-folder per class) into memory.

  Args:
    root: the folder holding one sub-folder per class.
    class_names: class order (label ``c`` = ``class_names[c]``); only these folders
      are read. Default: all sub-folders, sorted by name.
    max_per_class: read only ``k`` files of each class (all when a class has fewer):
      a seeded subsample when ``seed`` is given, else the first ``k`` by name (quick
      tests); default all.
    seed: the subsample's seed: class ``c`` keeps the files at
      ``longtail.class_sample(n_c, k, seed, c)`` of its sorted list, the same images
      ``longtail.longtail_indices`` with this seed picks from the whole folder.
    cache_dir: if given, decoded arrays are cached there as ``.npz`` (created if
      needed) and reused while the folder is unchanged.
    num_threads: decoding threads (default ``min(8, os.cpu_count())``).

  Returns:
    ``ImageDataset`` with ``images (N, H, W, 3)`` uint8, ``labels (N,)`` int32 sorted
    by class then file name, and ``class_names``.

  Raises:
    DataFormatError: missing folder, no class folders, an unknown requested class, a
      class folder without images, an undecodable image (the file is named), or
      images of different sizes (the file and both sizes are named).
  """
  root = pathlib.Path(root)
  if max_per_class is not None and max_per_class < 1:
    raise DataFormatError(f"{root}: max_per_class must be >= 1, got {max_per_class}")
  names = _class_folder_names(root, class_names)
  source = str(root)

  cache_file = None
  if cache_dir is not None:
    cache_dir = pathlib.Path(cache_dir)
    cache_file = _cache_path(cache_dir, root, names, max_per_class, seed)
    if cache_file.is_file():
      try:
        with np.load(cache_file) as z:
          return ImageDataset(z["images"], z["labels"], tuple(names), source)
      except (OSError, ValueError, KeyError, DataFormatError):
        pass  # a corrupt / stale cache file is rebuilt below

  files = _image_files(root, names, max_per_class, seed)
  flat = [p for fs in files for p in fs]
  labels = np.concatenate([np.full(len(fs), c, np.int32) for c, fs in enumerate(files)])
  first = _decode(flat[0])
  images = np.empty((len(flat),) + first.shape, np.uint8)
  n_threads = num_threads or min(8, os.cpu_count() or 1)
  chunks = [(s, flat[s:s + _CHUNK]) for s in range(0, len(flat), _CHUNK)]
  if n_threads <= 1 or len(chunks) == 1:
    for s, paths in chunks:
      _decode_into(images, s, paths, first.shape)
  else:
    with concurrent.futures.ThreadPoolExecutor(n_threads) as ex:
      futures = [ex.submit(_decode_into, images, s, paths, first.shape) for s, paths in chunks]
      for f in futures:  # in order, so the first bad file (by position) is reported
        f.result()
  ds = ImageDataset(images, labels, tuple(names), source)

  if cache_file is not None:
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=cache_file.parent)
    try:
      with os.fdopen(fd, "wb") as fh:
        np.savez(fh, images=images, labels=labels)
      os.chmod(tmp, 0o644)
      os.replace(tmp, cache_file)  # atomic: a concurrent reader never sees half a file
    except BaseException:
      if os.path.exists(tmp):
        os.unlink(tmp)
      raise
  return ds
