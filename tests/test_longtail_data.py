"""Long-tail image data (METHODS.md B.1): folder / TFDS readers, LT subsets, pipeline."""
import math
import pathlib

import numpy as np
import pytest
from PIL import Image

from uatmc_jax.longtail.data import image_pipeline as pipeline_lib
from uatmc_jax.longtail.data.image_dataset import ImageDataset
from uatmc_jax.longtail.data.image_folder import list_image_folder, load_image_folder
from uatmc_jax.longtail.data.longtail import (class_groups, longtail_class_counts,
                                     longtail_indices, make_longtail)
from uatmc_jax.core.errors import ConfigError, DataFormatError


# ---------------------------------------------------------------------------------
# Image folder
# ---------------------------------------------------------------------------------
def _image(seed, h=6, w=8):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def tiny_folder(tmp_path):
  """Classes 'cat' (3 PNG), 'ant' (2 PNG, one greyscale), 'bee' (2 JPEG); 8x6 images.

  Also a text file and a hidden file that must be ignored. Returns (root, expected)
  with expected[class] = list of arrays in file-name order (PNG exact).
  """
  root = tmp_path / "train"
  expected = {}
  for cls, n in (("cat", 3), ("ant", 2)):
    (root / cls).mkdir(parents=True)
    arrs = []
    for i in range(n):
      a = _image(hash((cls, i)) % 1000)
      if cls == "ant" and i == 1:  # greyscale PNG -> replicated to RGB
        g = a[..., 0]
        Image.fromarray(g, mode="L").save(root / cls / f"{i:04d}.png")
        a = np.repeat(g[..., None], 3, axis=-1)
      else:
        Image.fromarray(a).save(root / cls / f"{i:04d}.png")
      arrs.append(a)
    expected[cls] = arrs
  (root / "bee").mkdir()
  flat = np.full((6, 8, 3), (200, 40, 90), np.uint8)  # flat colour: JPEG ~exact
  for i in range(2):
    Image.fromarray(flat).save(root / "bee" / f"{i:04d}.jpg", quality=95)
  expected["bee"] = [flat, flat]
  (root / "cat" / "notes.txt").write_text("not an image")
  (root / "cat" / ".hidden.png").write_bytes(b"junk")
  return root, expected


def test_folder_round_trip(tiny_folder):
  root, expected = tiny_folder
  ds = load_image_folder(root, num_threads=2)
  assert ds.class_names == ("ant", "bee", "cat")  # sorted folder names
  assert ds.images.shape == (7, 6, 8, 3) and ds.images.dtype == np.uint8
  assert ds.labels.dtype == np.int32
  np.testing.assert_array_equal(ds.labels, [0, 0, 1, 1, 2, 2, 2])
  np.testing.assert_array_equal(ds.images[0], expected["ant"][0])
  np.testing.assert_array_equal(ds.images[1], expected["ant"][1])
  for k in range(3):
    np.testing.assert_array_equal(ds.images[4 + k], expected["cat"][k])
  assert np.abs(ds.images[2:4].astype(int) - expected["bee"][0]).max() <= 3  # JPEG
  np.testing.assert_array_equal(ds.class_counts(), [2, 2, 3])


def test_folder_given_class_order_subset_and_max_per_class(tiny_folder):
  root, expected = tiny_folder
  ds = load_image_folder(root, class_names=["cat", "ant"], max_per_class=2, num_threads=1)
  assert ds.class_names == ("cat", "ant")
  np.testing.assert_array_equal(ds.labels, [0, 0, 1, 1])
  np.testing.assert_array_equal(ds.images[1], expected["cat"][1])
  np.testing.assert_array_equal(ds.images[2], expected["ant"][0])


def test_folder_cache_reused_and_invalidated(tiny_folder, tmp_path):
  root, expected = tiny_folder
  cache = tmp_path / "cache"
  a = load_image_folder(root, cache_dir=cache)
  files = list(cache.glob("*.npz"))
  assert len(files) == 1
  # Corrupting the decoded pixels in the cache shows the second call reads it.
  with np.load(files[0]) as z:
    imgs, labels = z["images"].copy(), z["labels"]
  imgs[0] = 0
  np.savez(files[0], images=imgs, labels=labels)
  b = load_image_folder(root, cache_dir=cache)
  assert (b.images[0] == 0).all() and not (a.images[0] == 0).all()
  # Adding a file changes the key: a fresh decode with the new image.
  Image.fromarray(_image(7)).save(root / "ant" / "0009.png")
  c = load_image_folder(root, cache_dir=cache)
  assert len(c) == 8 and len(list(cache.glob("*.npz"))) == 2
  np.testing.assert_array_equal(c.images[0], expected["ant"][0])


