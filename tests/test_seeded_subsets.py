"""Seeded per-class subsamples : the folder reader's max_per_class
with a seed, the shared test subset of train_longtail / eval_robust."""
import numpy as np
import pytest
from PIL import Image

from uatmc_jax.longtail.data import image_folder, longtail
from uatmc_jax.longtail.data.image_dataset import ImageDataset


@pytest.fixture
def numbered_folder(tmp_path):
  """Classes a (40 files), b (25), c (9); file k of class i is a 2x2 PNG of colour
  (i, k, 0), so each decoded image names its file."""
  root = tmp_path / "train"
  for i, (cls, n) in enumerate((("a", 40), ("b", 25), ("c", 9))):
    (root / cls).mkdir(parents=True)
    for k in range(n):
      Image.fromarray(np.full((2, 2, 3), (i, k, 0), np.uint8)).save(root / cls / f"{k:04d}.png")
  return root


def _file_numbers(ds, c):
  return ds.images[ds.labels == c][:, 0, 0, 1].astype(int).tolist()


def test_seeded_max_per_class_is_a_seeded_subsample_not_the_first_files(numbered_folder):
  first = image_folder.load_image_folder(numbered_folder, max_per_class=10, num_threads=1)
  assert _file_numbers(first, 0) == list(range(10))  # no seed: the first 10 by name
  picks = {}
  for seed in (0, 1):
    ds = image_folder.load_image_folder(numbered_folder, max_per_class=10, seed=seed,
                                        num_threads=1)
    np.testing.assert_array_equal(ds.class_counts(), [10, 10, 9])  # c has only 9
    picks[seed] = _file_numbers(ds, 0)
    assert picks[seed] == sorted(picks[seed]) and len(set(picks[seed])) == 10
    assert picks[seed] != list(range(10))          # the head class is not the first 10
    assert max(picks[seed]) >= 10
    assert _file_numbers(ds, 2) == list(range(9))  # a short class keeps all its files
    again = image_folder.load_image_folder(numbered_folder, max_per_class=10, seed=seed,
                                           num_threads=1)
    np.testing.assert_array_equal(again.images, ds.images)  # reproducible
  assert picks[0] != picks[1]  # and it depends on the seed
  # list_image_folder picks the same files.
  _, files = image_folder.list_image_folder(numbered_folder, max_per_class=10, seed=1)
  assert [int(f.stem) for f in files[0]] == picks[1]


def test_folder_subsample_equals_longtail_indices_on_the_full_folder(numbered_folder):
  """Reading k seeded files per class = reading all, then the seeded row subsample
  (what TFDS data get), so both data sources use one rule."""
  full = image_folder.load_image_folder(numbered_folder, num_threads=1)
  for seed in (0, 3):
    sub = image_folder.load_image_folder(numbered_folder, max_per_class=7, seed=seed,
                                         num_threads=1)
    ref = longtail.balanced_subset(full, 7, seed=seed)
    np.testing.assert_array_equal(sub.images, ref.images)
    np.testing.assert_array_equal(sub.labels, ref.labels)


def test_seeded_subsample_is_cached_per_seed(numbered_folder, tmp_path):
  cache = tmp_path / "cache"
  a = image_folder.load_image_folder(numbered_folder, max_per_class=5, seed=0, cache_dir=cache)
  b = image_folder.load_image_folder(numbered_folder, max_per_class=5, seed=1, cache_dir=cache)
  a2 = image_folder.load_image_folder(numbered_folder, max_per_class=5, seed=0, cache_dir=cache)
  assert len(list(cache.iterdir())) == 2
  np.testing.assert_array_equal(a.images, a2.images)
  assert not np.array_equal(a.images, b.images)


def test_balanced_subset_is_per_class_balanced_and_seeded():
  # Rows of class c carry their within-class position in the pixel value.
  labels = np.repeat(np.arange(4), [30, 20, 12, 3]).astype(np.int32)
  pos = np.concatenate([np.arange(n) for n in (30, 20, 12, 3)])
  images = np.broadcast_to(pos[:, None, None, None], (len(labels), 1, 1, 3)).astype(np.uint8)
  ds = ImageDataset(images, labels, ("w", "x", "y", "z"))
  s0 = longtail.balanced_subset(ds, 5)
  np.testing.assert_array_equal(s0.class_counts(), [5, 5, 5, 3])
  chosen = [s0.images[s0.labels == c][:, 0, 0, 0].tolist() for c in range(4)]
  assert chosen[0] != list(range(5)) and chosen[1] != list(range(5))  # not the first k
  assert chosen[3] == [0, 1, 2]
  s1 = longtail.balanced_subset(ds, 5, seed=1)
  assert not np.array_equal(s0.images, s1.images)
  np.testing.assert_array_equal(longtail.balanced_subset(ds, 5).images, s0.images)
  assert longtail.balanced_subset(ds, None) is ds


def test_eval_robust_reloads_the_training_runs_seeded_test_subset(numbered_folder):
  """evaluate.load_test_set draws the same images as train_longtail's folder test set."""
  from uatmc_jax.longtail.evaluation import evaluate
  root = numbered_folder.parent
  (root / "test").symlink_to(numbered_folder, target_is_directory=True)
  run = {"dataset": "folder", "data_dir": str(root), "class_names": ["a", "b", "c"],
         "n_test": 18}
  images, labels, names = evaluate.load_test_set(run, None)  # 18 // 3 = 6 per class
  expected = image_folder.load_image_folder(root / "test", max_per_class=6,
                                            seed=longtail.EVAL_SUBSET_SEED, num_threads=1)
  np.testing.assert_array_equal(labels, expected.labels)
  np.testing.assert_allclose(images, expected.images / 255., atol=1e-6)
  assert _file_numbers(expected, 0) != list(range(6))
