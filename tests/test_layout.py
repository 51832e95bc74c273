"""The package's layering (docs/design.md, Layers): core <- recsys, core <- longtail.

Read from the source with ``ast`` (function-local imports included), so a lazy import
that crosses a layer is caught as well as a module-level one.
"""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "uatmc_jax"
FORBIDDEN = {
    "core": ("uatmc_jax.recsys", "uatmc_jax.longtail", "experiments"),
    "recsys": ("uatmc_jax.longtail", "experiments"),
    "longtail": ("uatmc_jax.recsys", "experiments"),
}


def imported_modules(path: pathlib.Path) -> set[str]:
  names = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names.add(node.module)
      names.update(f"{node.module}.{a.name}" for a in node.names)
  return names


def test_the_scanner_sees_lazy_imports(tmp_path):
  f = tmp_path / "m.py"
  f.write_text("def g():\n  from uatmc_jax.recsys import trainer\n  import experiments.launch\n")
  assert {"uatmc_jax.recsys.trainer", "experiments.launch"} <= imported_modules(f)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_only_downwards(layer):
  files = sorted((PACKAGE / layer).rglob("*.py"))
  assert files, f"no modules under uatmc_jax/{layer}"
  crossings = [(str(f.relative_to(PACKAGE)), name) for f in files
               for name in sorted(imported_modules(f))
               if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[layer])]
  assert not crossings, f"uatmc_jax/{layer} imports an upper or sibling layer: {crossings}"


def test_only_the_three_packages_at_the_top():
  top = sorted(p.name for p in PACKAGE.iterdir()
               if p.is_dir() and not p.name.startswith("__"))
  assert top == ["core", "longtail", "recsys"]
  assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py"]
