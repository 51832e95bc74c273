"""Launcher set-up: where the persistent compilation cache goes."""
import os
import subprocess
import sys
import textwrap

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
