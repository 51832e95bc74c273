"""Launcher set-up: compilation cache, bad-config exits, terminal output, pod starts."""
import os
import re
import subprocess
import sys
import textwrap

import pytest

from experiments import launch


def test_compilation_cache_dir_flag_env_default(monkeypatch):
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/from/env")
  assert launch.compilation_cache_dir("~/mine") == os.path.expanduser("~/mine")
  assert launch.compilation_cache_dir("") == ""  # the flag turns it off
  assert launch.compilation_cache_dir(None) == "/from/env"
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "")
  assert launch.compilation_cache_dir(None) == ""  # the environment turns it off
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
  monkeypatch.setenv("HOME", "/home/someone")
  assert launch.compilation_cache_dir(None) == "/home/someone/.cache/uatmc_jax/xla"


def test_setup_writes_and_reuses_the_cache(tmp_path):
  """A launcher's slow compile lands in the cache and a second process reads it back."""
  script = textwrap.dedent("""
      import sys, jax, jax.numpy as jnp
      from absl import flags
      from experiments import launch
      flags.FLAGS(sys.argv)
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
      launch.setup()
      f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
      print(float(f(jnp.ones((8, 8)))))
      """)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  cache = tmp_path / "xla"
  cmd = [sys.executable, "-c", script, f"--compilation_cache_dir={cache}"]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  first = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, check=True)
  entries = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
  assert any(name.startswith("jit_") for name in entries), entries
  second = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, check=True)
  assert first.stdout == second.stdout
  # A hit is read, not rewritten: same entries, untouched.
  assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == entries
  off = subprocess.run(cmd[:-1] + ["--compilation_cache_dir="], env=env, cwd=root,
                       capture_output=True, text=True, check=True)
  assert off.stdout == first.stdout


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_launcher(module, config, tmp_path, env_extra=None, extra=()):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "JAX_COORDINATOR_ADDRESS",
               "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
    env.pop(name, None)
  env.update(env_extra or {})
  cmd = [sys.executable, "-m", module, f"--config={config}", f"--workdir={tmp_path}/w",
         "--compilation_cache_dir=", *extra]
  return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("module,config,key,expect", [
    ("experiments.uatmc", "experiments/configs/uatmc.py:bogus=1", "bogus", "expected one of"),
    ("experiments.uatmc", "experiments/configs/uatmc.py:epochs=abc", "epochs",
     "expected an integer"),
    # lr has no typed default (None): the config file's own float() fails, still one line
    ("experiments.uatmc", "experiments/configs/uatmc.py:lr=fast", "lr='fast'",
     "could not convert string to float"),
    ("experiments.train_longtail", "experiments/configs/longtail.py:bogus=1", "bogus",
     "expected one of"),
    ("experiments.train_longtail", "experiments/configs/longtail.py:batch_size=abc",
     "batch_size", "expected an integer"),
    ("experiments.train_recsys", "experiments/configs/recsys.py:runlocal=maybe", "runlocal",
     "expected True or False"),
])
def test_bad_config_key_exits_2_with_one_line(tmp_path, module, config, key, expect):
  out = run_launcher(module, config, tmp_path)
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert out.returncode == 2, out.stderr
  assert len(lines) == 1, out.stderr
  assert lines[0].startswith("error: ") and key in lines[0] and expect in lines[0], lines
  assert "Traceback" not in out.stderr
  if "expected one of" in expect:
    assert "'epochs'" in lines[0] or "'batch_size'" in lines[0]  # the valid keys are listed


def test_config_values_are_type_checked_against_their_defaults():
  from experiments.configs import common
  from uatmc_jax.core.errors import ConfigError
  assert common.parse_arg("n=3,x=0.5,f=True", n=1, x=1.0, f=False) == dict(n=3, x=0.5, f=True)
  assert common.parse_arg("n=1+2+3,x=1;2.5", n=1, x=1.0)["n"] == "1+2+3"  # typed lists
  assert common.parse_arg("x=2", x=1.0)["x"] == 2  # an int is a number
  with pytest.raises(ConfigError, match=r"n='1.5': expected an integer"):
    common.parse_arg("n=1.5", n=1)
  with pytest.raises(ConfigError, match=r"x='fast': expected a number"):
    common.parse_arg("x=fast", x=1.0)
  with pytest.raises(ConfigError, match=r"n='1\+b': expected an integer"):
    common.parse_arg("n=1+b", n=1)
  assert common.parse_arg("s=12,t=anything", s="a", t=None) == dict(s=12, t="anything")