def test_train_longtail_load_datasets_passes_cache_dir(tiny_folder, tmp_path):
  import shutil
  from uatmc_jax.longtail import experiment as lt_experiment
  from experiments.configs import longtail as longtail_config
  root, _ = tiny_folder
  shutil.copytree(root, tmp_path / "test")
  arg = f"dataset=folder,data_dir={tmp_path},n_max=2,test_per_class=1"
  train, test = lt_experiment.load_datasets(longtail_config.get_config(arg))
  assert len(train) == 6 and len(test) == 3  # default: no cache anywhere
  assert not list(tmp_path.rglob("*.npz"))
  cache = tmp_path / "cache"
  cfg = longtail_config.get_config(arg + f",cache_dir={cache}")
  lt_experiment.load_datasets(cfg)
  assert len(list(cache.glob("*.npz"))) == 2  # train and test, keyed separately
  train2, test2 = lt_experiment.load_datasets(cfg)  # second call: from the cache
  np.testing.assert_array_equal(train2.images, train.images)
  np.testing.assert_array_equal(test2.labels, test.labels)
  assert len(list(cache.glob("*.npz"))) == 2


def test_folder_errors(tmp_path, tiny_folder):
  with pytest.raises(DataFormatError, match="does not exist"):
    load_image_folder(tmp_path / "nope")
  (tmp_path / "afile").write_text("x")
  with pytest.raises(DataFormatError, match="is a file"):
    load_image_folder(tmp_path / "afile")
  (tmp_path / "empty_root").mkdir()
  with pytest.raises(DataFormatError, match="no class sub-folders"):
    load_image_folder(tmp_path / "empty_root")
  root, _ = tiny_folder
  with pytest.raises(DataFormatError, match="'dog'.*not found"):
    load_image_folder(root, class_names=["cat", "dog"])
  (root / "dog").mkdir()
  (root / "dog" / "readme.txt").write_text("no images here")
  with pytest.raises(DataFormatError, match="'dog' holds no images"):
    load_image_folder(root)
  (root / "dog" / "0000.png").write_bytes(b"\x89PNG definitely not a png")
  with pytest.raises(DataFormatError, match=r"dog/0000\.png: cannot decode"):
    load_image_folder(root)
  Image.fromarray(_image(1, h=7, w=8)).save(root / "dog" / "0000.png")
  with pytest.raises(DataFormatError, match=r"dog/0000\.png: image is 8x7 .*expected 8x6"):
    load_image_folder(root)


def test_image_dataset_validates():
  ok = np.zeros((2, 4, 4, 3), np.uint8)
  with pytest.raises(DataFormatError, match="uint8"):
    ImageDataset(ok.astype(np.float32), np.zeros(2, np.int32), ("a", "b"), "x")
  with pytest.raises(DataFormatError, match="int32"):
    ImageDataset(ok, np.zeros(2, np.int64), ("a", "b"), "x")
  with pytest.raises(DataFormatError, match="outside"):
    ImageDataset(ok, np.array([0, 2], np.int32), ("a", "b"), "x")


def test_real_cifar10_folder(shared_data):
  names, files = list_image_folder(shared_data / "cifar10" / "train")
  assert names == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                   "horse", "ship", "truck"]
  assert [len(f) for f in files] == [5000] * 10
  _, test_files = list_image_folder(shared_data / "cifar10" / "test")
  assert [len(f) for f in test_files] == [1000] * 10
  ds = load_image_folder(shared_data / "cifar10" / "test", class_names=["cat", "ship"],
                         max_per_class=200)
  assert ds.images.shape == (400, 32, 32, 3) and ds.class_names == ("cat", "ship")
  assert 40 < ds.images.mean() < 220 and ds.images.std() > 20  # real, varied pixels


