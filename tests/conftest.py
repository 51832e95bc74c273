"""Test-wide setup: 8 fake CPU devices (before any JAX op) so sharding is testable."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile from scratch: launchers' persistent compilation cache (launch.setup) off.
os.environ["JAX_COMPILATION_CACHE_DIR"] = ""

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data():
  """Path of ../shared/data; skips (with the reason) when it is absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real data folder {SHARED_DATA} is absent (it sits beside the project root)")
  return SHARED_DATA
