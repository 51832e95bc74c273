"""Test modules leave JAX's global configuration as they found it: a module that set a
global option at import would change every test collected after it in the process."""
import importlib
import pathlib

import jax


def test_importing_every_test_module_keeps_the_default_matmul_precision():
  before = jax.config.jax_default_matmul_precision
  for path in sorted(pathlib.Path(__file__).parent.glob("test_*.py")):
    importlib.import_module(path.stem)
    assert jax.config.jax_default_matmul_precision == before, path.name