# ---------------------------------------------------------------------------------
# TFDS (tfds.testing.mock_data: works without tensorflow via the array_record path)
# ---------------------------------------------------------------------------------
def test_tfds_mock_random_matches_data_source():
  tfds = pytest.importorskip("tensorflow_datasets")
  from uatmc_jax.longtail.data.tfds_images import load_tfds_images
  with tfds.testing.mock_data(num_examples=40):
    ds = load_tfds_images("cifar10", "train", "/nonexistent/tfds", num_threads=2)
    src = tfds.data_source("cifar10", split="train", download=False)
    assert ds.images.shape == (40, 32, 32, 3) and ds.images.dtype == np.uint8
    assert ds.num_classes == 10 and ds.labels.dtype == np.int32
    for i in (0, 17, 39):
      np.testing.assert_array_equal(ds.images[i], src[i]["image"])
      assert ds.labels[i] == int(src[i]["label"])
    ds100 = load_tfds_images("cifar100", "test", None)
    assert ds100.num_classes == 100  # fine labels


def test_tfds_conversion_exact_with_known_records():
  tfds = pytest.importorskip("tensorflow_datasets")
  from uatmc_jax.longtail.data.tfds_images import load_tfds_images
  records = [{"image": np.full((32, 32, 3), 10 * i, np.uint8), "label": (3 * i) % 10}
             for i in range(12)]
  records[5] = {"image": np.full((32, 32, 1), 77, np.uint8), "label": 9}  # greyscale
  with tfds.testing.mock_data(as_data_source_fn=lambda *a, **k: records):
    ds = load_tfds_images("cifar10", "test", "/nonexistent/tfds", num_threads=1)
  np.testing.assert_array_equal(ds.labels, [r["label"] for r in records])
  np.testing.assert_array_equal(ds.images[:, 0, 0, 0], [10 * i if i != 5 else 77
                                                        for i in range(12)])
  assert (ds.images[5] == 77).all()


def test_tfds_not_prepared_error(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  from uatmc_jax.longtail.data.tfds_images import load_tfds_images
  with pytest.raises(DataFormatError, match=r"not prepared in .*download_and_prepare"):
    load_tfds_images("cifar10", "train", tmp_path / "tfds")


# ---------------------------------------------------------------------------------
# Long-tailed subsets and class groups
# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("num_classes,n_max,ir,total", [
    (10, 5000, 100, 12406), (10, 5000, 10, 20431),
    (100, 500, 100, 10847), (100, 500, 10, 19573)])
def test_longtail_counts_match_formula(num_classes, n_max, ir, total):
  counts = longtail_class_counts(num_classes, ir, n_max)
  expected = [math.floor(n_max * ir ** (-c / (num_classes - 1))) for c in range(num_classes)]
  np.testing.assert_array_equal(counts, expected)
  assert counts.sum() == total  # the standard CIFAR-LT sizes
  assert counts[0] == n_max and counts[-1] == n_max // ir
  assert np.all(np.diff(counts) <= 0)


def test_longtail_cifar10_ir100_profile():
  np.testing.assert_array_equal(longtail_class_counts(10, 100, 5000),
                                [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50])
  np.testing.assert_array_equal(longtail_class_counts(10, 1, 7), [7] * 10)
  np.testing.assert_array_equal(longtail_class_counts(10, 2.5, 100)[[0, 9]], [100, 40])
  with pytest.raises(ConfigError, match="imbalance_ratio"):
    longtail_class_counts(10, 0, 5000)


def _balanced(num_classes, per_class):
  labels = np.repeat(np.arange(num_classes, dtype=np.int32), per_class)
  rng = np.random.default_rng(0)
  labels = labels[rng.permutation(labels.size)]
  images = np.zeros((labels.size, 2, 2, 3), np.uint8)
  images[:, 0, 0, 0] = labels  # the pixel remembers the class
  images[:, 0, 0, 1] = np.arange(labels.size) % 256
  return ImageDataset(images, labels, tuple(f"c{i}" for i in range(num_classes)))


