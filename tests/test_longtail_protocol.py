"""The long-tail protocol end to end (issues 12.10, 14.1, 14.3): presets by name, the
warm-up schedule, above-chance learning of the runlocal / CPU protocol, and the
TensorBoard scalars of a run read back with TensorBoard's reader."""
import json
import math

import numpy as np
import pytest
from PIL import Image

from uatmc_jax.longtail import experiment as lt_experiment
from experiments.configs import longtail as longtail_config
from uatmc_jax.core import metric_writer as tensorboard_writer
from uatmc_jax.core.errors import ConfigError
from uatmc_jax.longtail import train_config as ltc

GROUP_KEYS = ("overall", "balanced", "many", "medium", "few", "tail")


def test_paper_preset_is_b4_and_full_is_its_100_epoch_variant():
  paper = longtail_config.get_config("preset=paper")
  # METHODS.md B.4 "Paper settings"
  assert (paper.model, paper.epochs, paper.batch_size, paper.lr, paper.schedule,
          paper.weight_decay, paper.pgd_steps, paper.eval_pgd_steps) == (
              "resnet18", 200, 128, 0.1, "cosine", 5e-4, 10, 20)
  assert math.isclose(paper.pgd_step_size, 2 / 255) and paper.warmup_epochs == 0
  full = longtail_config.get_config("")  # the default preset
  assert full.preset == "full" and full.epochs == 100
  assert {k: v for k, v in full.items() if k not in ("epochs", "preset")} == {
      k: v for k, v in paper.items() if k not in ("epochs", "preset")}
  # explicit arguments beat the preset and runlocal
  cfg = longtail_config.get_config("preset=cpu_small,epochs=3,batch_size=16")
  assert (cfg.model, cfg.epochs, cfg.batch_size) == ("small_cnn", 3, 16)
  cfg = longtail_config.get_config("runlocal=True,model=resnet18")
  assert cfg.model == "resnet18" and cfg.model_kwargs.to_dict() == {}  # no small-CNN widths
  with pytest.raises(ConfigError, match="preset"):
    longtail_config.get_config("preset=gpu_huge")


def test_warmup_then_cosine_schedule_closed_form():
  cfg = ltc.LongTailTrainConfig(num_epochs=5, learning_rate=0.2, warmup_epochs=1.5)
  spe = 10
  sched = ltc.learning_rate_schedule(cfg, spe)
  warm, total = 15, 50
  for t in (0, 7, 15, 20, 33, 49, 50):
    expected = (0.2 * t / warm if t < warm else
                0.1 * (1 + math.cos(math.pi * (t - warm) / (total - warm))))
    assert math.isclose(float(sched(t)), expected, rel_tol=1e-5, abs_tol=1e-7), t
  with pytest.raises(ConfigError, match="warmup_epochs"):
    ltc.LongTailTrainConfig(num_epochs=2, warmup_epochs=2).validate()


def _planted_folder(root, train_counts, test_per_class, seed=0):
  """An image folder whose classes differ by a planted colour pattern (a class-specific
  colour on a class-specific half of the image) under strong pixel noise, so learning is
  needed but possible in a few hundred steps, also against an 8/255 adversary."""
  rng = np.random.default_rng(seed)
  c = len(train_counts)
  colours = rng.integers(40, 216, (c, 3))
  for split, counts in (("train", train_counts), ("test", [test_per_class] * c)):
    for k, n in enumerate(counts):
      d = root / split / f"class{k}"
      d.mkdir(parents=True)
      for i in range(n):
        img = rng.integers(0, 256, (32, 32, 3)).astype(np.float64)
        half = (slice(None, 16), slice(None)) if k % 2 else (slice(None), slice(None, 16))
        img[half] = 0.35 * img[half] + 0.65 * colours[k]
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(d / f"{i:04d}.png")
  return root


