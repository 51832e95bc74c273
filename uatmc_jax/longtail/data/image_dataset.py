"""The in-memory image-classification dataset contract (METHODS.md B.1).

Every image reader (``image_folder.load_image_folder``, ``tfds_images.load_tfds_images``)
returns an ``ImageDataset``; the long-tail subsampling and the input pipeline consume it.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from uatmc_jax.core.errors import DataFormatError


@dataclasses.dataclass(frozen=True)
class ImageDataset:
  """Decoded images with integer labels.

  Attributes:
    images: ``(N, H, W, 3)`` uint8 RGB.
    labels: ``(N,)`` int32 in ``[0, num_classes)``; class ``c`` is ``class_names[c]``.
    class_names: the class names, index = label.
    source: where it came from (folder path or ``tfds:<name>/<split>``), for messages.
  """
  images: np.ndarray
  labels: np.ndarray
  class_names: tuple[str, ...]
  source: str = ""

  def __post_init__(self):
    if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
      raise DataFormatError(f"{self.source}: images must be (N, H, W, 3) uint8, got "
                            f"{self.images.shape} {self.images.dtype}")
    if self.labels.dtype != np.int32 or self.labels.shape != (self.images.shape[0],):
      raise DataFormatError(f"{self.source}: labels must be ({self.images.shape[0]},) "
                            f"int32, got {self.labels.shape} {self.labels.dtype}")
    if self.labels.size and (self.labels.min() < 0 or
                             self.labels.max() >= len(self.class_names)):
      raise DataFormatError(f"{self.source}: labels outside [0, {len(self.class_names)})")

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.images.shape[1:])

  def __len__(self) -> int:
    return int(self.images.shape[0])

  def class_counts(self) -> np.ndarray:
    """``(C,)`` int64: number of images of each class."""
    return np.bincount(self.labels, minlength=self.num_classes)

  def subset(self, indices: np.ndarray) -> "ImageDataset":
    """The rows ``indices`` (same classes)."""
    indices = np.asarray(indices)
    return ImageDataset(self.images[indices], self.labels[indices], self.class_names,
                        self.source)
