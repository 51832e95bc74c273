"""MMRec-layout reader (uatmc_jax.recsys.data.mmrec) and synthetic generator (…data.synthetic)."""
import pathlib
import re

import numpy as np
import pytest

from uatmc_jax.core.errors import ConfigError, DataFormatError
from uatmc_jax.recsys.data import mmrec
from uatmc_jax.recsys.data import synthetic

HEADER = "userID\titemID\trating\ttimestamp\tx_label"
# 3 users x 4 items; every split non-empty.
GOOD_ROWS = [(0, 0, 0), (0, 1, 0), (0, 2, 1), (0, 3, 2),
             (1, 1, 0), (1, 2, 0), (1, 0, 2),
             (2, 3, 0), (2, 0, 1), (2, 1, 2)]


def write_folder(folder: pathlib.Path, rows=GOOD_ROWS, name="toy", header=HEADER,
                 features=None, lines=None, user_groups=None) -> pathlib.Path:
  """A tiny MMRec folder; ``lines`` (raw body lines) overrides ``rows``."""
  folder.mkdir(parents=True, exist_ok=True)
  if lines is None:
    lines = [f"{u}\t{i}\t1\t0\t{x}" for u, i, x in rows]
  (folder / f"{name}.inter").write_text("\n".join([header, *lines]) + "\n")
  if features is None:
    rng = np.random.default_rng(0)
    features = {"image": rng.standard_normal((4, 6)).astype(np.float16),
                "text": rng.standard_normal((4, 3)).astype(np.float32)}
  for m, f in features.items():
    np.save(folder / f"{m}_feat.npy", f)
  if user_groups is not None:
    np.save(folder / "user_groups.npy", user_groups)
  return folder


def assert_error(folder, pattern, **kwargs):
  with pytest.raises(DataFormatError) as info:
    mmrec.load_mmrec(folder, **kwargs)
  assert re.search(pattern, str(info.value)), str(info.value)
  return str(info.value)


# ---------------------------------------------------------------- happy paths


def test_loads_tiny_folder(tmp_path):
  folder = write_folder(tmp_path / "toy", user_groups=np.array([0, 1, 0]))
  data = mmrec.load_mmrec(folder)
  assert (data.name, data.n_users, data.n_items) == ("toy", 3, 4)
  np.testing.assert_array_equal(data.train, [[0, 0], [0, 1], [1, 1], [1, 2], [2, 3]])
  np.testing.assert_array_equal(data.valid, [[0, 2], [2, 0]])
  np.testing.assert_array_equal(data.test, [[0, 3], [1, 0], [2, 1]])
  assert data.train.dtype == np.int32 and data.train.shape == (5, 2)
  assert data.modalities == ("image", "text")
  assert all(f.dtype == np.float32 for f in data.features.values())
  np.testing.assert_array_equal(
      data.features["image"], np.load(folder / "image_feat.npy").astype(np.float32))
  np.testing.assert_array_equal(data.user_groups, [0, 1, 0])


def test_modalities_sorted_and_selectable(tmp_path):
  rng = np.random.default_rng(1)
  feats = {"text": rng.standard_normal((4, 2)).astype(np.float32),
           "audio": rng.standard_normal((4, 5)).astype(np.float32),
           "image": rng.standard_normal((4, 3)).astype(np.float32)}
  folder = write_folder(tmp_path / "toy", features=feats)
  assert mmrec.load_mmrec(folder).modalities == ("audio", "image", "text")
  assert mmrec.load_mmrec(folder, modalities=["text", "audio"]).modalities == ("audio", "text")
  with pytest.raises(ConfigError, match="video"):
    mmrec.load_mmrec(folder, modalities=["video"])


def test_tolerates_crlf_bom_and_float_x_label(tmp_path):
  # "0.0" labels take the general token parser instead of the plain-digit fast path;
  # both must give the same dataset.
  plain = mmrec.load_mmrec(write_folder(tmp_path / "plain"))
  folder = write_folder(tmp_path / "toy")
  text = (folder / "toy.inter").read_text().replace("\t0\n", "\t0.0\n")
  (folder / "toy.inter").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
  data = mmrec.load_mmrec(folder)
  for split in ("train", "valid", "test"):
    np.testing.assert_array_equal(getattr(data, split), getattr(plain, split))