@pytest.mark.slow
def test_runlocal_learns_above_chance_and_writes_tensorboard_scalars(tmp_path):
  root = _planted_folder(tmp_path / "data", train_counts=[64, 41, 26, 16], test_per_class=16)
  cfg = longtail_config.get_config(
      f"runlocal=True,dataset=folder,data_dir={root},imbalance_ratio=4,n_max=64,"
      "widths=8+16,method=pgd_at,epochs=4,batch_size=16,monitor_every=2,mesh_data=1,"
      # monitor = the whole (16 per class) test set, so both evaluations share one compile
      "monitor_per_class=16,monitor_pgd_steps=5,eval_pgd_steps=5")
  workdir = str(tmp_path / "run")
  res = lt_experiment.train_and_evaluate(cfg, workdir)
  chance = 1 / 4
  assert res["clean"]["balanced"] > chance + 0.3, res["clean"]
  assert res["pgd5"]["balanced"] > chance + 0.1, res["pgd5"]
  scalars = tensorboard_writer.read_scalars(workdir)
  assert "train_adv/many" not in scalars  # no class has > 100 images: empty group
  steps_per_epoch = res["n_train"] // 16
  epoch_ends = [steps_per_epoch * (e + 1) for e in range(4)]
  for tag in ("train/loss", "train/adv_train_acc", "train/learning_rate",
              "train/images_per_second", "train_adv/balanced", "train_adv/medium",
              "train_adv/tail"):
    assert [s for s, _ in scalars[tag]] == epoch_ends, tag
  # the epoch loss is the mean of that epoch's step losses: the last one is in results
  assert math.isclose(scalars["train/loss"][-1][1], res["last_epoch_metrics"]["loss"],
                      rel_tol=1e-5)
  assert [s for s, _ in scalars["monitor/clean/balanced"]] == epoch_ends[1::2]
  assert [s for s, _ in scalars["monitor/pgd5/tail"]] == epoch_ends[1::2]
  # the final test evaluation is logged with the same numbers as results.json
  with open(f"{workdir}/results.json") as f:
    on_disk = json.load(f)
  for block in ("clean", "pgd5"):
    for k in GROUP_KEYS:
      if on_disk[block][k] is not None:
        ((step, value),) = scalars[f"test/{block}/{k}"]
        assert step == epoch_ends[-1] and math.isclose(value, on_disk[block][k], rel_tol=1e-6)
  # the per-epoch mechanism diagnostics (on by default) are in results.json and TensorBoard
  assert [e["epoch"] for e in on_disk["diagnostics"]] == [0, 1, 2, 3]
  assert on_disk["diagnostics"][-1]["inner_source"] == "monitor batch"
  assert [s for s, _ in scalars["diag/geometry/nc1"]] == epoch_ends
  assert math.isclose(scalars["diag/inner/ce"][-1][1], on_disk["diagnostics"][-1]["inner"]["ce"],
                      rel_tol=1e-6)
  off = longtail_config.get_config("runlocal=True,diagnostics=False")
  assert off.diagnostics is False and longtail_config.get_config("").diagnostics is True
  with pytest.raises(ConfigError, match="diagnostics_in_step"):
    longtail_config.get_config("diagnostics_in_step=maybe")


def test_scalar_writer_round_trip_and_skips_non_finite(tmp_path):
  with tensorboard_writer.ScalarWriter(str(tmp_path)) as w:
    w.write(3, {"a/b": 0.5, "skip": float("nan"), "none": None})
    w.write(7, {"a/b": 1.25})
  assert tensorboard_writer.read_scalars(str(tmp_path)) == {"a/b": [(3, 0.5), (7, 1.25)]}
  quiet = tensorboard_writer.ScalarWriter(str(tmp_path / "off"), enabled=False)
  quiet.write(1, {"x": 1.0})
  quiet.close()
  assert not (tmp_path / "off").exists()


@pytest.mark.slow
def test_runlocal_learns_above_chance_on_real_cifar_images(shared_data, tmp_path):
  """A few hundred real CIFAR-10 images (4 classes, long-tailed 96/60/38/24, 25 test per
  class) through the runlocal protocol: clean balanced accuracy clearly above chance."""
  import shutil
  src = shared_data / "cifar10"
  classes = ("airplane", "automobile", "frog", "ship")
  for split, counts in (("train", (96, 60, 38, 24)), ("test", (25,) * 4)):
    for name, n in zip(classes, counts):
      files = sorted((src / split / name).iterdir())[:n]
      dst = tmp_path / "data" / split / name
      dst.mkdir(parents=True)
      for f in files:
        shutil.copy(f, dst / f.name)
  cfg = longtail_config.get_config(
      f"runlocal=True,dataset=folder,data_dir={tmp_path / 'data'},imbalance_ratio=4,"
      "n_max=96,method=pgd_at,batch_size=16,epochs=8,eval_pgd_steps=5,mesh_data=1")
  res = lt_experiment.train_and_evaluate(cfg, str(tmp_path / "run"))
  assert res["class_counts"] == [96, 60, 38, 24]
  assert res["clean"]["balanced"] > 0.25 + 0.15, res["clean"]
  assert res["pgd5"]["balanced"] > 0.25 + 0.05, res["pgd5"]