def test_default_verbosity_keeps_library_info_off_stderr(tmp_path):
  """A training launch prints only the project's lines: progress lines on stderr, no
  absl/JAX/orbax INFO lines (``I<date> ...``); ``--verbosity=0`` brings them back."""
  config = "experiments/configs/recsys.py:model=vbpr,dataset=synthetic,epochs=1,embedding_dim=8"
  out = run_launcher("experiments.train_recsys", config, tmp_path)
  assert out.returncode == 0, out.stderr
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  project = re.compile(r"^(\[synthetic/VBPR\] epoch|W\d{4} .* train_job\.py:\d+\] vbpr on "
                       r"synthetic is BELOW THE MOST-POPULAR)")
  assert lines and all(project.match(l) for l in lines), lines
  assert "recall@20" in out.stdout
  loud = run_launcher("experiments.train_recsys", config, tmp_path / "v", extra=["--verbosity=0"])
  assert loud.returncode == 0 and re.search(r"^I\d{4} ", loud.stderr, re.M), loud.stderr


def test_remote_workdir_is_kept_as_given():
  assert launch.workdir_path("gs://bucket/run") == "gs://bucket/run"
  assert launch.workdir_path("s3://b/r/x") == "s3://b/r/x"
  assert launch.workdir_path("~/runs/a") == os.path.expanduser("~/runs/a")
  assert launch.is_remote_path("gs://b") and not launch.is_remote_path("runs/gs:/b")


def test_multiprocess_environment_is_detected():
  detect = launch.detect_multiprocess_env
  assert detect({}) is None
  assert detect({"SLURM_NTASKS": "1", "OMPI_COMM_WORLD_SIZE": "1"}) is None
  assert detect({"SLURM_NTASKS": "4"}) == "SLURM_NTASKS=4"
  assert detect({"OMPI_COMM_WORLD_SIZE": "2"}) == "OMPI_COMM_WORLD_SIZE=2"
  assert detect({"TPU_WORKER_HOSTNAMES": "a,b"}) == "TPU_WORKER_HOSTNAMES=a,b"
  assert detect({"TPU_WORKER_HOSTNAMES": "a"}) is None
  assert detect({"JAX_COORDINATOR_ADDRESS": "h:1234"}) == "JAX_COORDINATOR_ADDRESS=h:1234"


def test_pod_launch_without_flags_refuses_instead_of_running_copies(tmp_path):
  """SLURM_NTASKS=2 without a cluster JAX can join: exit 2, one line naming the variable
  and the flags (not two independent runs writing one workdir)."""
  config = "experiments/configs/recsys.py:model=vbpr,dataset=synthetic,epochs=1"
  out = run_launcher("experiments.train_recsys", config, tmp_path,
                     env_extra={"SLURM_NTASKS": "2"})
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert out.returncode == 2, out.stderr
  assert len(lines) == 1 and "SLURM_NTASKS=2" in lines[0], lines
  assert "--coordinator_address" in lines[0]
  assert not os.path.exists(tmp_path / "w" / "results.json")


def test_results_json_to_a_remote_workdir_goes_through_epath(tmp_path, monkeypatch):
  """write_json/read_json keep gs://... as given (no local 'gs:' folder from abspath)."""
  from etils import epath
  from uatmc_jax.core import reporting
  store = {}

  class FakePath:
    def __init__(self, p):
      self.p = str(p)

    @property
    def parent(self):
      return FakePath(self.p.rsplit("/", 1)[0])

    def mkdir(self, parents=False, exist_ok=False):
      store.setdefault("dirs", []).append(self.p)

    def write_text(self, text):
      store[self.p] = text

    def read_text(self):
      return store[self.p]

  monkeypatch.setattr(epath, "Path", FakePath)
  monkeypatch.chdir(tmp_path)
  reporting.write_json("gs://bucket/run/results.json", {"recall@20": 0.5})
  assert "gs://bucket/run/results.json" in store and store["dirs"] == ["gs://bucket/run"]
  assert reporting.read_json("gs://bucket/run/results.json") == {"recall@20": 0.5}
  assert not any(tmp_path.iterdir())  # nothing written locally