def test_interactions_only_folder_and_random_features(tmp_path):
  folder = write_folder(tmp_path / "toy", features={})
  data = mmrec.load_mmrec(folder)
  assert data.features == {} and data.n_items == 4
  data = mmrec.load_mmrec(folder, random_features={"text": 3, "image": 7}, seed=5)
  assert data.modalities == ("image", "text")
  assert data.features["image"].shape == (4, 7) and data.features["image"].dtype == np.float32
  again = mmrec.load_mmrec(folder, random_features={"text": 3, "image": 7}, seed=5)
  np.testing.assert_array_equal(data.features["text"], again.features["text"])
  with pytest.raises(ConfigError, match="clash"):
    mmrec.load_mmrec(write_folder(tmp_path / "feat"), random_features={"image": 2})


def test_load_dataset_dispatch(tmp_path):
  folder = write_folder(tmp_path / "toy")
  assert mmrec.load_dataset(str(folder)).n_items == 4
  small = mmrec.load_dataset("synthetic", n_users=60, n_items=40, seed=1)
  assert (small.n_users, small.n_items) == (60, 40)
  with pytest.raises(ConfigError, match=r"'no_such'.*synthetic"):
    mmrec.load_dataset("no_such")


# ---------------------------------------------------------------- errors


def test_missing_folder_and_files(tmp_path):
  assert_error(tmp_path / "absent", "dataset folder not found")
  (tmp_path / "empty").mkdir()
  assert_error(tmp_path / "empty", r"exactly one <name>\.inter.*none")
  folder = write_folder(tmp_path / "two")
  write_folder(folder, name="other")
  assert_error(folder, r"exactly one.*other\.inter.*toy\.inter")
  assert_error(folder, r"nope\.inter: interaction file not found", name="nope")
  assert mmrec.load_mmrec(folder, name="other").name == "other"


def test_wrong_header(tmp_path):
  folder = write_folder(tmp_path / "toy", header="user\titem\trating\ttimestamp\tx_label")
  assert_error(folder, r"toy\.inter: line 1: header must be .*userID.*got \('user'")


def test_wrong_column_count(tmp_path):
  lines = [f"{u}\t{i}\t1\t0\t{x}" for u, i, x in GOOD_ROWS]
  lines[3] = "0\t3\t1\t2"  # file line 5
  assert_error(write_folder(tmp_path / "a", lines=lines),
               r"toy\.inter: line 5: expected 5 tab-separated columns.*found 4")
  lines[3] = ""  # a blank line inside the file
  assert_error(write_folder(tmp_path / "b", lines=lines), r"line 5: .*found 1")


@pytest.mark.parametrize("bad, pattern", [
    ("0\tx7\t1\t0\t0", r"line 4: column 'itemID' must be an integer, got 'x7'"),
    ("0.5\t1\t1\t0\t0", r"line 4: column 'userID' must be an integer, got '0.5'"),
    ("-1\t1\t1\t0\t0", r"line 4: userID must be a non-negative integer.*got -1"),
    ("0\t-2\t1\t0\t0", r"line 4: itemID must be a non-negative.*got -2"),
    ("0\t1\t1\t0\t3", r"line 4: x_label must be 0, 1 or 2.*got '3'"),
    ("0\t1\t1\t0\tvalid", r"line 4: column 'x_label' must be a number, got 'valid'"),
    ("0\t9\t1\t0\t0", r"line 4: itemID 9 is outside the feature rows.*4 rows"),
])
def test_bad_field_values(tmp_path, bad, pattern):
  lines = [f"{u}\t{i}\t1\t0\t{x}" for u, i, x in GOOD_ROWS]
  lines[2] = bad  # file line 4
  assert_error(write_folder(tmp_path / "toy", lines=lines), r"toy\.inter: " + pattern)


def test_duplicate_pair_names_both_lines(tmp_path):
  rows = GOOD_ROWS + [(1, 2, 2)]  # (1, 2) is also row 6 -> file line 7
  assert_error(write_folder(tmp_path / "toy", rows=rows),
               r"duplicate \(userID, itemID\) pair \(1, 2\) on lines 7 and 12")


@pytest.mark.parametrize("label, split", [(0, "train"), (1, "valid"), (2, "test")])
def test_empty_split(tmp_path, label, split):
  rows = [(u, i, x) for u, i, x in GOOD_ROWS if x != label]
  assert_error(write_folder(tmp_path / "toy", rows=rows),
               rf"the {split} split \(x_label={label}\) has no users")


