"""Parameter placement chosen by config: regex rules from parameter paths to PartitionSpecs.

Large per-user / per-item tables (the recommenders' ID embeddings, MMGCN's preference
vectors, raw item-feature matrices) are split by rows over the mesh's ``model`` axis,
so a table larger than one device's memory is held in pieces; everything else is
replicated. Which leaves are tables is decided by *config* (big_vision habit: sharding
strategy in config, not code)::

    config.mesh_model = 4
    config.param_sharding = (("embedding|preferences", "model,None"),)

A rule is ``(regex, spec)``: the first rule whose regex ``re.search``-matches the
leaf's path (keys joined by ``/``, e.g. ``user_embedding/value`` or
``opt_state/0/mu/user_embedding/value``) gives the leaf's spec; no match means
replicated (``P()``). Because optimiser states (optax) mirror the parameter tree, the
same rules place Adam's moments next to their parameters.

A spec that does not fit a leaf (more entries than dimensions, or a dimension that the
named mesh axes do not divide) is a ``ConfigError`` naming the leaf's path, its shape,
the spec and the mesh: a requested split never turns itself into replication.
Recommenders pad their ID tables to a multiple of the ``model`` axis
(``row_multiple``, uatmc_jax/recsys/models/base.py ``padded_table``) so their tables
always split.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from uatmc_jax.core.errors import ConfigError

# The default for recommenders: ID tables and per-user preference vectors over `model`.
RECSYS_TABLE_RULES: tuple[tuple[str, str], ...] = (("embedding|preferences", "model,None"),)

Rules = Sequence[tuple[str, Any]]


def parse_spec(spec: Any) -> P:
  """``"model,None"`` / ``("model", None)`` / ``P(...)`` / ``""`` -> PartitionSpec.

  Trailing ``None`` entries are dropped (``P("model", None)`` -> ``P("model")``): the
  two mean the same placement, but only the short form equals the sharding XLA gives
  jitted outputs, and a mismatch would retrace a step that takes its own outputs back.
  """
  if isinstance(spec, P):
    entries = list(spec)
  elif spec is None or spec == "" or spec == ():
    entries = []
  elif isinstance(spec, str):
    entries = [None if s.strip() in ("None", "none", "") else s.strip()
               for s in spec.split(",")]
  elif isinstance(spec, (tuple, list)):
    entries = list(spec)
  else:
    raise ConfigError(f"sharding spec {spec!r}: expected a string like 'model,None', a "
                      "tuple of axis names / None, or a PartitionSpec")
  while entries and entries[-1] is None:
    entries.pop()
  return P(*entries)


def parse_rules(rules: Rules | None) -> list[tuple[re.Pattern, P]]:
  """Compiles config rules ``((regex, spec), ...)``; raises ConfigError on bad entries."""
  out = []
  for i, rule in enumerate(rules or ()):
    if not isinstance(rule, (tuple, list)) or len(rule) != 2:
      raise ConfigError(f"param_sharding rule #{i} = {rule!r}: expected (regex, spec)")
    pattern, spec = rule
    try:
      compiled = re.compile(str(pattern))
    except re.error as e:
      raise ConfigError(f"param_sharding rule #{i}: bad regex {pattern!r} ({e})") from e
    out.append((compiled, parse_spec(spec)))
  return out


def path_string(path: Iterable[Any]) -> str:
  """A pytree key path as ``a/b/0/c`` (dict keys, attributes and indices alike)."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _fits(shape: Sequence[int], spec: P, mesh: jax.sharding.Mesh | None) -> bool:
  if len(spec) > len(shape):
    return False
  if mesh is None:
    return True
  for dim, axes in zip(shape, spec):
    if axes is None:
      continue
    names = axes if isinstance(axes, tuple) else (axes,)
    for name in names:
      if name not in mesh.shape:
        raise ConfigError(f"sharding spec {spec} names axis {name!r}; the mesh has "
                          f"{tuple(mesh.shape)}")
    size = int(np.prod([mesh.shape[n] for n in names]))
    if dim % size:
      return False
  return True