def test_make_longtail_counts_determinism_and_errors():
  ds = _balanced(10, 60)
  lt, counts = make_longtail(ds, 10, n_max=60, seed=3)
  np.testing.assert_array_equal(counts, [math.floor(60 * 10 ** (-c / 9)) for c in range(10)])
  np.testing.assert_array_equal(lt.class_counts(), counts)
  np.testing.assert_array_equal(lt.images[:, 0, 0, 0], lt.labels)  # rows kept whole
  idx = longtail_indices(ds.labels, counts, seed=3)
  assert np.unique(idx).size == idx.size == counts.sum()
  np.testing.assert_array_equal(idx, longtail_indices(ds.labels, counts, seed=3))
  assert not np.array_equal(idx, longtail_indices(ds.labels, counts, seed=4))
  with pytest.raises(ConfigError, match="class 0 has 60 images but the profile asks for 61"):
    make_longtail(ds, 10, n_max=61)
  with pytest.raises(ConfigError, match="has 60 images"):
    make_longtail(ds, 100)  # default n_max 5000 for 10 classes


def test_class_groups():
  g = class_groups(longtail_class_counts(10, 100, 5000))
  assert g.indices("many").tolist() == list(range(8))  # 139 > 100, 83 <= 100
  assert g.indices("medium").tolist() == [8, 9]
  assert g.indices("few").tolist() == []               # nothing under 20 on C10-LT
  assert g.indices("tail").tolist() == [7, 8, 9]       # ceil(0.3 * 10) = 3
  counts = longtail_class_counts(100, 100, 500)
  g = class_groups(counts)
  np.testing.assert_array_equal(g.many, counts > 100)
  np.testing.assert_array_equal(g.medium, (counts >= 20) & (counts <= 100))
  np.testing.assert_array_equal(g.few, counts < 20)
  assert g.indices("tail").tolist() == list(range(70, 100))
  assert (g.many.astype(int) + g.medium + g.few == 1).all()
  # Tail picks the smallest counts regardless of class order; ceil(0.3 * 7) = 3.
  g = class_groups(np.array([5, 50, 1, 70, 3, 90, 200]))
  assert g.indices("tail").tolist() == [0, 2, 4]
  assert g.as_dict()["few"] == [0, 2, 4]


# ---------------------------------------------------------------------------------
# Augmentation and pipeline
# ---------------------------------------------------------------------------------
def _hand_image():
  return (np.arange(32 * 32 * 3) % 251 + 1).reshape(1, 32, 32, 3).astype(np.uint8)


def test_crop_flip_on_hand_made_image():
  x = _hand_image()
  same = pipeline_lib.crop_flip_numpy(x, np.array([4]), np.array([4]), np.array([False]))
  np.testing.assert_array_equal(same, x)
  flipped = pipeline_lib.crop_flip_numpy(x, np.array([4]), np.array([4]), np.array([True]))
  np.testing.assert_array_equal(flipped[0], x[0, :, ::-1])
  # Offset (0, 0): the top-left 4 rows/cols are the zero padding, the rest is shifted.
  tl = pipeline_lib.crop_flip_numpy(x, np.array([0]), np.array([0]), np.array([False]))
  assert (tl[0, :4] == 0).all() and (tl[0, :, :4] == 0).all()
  np.testing.assert_array_equal(tl[0, 4:, 4:], x[0, :28, :28])
  # Offset (8, 2) then flip.
  d = pipeline_lib.crop_flip_numpy(x, np.array([8]), np.array([2]), np.array([True]))
  shifted = np.zeros_like(x[0])
  shifted[:28, 2:] = x[0, 4:, :30]
  np.testing.assert_array_equal(d[0], shifted[:, ::-1])


def _which_crop(out, x, pad=4):
  padded = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
  hits = [(dy, dx, f) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
          for f in (False, True)
          if np.array_equal(out, (lambda c: c[:, ::-1] if f else c)(
              padded[dy:dy + 32, dx:dx + 32]))]
  return hits