def test_bad_features(tmp_path):
  good = np.ones((4, 3), np.float32)
  nan = good.copy()
  nan[2, 1] = np.nan
  assert_error(write_folder(tmp_path / "nan", features={"image": nan, "text": good}),
               r"image_feat\.npy: feature array has NaN/inf.*first bad row \(item id\) 2")
  inf = good.astype(np.float16)
  inf[3, 0] = np.inf
  assert_error(write_folder(tmp_path / "inf", features={"audio": inf}),
               r"audio_feat\.npy: .*NaN/inf.*row \(item id\) 3")
  assert_error(write_folder(tmp_path / "rows",
                            features={"image": good, "text": np.ones((5, 2), np.float32)}),
               r"different row counts \{'image': 4, 'text': 5\}")
  assert_error(write_folder(tmp_path / "dims", features={"image": np.ones(4, np.float32)}),
               r"image_feat\.npy: feature array must be 2-D.*\(4,\)")
  assert_error(write_folder(tmp_path / "ints", features={"image": np.ones((4, 2), np.int64)}),
               r"image_feat\.npy: .*floating point.*int64")
  folder = write_folder(tmp_path / "junk")
  (folder / "text_feat.npy").write_bytes(b"not numpy")
  assert_error(folder, r"text_feat\.npy: not a readable \.npy")


def test_user_groups_wrong_length(tmp_path):
  assert_error(write_folder(tmp_path / "a", user_groups=np.array([0, 1])),
               r"user_groups\.npy: expected one group id per user, shape \(3,\), got \(2,\)")
  assert_error(write_folder(tmp_path / "b", user_groups=np.array([0.0, 1.0, 0.0])),
               r"user_groups\.npy: group ids must be non-negative integers")


def test_only_user_groups_npy_is_read_and_other_npy_warn(tmp_path):
  """groups.npy is not the documented name: it is ignored, loudly, and the attack
  outputs then say "k-means"; user_groups.npy is read and its path reported."""
  folder = write_folder(tmp_path / "g")
  np.save(folder / "groups.npy", np.array([0, 1, 0]))
  with pytest.warns(UserWarning, match=r"groups\.npy.*user_groups\.npy"):
    data = mmrec.load_mmrec(folder)
  assert data.user_groups is None and data.user_groups_source is None
  from uatmc_jax.recsys.attacks import user_groups
  assert user_groups.grouping_description(data, False, 4) == "k-means k=4 on anchor user vectors"
  good = write_folder(tmp_path / "u", user_groups=np.array([0, 1, 0]))
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # nothing to warn about
    data = mmrec.load_mmrec(good)
  assert data.user_groups_source == str(good / "user_groups.npy")
  assert user_groups.grouping_description(data, True, 4) == (
      f"planted from {good / 'user_groups.npy'}")


# ---------------------------------------------------------------- real data


def test_tiktok_counts(shared_data):
  data = mmrec.load_mmrec(shared_data / "tiktok")
  assert (data.name, data.n_users, data.n_items) == ("tiktok", 9308, 6710)
  assert (len(data.train), len(data.valid), len(data.test)) == (59541, 3051, 6130)
  assert data.modalities == ("audio", "image")
  for f in data.features.values():
    assert f.shape == (6710, 128) and f.dtype == np.float32
  assert data.user_groups is None


def test_fast_and_general_parsers_agree_on_tiktok(shared_data, monkeypatch):
  path = shared_data / "tiktok" / "tiktok.inter"
  fast = mmrec.read_inter_file(path)
  monkeypatch.setattr(mmrec, "_parse_plain_digit_columns", lambda *args: None)
  general = mmrec.read_inter_file(path)
  for a, b in zip(fast, general):
    np.testing.assert_array_equal(a, b)


def test_baby_interactions_with_random_features(shared_data):
  data = mmrec.load_mmrec(shared_data / "baby", random_features={"image": 8, "text": 4})
  assert (data.n_users, data.n_items) == (19445, 7050)
  assert (len(data.train), len(data.valid), len(data.test)) == (118551, 21682, 20559)
  assert data.features["image"].shape == (7050, 8)


# ---------------------------------------------------------------- synthetic

SMALL = dict(n_users=300, n_items=200, mean_interactions=12.0)


@pytest.fixture(scope="module")
def default_synthetic():
  return synthetic.make_synthetic(seed=0)


