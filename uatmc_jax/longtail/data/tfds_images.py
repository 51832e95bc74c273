"""CIFAR-10 / CIFAR-100 (or any TFDS image dataset) from a prepared ``data_dir``.

Nothing is downloaded at run time (``download=False``). The reader returns the same
``ImageDataset`` as the image-folder reader.

Two reading paths:

1. TensorFlow-free (default here; this project does not depend on tensorflow):
   ``tfds.data_source`` random access over a dataset prepared in the
   ``array_record`` file format; records are decoded by TFDS with numpy/PIL.
2. A dataset prepared in TFDS's default ``tfrecord`` format can only be read
   through ``tf.data``; if ``tensorflow`` is importable the reader falls back to
   ``tfds.as_numpy(tfds.load(..., batch_size=-1))``, otherwise it raises a
   ``DataFormatError`` saying to install ``tensorflow-cpu`` (optional) or to
   re-prepare as array_record.

Preparing the data once, on a machine with internet::

    pip install tensorflow-datasets tensorflow-cpu   # tensorflow helps TFDS prepare
    python -c "import tensorflow_datasets as tfds; \\
      tfds.builder('cifar10', data_dir='DATA_DIR', file_format='array_record')\\
      .download_and_prepare()"

then copy ``DATA_DIR`` to the training machine and pass ``data_dir=DATA_DIR``.
"""
from __future__ import annotations

import concurrent.futures
import os

import numpy as np

from uatmc_jax.core.errors import DataFormatError
from uatmc_jax.longtail.data.image_dataset import ImageDataset

_CHUNK = 1024


def preparation_hint(name: str, data_dir: str | None) -> str:
  d = data_dir or "DATA_DIR"
  return (f"prepare it once on a machine with internet: pip install tensorflow-datasets "
          f"tensorflow-cpu && python -c \"import tensorflow_datasets as tfds; "
          f"tfds.builder('{name}', data_dir='{d}', file_format='array_record')"
          f".download_and_prepare()\", then copy {d} here and pass data_dir={d}")


def _read_records(source, n: int, num_threads: int) -> tuple[np.ndarray, np.ndarray]:
  """All records of a random-access source as (images uint8, labels int32)."""
  first = source[0]
  image0 = np.asarray(first["image"])
  if image0.ndim == 2:
    image0 = image0[..., None]
  h, w, c = image0.shape
  if c not in (1, 3):
    raise DataFormatError(f"tfds: images have {c} channels, expected 1 (grey) or 3 (RGB)")
  images = np.empty((n, h, w, 3), np.uint8)
  labels = np.empty((n,), np.int64)

  def fill(start: int, stop: int) -> None:
    for i in range(start, stop):  # record-by-record: the TFDS random-access API
      rec = source[i]
      im = np.asarray(rec["image"], np.uint8)
      if im.ndim == 2:
        im = im[..., None]
      if im.shape[:2] != (h, w):
        raise DataFormatError(f"tfds: record {i} has image shape {im.shape}, expected "
                              f"{(h, w)} like record 0")
      images[i] = im if im.shape[-1] == 3 else np.repeat(im, 3, axis=-1)
      labels[i] = int(rec["label"])

  spans = [(s, min(s + _CHUNK, n)) for s in range(0, n, _CHUNK)]
  if num_threads <= 1 or len(spans) == 1:
    for s, e in spans:
      fill(s, e)
  else:
    with concurrent.futures.ThreadPoolExecutor(num_threads) as ex:
      for f in [ex.submit(fill, s, e) for s, e in spans]:
        f.result()
  return images, labels.astype(np.int32)


def _load_with_tensorflow(name, split, data_dir):
  import tensorflow_datasets as tfds
  arrays = tfds.as_numpy(tfds.load(name, split=split, data_dir=data_dir, download=False,
                                    batch_size=-1))
  images = np.asarray(arrays["image"], np.uint8)
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  return images, np.asarray(arrays["label"]).astype(np.int32)


def load_tfds_images(name: str, split: str, data_dir: str | os.PathLike | None, *,
                     num_threads: int | None = None) -> ImageDataset:
  """Loads a prepared TFDS image-classification dataset into memory.

  Args:
    name: TFDS name, e.g. ``cifar10`` or ``cifar100`` (fine labels); any dataset
      with ``image`` and ``label`` features works.
    split: ``train`` / ``test`` (TFDS split syntax, e.g. ``train[:10%]``, accepted).
    data_dir: the folder the dataset was prepared into (``None``: TFDS's default
      ``~/tensorflow_datasets``).
    num_threads: decoding threads (default ``min(8, os.cpu_count())``).

  Returns:
    ``ImageDataset`` (uint8 ``(N, H, W, 3)``, int32 labels, the dataset's label
    names).

  Raises:
    DataFormatError: the dataset is not prepared under ``data_dir`` (the message
      says how to prepare it), or it is in tfrecord format and tensorflow is absent.
  """
  import tensorflow_datasets as tfds  # heavy import, only when this reader is used

  data_dir = None if data_dir is None else os.fspath(data_dir)
  where = data_dir or "the default TFDS data_dir (~/tensorflow_datasets)"
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # TFDS raises assorted types; classify below
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e2:
      raise DataFormatError(f"tfds: unknown dataset {name!r} ({e2})") from e2
    if not builder.is_prepared():
      raise DataFormatError(f"tfds: dataset {name!r} is not prepared in {where} (no "
                            f"download at run time); {preparation_hint(name, data_dir)}") from e
    file_format = str(getattr(builder.info, "file_format", ""))
    try:
      import tensorflow  # noqa: F401  (optional: only for tfrecord-prepared data)
    except ImportError:
      raise DataFormatError(
          f"tfds: {name!r} in {builder.data_dir} is prepared as {file_format or 'tfrecord'}, "
          f"which only tensorflow can read, and tensorflow is not installed. Either "
          f"pip install tensorflow-cpu, or re-prepare as array_record: "
          f"{preparation_hint(name, data_dir)} (original error: {e})") from e
    try:
      images, labels = _load_with_tensorflow(name, split, data_dir)
    except Exception as e3:
      raise DataFormatError(f"tfds: cannot read {name!r} split {split!r} from {where}: "
                            f"{e3}") from e3
    names = tuple(builder.info.features["label"].names)
    return ImageDataset(images, labels, names, f"tfds:{name}/{split}")

  info = getattr(source, "dataset_info", None)
  try:
    if info is None:  # a custom random-access source (e.g. a list): ask the builder
      info = tfds.builder(name, data_dir=data_dir).info
    names = tuple(info.features["label"].names)
  except (AttributeError, KeyError) as e:
    raise DataFormatError(f"tfds: {name!r} has no 'label' ClassLabel feature") from e
  n = len(source)
  if n == 0:
    raise DataFormatError(f"tfds: {name!r} split {split!r} in {where} is empty")
  images, labels = _read_records(source, n, num_threads or min(8, os.cpu_count() or 1))
  return ImageDataset(images, labels, names, f"tfds:{name}/{split}")