def partition_specs(tree: Any, rules: Rules | None,
                    mesh: jax.sharding.Mesh | None = None) -> Any:
  """A pytree of PartitionSpecs for ``tree``'s array leaves (shape-dtype structs too).

  Args:
    tree: pytree of arrays or ``jax.ShapeDtypeStruct`` (e.g. ``nnx.split(model)[1]``,
      an optax state, or ``jax.eval_shape`` of either).
    rules: ``((regex, spec), ...)`` as described in the module docstring.
    mesh: when given, every spec is checked against the leaf's shape and the mesh.

  Returns:
    A pytree with the structure of ``tree`` and a ``PartitionSpec`` per leaf.

  Raises:
    ConfigError: a rule's spec does not fit the leaf it matches (a dimension the named
      mesh axes do not divide, or more entries than dimensions).
  """
  compiled = parse_rules(rules)

  def spec_of(path, leaf):
    name = path_string(path)
    shape = tuple(getattr(leaf, "shape", ()))
    for pattern, spec in compiled:
      if pattern.search(name):
        if _fits(shape, spec, mesh):
          return spec
        raise ConfigError(
            f"param_sharding: {name} of shape {shape} cannot be split as {spec} over mesh "
            f"{dict(mesh.shape) if mesh is not None else None} (rule {pattern.pattern!r}): "
            "every sharded dimension must be a multiple of its mesh axes' size and the "
            "spec may not have more entries than the leaf has dimensions. Pad the leaf "
            "(recommenders: row_multiple = the model axis size, which "
            "build_sharded_recommender / the train_recsys launcher use) or change the "
            "rule or the mesh")
    return P()

  return jax.tree_util.tree_map_with_path(spec_of, tree)


def tree_shardings(tree: Any, mesh: jax.sharding.Mesh, rules: Rules | None) -> Any:
  """``NamedSharding`` per leaf of ``tree`` from ``rules`` (see :func:`partition_specs`)."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec),
                      partition_specs(tree, rules, mesh),
                      is_leaf=lambda x: isinstance(x, P))


def place_tree(tree: Any, shardings: Any) -> Any:
  """Places a host-identical pytree on its shardings; works with one or many processes.

  Every process must hold the same values (e.g. parameters initialised from the same
  seed); each process then keeps only the shards its devices own, through
  ``jax.make_array_from_callback`` (``device_put`` cannot target other hosts' devices).
  Arrays already global (e.g. from :func:`sharded_init`) are resharded on device, and
  arrays already on their sharding are kept as they are (no copy).
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)

  def place(x, sharding):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.device_put(x, sharding)
    host = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

  return jax.tree.map(place, tree, shardings)


def shard_tree(tree: Any, mesh: jax.sharding.Mesh, rules: Rules | None) -> Any:
  """``place_tree(tree, tree_shardings(tree, mesh, rules))``."""
  return place_tree(tree, tree_shardings(tree, mesh, rules))


def sharded_init(create: Callable[[], Any], mesh: jax.sharding.Mesh,
                 rules: Rules | None) -> Any:
  """Runs ``create()`` (a pure function returning a pytree of arrays) straight into its
  shardings, so no device ever holds a whole table: ``jit(create, out_shardings=...)``.

  With JAX's partitionable threefry (the default), the values equal an unsharded
  ``create()``.
  """
  abstract = jax.eval_shape(create)
  return jax.jit(create, out_shardings=tree_shardings(abstract, mesh, rules))()


def abstract_tree(tree: Any, shardings: Any) -> Any:
  """``jax.ShapeDtypeStruct`` leaves carrying ``shardings``: lower/compile without data."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def describe(tree: Any, shardings: Any) -> list[tuple[str, tuple, str]]:
  """[(path, shape, spec)] for logging which leaves are sharded."""
  rows = []
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  specs = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, NamedSharding))
  for (path, leaf), sharding in zip(flat, specs):
    rows.append((path_string(path), tuple(leaf.shape), str(sharding.spec)))
  return rows