def test_synthetic_round_trip(tmp_path):
  config = synthetic.SyntheticConfig(seed=4, **SMALL)
  folder = synthetic.write_synthetic(tmp_path / "syn", config)
  assert sorted(p.name for p in folder.iterdir()) == [
      "image_feat.npy", "synthetic.inter", "synthetic_config.json", "text_feat.npy",
      "user_groups.npy"]
  data = mmrec.load_mmrec(folder)
  assert (data.name, data.n_users, data.n_items) == ("synthetic", 300, 200)
  assert data.features["image"].shape == (200, 256) and data.features["text"].shape == (200, 64)
  np.testing.assert_array_equal(data.features["text"], np.load(folder / "text_feat.npy"))
  np.testing.assert_array_equal(data.user_groups, np.load(folder / "user_groups.npy"))
  assert np.bincount(data.user_groups).tolist() == [150, 150]
  # make_synthetic goes through the same files.
  again = synthetic.make_synthetic(config)
  for split in ("train", "valid", "test"):
    np.testing.assert_array_equal(getattr(data, split), getattr(again, split))


def test_synthetic_per_user_guarantees(default_synthetic):
  data = default_synthetic
  per_split = [np.bincount(s[:, 0], minlength=data.n_users)
               for s in (data.train, data.valid, data.test)]
  assert all(c.min() >= 1 for c in per_split)  # every user in every split
  assert sum(per_split).min() >= 5
  assert 35_000 <= sum(len(s) for s in (data.train, data.valid, data.test)) <= 45_000
  assert abs(len(data.train) / sum(c.sum() for c in per_split) - 0.8) < 0.03


def test_synthetic_deterministic_per_seed():
  a = synthetic.make_synthetic(seed=7, **SMALL)
  b = synthetic.make_synthetic(seed=7, **SMALL)
  c = synthetic.make_synthetic(seed=8, **SMALL)
  np.testing.assert_array_equal(a.train, b.train)
  np.testing.assert_array_equal(a.features["image"], b.features["image"])
  np.testing.assert_array_equal(a.user_groups, b.user_groups)
  assert len(a.train) != len(c.train) or not np.array_equal(a.train, c.train)
  assert not np.array_equal(a.features["image"], c.features["image"])


def test_synthetic_long_tail(default_synthetic):
  pop = np.bincount(np.concatenate([default_synthetic.train, default_synthetic.valid,
                                    default_synthetic.test])[:, 1],
                    minlength=default_synthetic.n_items)
  top = np.sort(pop)[::-1][:default_synthetic.n_items // 5]
  assert top.sum() / pop.sum() > 0.55
  # ... and a tail exists: the least popular half holds under 15%.
  assert np.sort(pop)[:default_synthetic.n_items // 2].sum() / pop.sum() < 0.15


def profile_auc(data, modality):
  """Per-group mean AUC of a model-free probe: a user's profile is the sum of its
  train positives' (centred, normalised) features in one modality; held-out positives
  are ranked against every item the user has not trained on."""
  f = data.features[modality] - data.features[modality].mean(0)
  f /= np.linalg.norm(f, axis=1, keepdims=True)
  train_matrix = np.zeros((data.n_users, data.n_items), np.float32)
  train_matrix[data.train[:, 0], data.train[:, 1]] = 1.0
  scores = (train_matrix @ f) @ f.T
  scores[data.train[:, 0], data.train[:, 1]] = np.nan
  held = np.concatenate([data.valid, data.test])
  user_scores = scores[held[:, 0]]
  auc = ((user_scores < scores[held[:, 0], held[:, 1]][:, None]).sum(1)
         / np.isfinite(user_scores).sum(1))
  groups = data.user_groups[held[:, 0]]
  return np.array([auc[groups == g].mean() for g in range(groups.max() + 1)])


def test_synthetic_planted_modality_groups(default_synthetic):
  image, text = profile_auc(default_synthetic, "image"), profile_auc(default_synthetic, "text")
  # Group 0 (A) reads image, group 1 (B) reads text: each group's positives are well
  # predicted from its own modality, and close to chance from the other.
  assert image[0] > 0.75 and text[1] > 0.75, (image, text)
  assert image[0] - text[0] > 0.2 and text[1] - image[1] > 0.2, (image, text)


def test_synthetic_config_errors():
  with pytest.raises(ConfigError, match="unknown synthetic dataset option.*'n_user'"):
    synthetic.make_synthetic(n_user=5)
  with pytest.raises(ConfigError, match="SyntheticConfig.min_interactions"):
    synthetic.make_synthetic(min_interactions=2)
  with pytest.raises(ConfigError, match="SyntheticConfig.modalities"):
    synthetic.make_synthetic(modalities=[("image", 4), ("image", 3)])