@pytest.mark.parametrize("backend", ["numpy", "jax"])
def test_random_augmentation_is_a_valid_crop_and_seeded(backend):
  x = np.repeat(_hand_image(), 64, axis=0)
  if backend == "numpy":
    aug = lambda s: pipeline_lib.random_crop_flip_numpy(np.random.default_rng(s), x)
  else:
    import jax
    fn = jax.jit(pipeline_lib.random_crop_flip_jax)
    aug = lambda s: np.asarray(fn(jax.random.key(s), x))
  out = aug(0)
  assert out.shape == x.shape and out.dtype == x.dtype
  found = [_which_crop(o, x[0]) for o in out]
  assert all(len(h) == 1 for h in found)  # exactly one (offset, flip) explains each
  offsets = {h[0][:2] for h in found}
  flips = [h[0][2] for h in found]
  assert len(offsets) > 20 and 10 < sum(flips) < 54  # random, not stuck
  np.testing.assert_array_equal(aug(0), out)
  assert not np.array_equal(aug(1), out)


def _numbered_dataset(n=100):
  images = np.zeros((n, 32, 32, 3), np.uint8)
  images[:, 10:22, 10:22, 0] = (np.arange(n) % 250 + 1)[:, None, None]
  return images, (np.arange(n) % 10).astype(np.int32)


def test_train_pipeline_batches_and_determinism():
  images, labels = _numbered_dataset(100)
  pipe = pipeline_lib.TrainPipeline(images, labels, batch_size=16, seed=5, prefetch=2,
                                    process_index=0, process_count=1)
  assert pipe.steps_per_epoch == 6
  batches = list(pipe.epoch(0))
  assert len(batches) == 6
  for b in batches:
    assert b["image"].shape == (16, 32, 32, 3) and b["image"].dtype == np.float32
    assert b["label"].shape == (16,) and b["label"].dtype == np.int32
    assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0
    # The centre patch survives any crop: it identifies the row, so labels match.
    ids = np.round(b["image"][:, 16, 16, 0] * 255).astype(int) - 1
    np.testing.assert_array_equal(labels[ids], b["label"])
  ids = np.concatenate([np.round(b["image"][:, 16, 16, 0] * 255).astype(int) - 1
                        for b in batches])
  assert np.unique(ids).size == 96  # a permutation, remainder dropped
  again = list(pipeline_lib.TrainPipeline(images, labels, batch_size=16, seed=5, prefetch=0,
                                          process_index=0, process_count=1).epoch(0))
  for a, b in zip(batches, again):
    np.testing.assert_array_equal(a["image"], b["image"])
  other = next(iter(pipe.epoch(1)))
  assert not np.array_equal(other["image"], batches[0]["image"])


def test_train_pipeline_process_slices_form_the_global_batch():
  images, labels = _numbered_dataset(64)
  full = list(pipeline_lib.TrainPipeline(images, labels, batch_size=16, seed=1,
                                         process_index=0, process_count=1).epoch(2))
  parts = [list(pipeline_lib.TrainPipeline(images, labels, batch_size=16, seed=1,
                                           process_index=p, process_count=2).epoch(2))
           for p in range(2)]
  for s, b in enumerate(full):
    np.testing.assert_array_equal(
        np.concatenate([parts[0][s]["image"], parts[1][s]["image"]]), b["image"])
    assert parts[0][s]["label"].shape == (8,)
  with pytest.raises(ConfigError, match="divisible"):
    pipeline_lib.TrainPipeline(images, labels, batch_size=15, seed=0, process_count=2,
                               process_index=0)


def test_prefetch_stops_early_and_forwards_errors():
  images, labels = _numbered_dataset(64)
  pipe = pipeline_lib.TrainPipeline(images, labels, batch_size=4, seed=0, prefetch=1,
                                    process_index=0, process_count=1)
  it = pipe.epoch(0)
  next(it)
  it.close()  # must not hang on the blocked producer

  def bad():
    yield 1
    raise RuntimeError("boom")

  with pytest.raises(RuntimeError, match="boom"):
    list(pipeline_lib._prefetch(bad, 2))


def test_eval_batches_pad_and_mask():
  images, labels = _numbered_dataset(10)
  batches = list(pipeline_lib.eval_batches(images, labels, batch_size=4,
                                           process_index=0, process_count=1))
  assert len(batches) == 3
  np.testing.assert_array_equal(batches[-1]["mask"], [1, 1, 0, 0])
  got = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
  np.testing.assert_array_equal(got, labels)
  assert all(b["image"].shape == (4, 32, 32, 3) for b in batches)
