"""Kill and resume from outside, as a user meets it (core/checkpointing.py).

A training launcher killed with SIGKILL after at least one epoch checkpoint and started
again with the same command finishes with the metrics of an uninterrupted run; a
corrupt checkpoint, or one of another config, is refused with one ConfigError line
(exit 2) naming the checkpoint directory and what differs.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "JAX_COORDINATOR_ADDRESS",
               "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
    env.pop(name, None)
  return env


def _cmd(module, config, workdir):
  return [sys.executable, "-m", module, f"--config={config}", f"--workdir={workdir}",
          "--compilation_cache_dir="]


def _run(module, config, workdir):
  return subprocess.run(_cmd(module, config, workdir), env=_env(), cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def _epoch_checkpoints(workdir):
  d = os.path.join(workdir, "checkpoints", "latest")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _kill_after_first_checkpoint(module, config, workdir):
  """Starts the launcher, SIGKILLs it once an epoch checkpoint is complete."""
  proc = subprocess.Popen(_cmd(module, config, workdir), env=_env(), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  try:
    while not _epoch_checkpoints(workdir):
      assert proc.poll() is None, proc.stderr.read()[-3000:]
      assert time.time() < deadline, "no checkpoint within 240 s"
      time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == -signal.SIGKILL
  # really interrupted mid-training: no results yet, and not every epoch checkpointed
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  return _epoch_checkpoints(workdir)


def _numeric_leaves(tree, prefix=""):
  out = {}
  if isinstance(tree, dict):
    for k, v in tree.items():
      out.update(_numeric_leaves(v, f"{prefix}/{k}"))
  elif isinstance(tree, list):
    for i, v in enumerate(tree):
      out.update(_numeric_leaves(v, f"{prefix}[{i}]"))
  elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
    out[prefix] = float(tree)
  return out


def _assert_same_metrics(a, b, keys):
  for key in keys:
    la, lb = _numeric_leaves(a[key], key), _numeric_leaves(b[key], key)
    la = {k: v for k, v in la.items() if "seconds" not in k}
    lb = {k: v for k, v in lb.items() if "seconds" not in k}
    assert la.keys() == lb.keys() and la, key
    for k in la:
      np.testing.assert_allclose(la[k], lb[k], rtol=1e-5, atol=1e-5, err_msg=k)


# --- long-tail image classifier ----------------------------------------------------------
def _tiny_image_folder(root, n_train=16, n_test=4, classes=("ant", "bee", "cat")):
  from PIL import Image
  rng = np.random.default_rng(0)
  for split, n in (("train", n_train), ("test", n_test)):
    for c, name in enumerate(classes):
      d = root / split / name
      d.mkdir(parents=True)
      for i in range(n):
        img = rng.integers(0, 60, (8, 8, 3)).astype(np.uint8)
        img[..., c] += 150  # a learnable colour cue per class
        Image.fromarray(img).save(d / f"{i:03d}.png")
  return root


def _longtail_config(data_dir, **over):
  args = dict(preset="cpu_small", dataset="folder", data_dir=str(data_dir), model="small_cnn",
              widths="4+8", imbalance_ratio=2, n_max=16, epochs=10, batch_size=8,
              pgd_steps=1, eval_pgd_steps=2, test_per_class=4, monitor_every=0,
              method="pgd_at", warmup_epochs=0, mesh_data=1)
  args.update(over)
  return "experiments/configs/longtail.py:" + ",".join(f"{k}={v}" for k, v in args.items())


@pytest.fixture(scope="module")
def longtail_runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("lt")
  data = _tiny_image_folder(root / "data")
  config = _longtail_config(data)
  plain = _run("experiments.train_longtail", config, root / "plain")
  assert plain.returncode == 0, plain.stderr[-3000:]
  return root, data, config


def test_longtail_sigkill_then_same_command_equals_uninterrupted(longtail_runs):
  root, data, config = longtail_runs
  workdir = root / "killed"
  done = _kill_after_first_checkpoint("experiments.train_longtail", config, workdir)
  assert done and max(done) < 9
  resumed = _run("experiments.train_longtail", config, workdir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  a = json.loads((root / "plain" / "results.json").read_text())
  b = json.loads((workdir / "results.json").read_text())
  _assert_same_metrics(a, b, ["clean", "pgd2", "last_epoch_metrics"])


def test_longtail_refuses_checkpoint_of_another_width(longtail_runs):
  root, data, _ = longtail_runs
  other = _run("experiments.train_longtail", _longtail_config(data, widths="4+16"),
               root / "plain")
  assert other.returncode == 2, other.stderr[-3000:]
  assert "ConfigError" in other.stderr or "checkpoint" in other.stderr
  line = [s for s in other.stderr.splitlines() if "checkpoints" in s and "latest" in s]
  assert line, other.stderr[-3000:]
  assert "model_kwargs" in line[-1] and "widths" in line[-1]
  assert "Traceback" not in other.stderr
  # trainer_config.json still describes the checkpoints (was not overwritten)
  info = json.loads((root / "plain" / "trainer_config.json").read_text())
  assert list(info["model_kwargs"]["widths"]) == [4, 8]


def test_longtail_refuses_a_corrupt_checkpoint(longtail_runs, tmp_path):
  import shutil
  root, data, config = longtail_runs
  workdir = tmp_path / "w"
  shutil.copytree(root / "plain", workdir)
  os.remove(workdir / "results.json")
  step = max(_epoch_checkpoints(workdir))
  state_dir = workdir / "checkpoints" / "latest" / str(step) / "state"
  files = sorted(p for p in state_dir.rglob("*") if p.is_file() and p.parent.name == "d")
  assert files
  with open(files[0], "r+b") as f:
    f.truncate(max(1, os.path.getsize(files[0]) // 2))
  out = _run("experiments.train_longtail", config, workdir)
  assert out.returncode == 2, out.stderr[-3000:]
  assert f"latest/{step}" in out.stderr and "corrupt or truncated" in out.stderr
  assert "Traceback" not in out.stderr
  assert not (workdir / "results.json").exists()


# --- recommender -------------------------------------------------------------------------
_RECSYS = "experiments/configs/recsys.py:model=vbpr,dataset=synthetic,epochs=8,embedding_dim=8"


def test_recsys_sigkill_then_same_command_equals_uninterrupted(tmp_path):
  plain = _run("experiments.train_recsys", _RECSYS, tmp_path / "plain")
  assert plain.returncode == 0, plain.stderr[-3000:]
  workdir = tmp_path / "killed"
  done = _kill_after_first_checkpoint("experiments.train_recsys", _RECSYS, workdir)
  assert done and max(done) < 7
  resumed = _run("experiments.train_recsys", _RECSYS, workdir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  a = json.loads((tmp_path / "plain" / "results.json").read_text())
  b = json.loads((workdir / "results.json").read_text())
  _assert_same_metrics(a, b, ["valid", "test"])
  assert a["best_epoch"] == b["best_epoch"] and a["epochs_run"] == b["epochs_run"]
  # Another embedding size on these checkpoints: refused, naming the directory and the
  # arrays whose shapes differ (a shape check in CheckpointStore).
  other = _run("experiments.train_recsys", _RECSYS.replace("embedding_dim=8", "embedding_dim=4"),
               workdir)
  assert other.returncode == 2, other.stderr[-3000:]
  line = [s for s in other.stderr.splitlines() if "checkpoints" in s]
  assert line and "does not fit" in line[-1] and "stored" in line[-1], other.stderr[-3000:]
  assert "Traceback" not in other.stderr
