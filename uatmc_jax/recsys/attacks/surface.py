"""A trained recommender as the promotion attacker sees it: pure functions + arrays.

The white-box evasion attacker of METHODS.md A.4 needs only a handful of pure functions
of a trained recommender (the protocol of ``uatmc_jax.recsys.models.base``):

* ``lift_fn(params, rows)``: features in the *attacked space* -> projected features
  (identity when the attack lives in the projected space, the reference's choice;
  ``model.project`` when it perturbs raw features);
* ``item_vectors_fn(params, projected_rows, ids)``: item vectors of some items;
* ``encode_fn(params, projected_table)``: the full forward (user and item vectors of
  everything) from the projected table of all items.

``AttackSurface`` bundles them with the parameter pytree and the clean feature tables.
The functions are static (hashable, created once per surface), the arrays are passed to
jitted functions as arguments, so large tables are never baked into compiled code.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from uatmc_jax.core import errors

Features = Mapping[str, jax.Array]

ATTACK_SPACES = ("projected", "raw")


@dataclasses.dataclass(frozen=True, eq=False)
class AttackSurface:
  """The pure view of a trained recommender used by every promotion attack.

  Attributes:
    modalities: ordered modality names (the model's order).
    is_graph: True when one item's features move other users'/items' vectors (MMGCN);
      attacks then take an exact graph path (local recomputation when ``graph`` is set,
      else the full re-encode).
    space: "projected" (reference) or "raw": where perturbations live.
    params: parameter pytree passed to the functions below.
    attack_table: {m: (n_items, d_m)} clean features in the attacked space.
    projected_table: {m: (n_items, p_m)} clean projected features (the same arrays as
      ``attack_table`` when ``space == "projected"``).
    lift_fn: (params, {m: (n, d_m)}) -> {m: (n, p_m)}.
    item_vectors_fn: (params, {m: (n, p_m)}, ids (n,)) -> (n, D).
    encode_fn: (params, {m: (n_items, p_m)}) -> (users (n_users, D), items (n_items, D)).
    shared_space: the model projects every modality into one common space
      (``Recommender.shared_projected_space``); without it the cosine alignments are
      refused and the A.5 cross-modal cosine is NaN.
    graph: for graph models that support it, a ``GraphLocal`` (exact local recomputation
      of the vectors one item's features move; ``uatmc_jax.recsys.attacks.graph_local``), else
      None (the attack then re-encodes the whole graph).
  """
  modalities: tuple[str, ...]
  is_graph: bool
  space: str
  params: Any
  attack_table: dict[str, jax.Array]
  projected_table: dict[str, jax.Array]
  lift_fn: Callable
  item_vectors_fn: Callable
  encode_fn: Callable
  shared_space: bool = True
  graph: "GraphLocal | None" = None

  @property
  def n_items(self) -> int:
    return int(next(iter(self.attack_table.values())).shape[0])

  def feature_dims(self) -> dict[str, int]:
    """{m: d_m} of the attacked space."""
    return {m: int(self.attack_table[m].shape[1]) for m in self.modalities}

  def clean_vectors(self) -> tuple[jax.Array, jax.Array]:
    """(user vectors (n_users, D), item vectors (n_items, D)) of the clean model."""
    return jax.jit(self.encode_fn)(self.params, self.projected_table)


@dataclasses.dataclass(frozen=True, eq=False)
class GraphLocal:
  """The pure functions of a graph model's exact local recomputation.

  Attributes:
    neighbourhoods: the bucketed item neighbourhoods of its graph (host-side).
    clean_fn: (params, {m: (n_items, p_m)}) -> ``graph_local.GraphCache``.
    local_fn: (params, cache, {m: (p_m,)} target row, Neighbourhood, BucketShape)
      -> (changed item vectors (P_i, D), changed user vectors (P_u, D)).
  """
  neighbourhoods: Any
  clean_fn: Callable
  local_fn: Callable


def identity_lift(params, rows: Features) -> dict[str, jax.Array]:
  del params
  return dict(rows)


def surface_from_recommender(model, features: Features, *,
                             space: str = "projected") -> AttackSurface:
  """Builds the attack surface of a trained NNX recommender.

  Args:
    model: a recommender following ``uatmc_jax.recsys.models.base.Recommender``.
    features: raw item features {m: (n_items, d_m)}.
    space: "projected" (perturb x̂^m, the reference) or "raw" (perturb x^m).

  Returns:
    An ``AttackSurface``.
  """
  from flax import nnx  # local: keeps this module importable without flax in tests

  if space not in ATTACK_SPACES:
    raise errors.ConfigError(f"attack space must be one of {ATTACK_SPACES}, got {space!r}")
  graphdef, state = nnx.split(model)
  modalities = tuple(model.modalities)
  features = {m: jnp.asarray(features[m], jnp.float32) for m in modalities}

  def project(params, rows):
    return nnx.merge(graphdef, params).project(rows)

  def item_vectors_fn(params, projected_rows, ids):
    return nnx.merge(graphdef, params).item_vectors(projected_rows, ids)

  def encode_fn(params, projected_table):
    return nnx.merge(graphdef, params).encode(projected_table)

  projected = jax.jit(project)(state, features)
  projected = {m: projected[m] for m in modalities}
  shared = bool(getattr(model, "shared_projected_space", False))
  graph = _graph_local(model, graphdef) if model.is_graph else None
  if space == "projected":
    return AttackSurface(modalities, bool(model.is_graph), space, state, projected,
                         projected, identity_lift, item_vectors_fn, encode_fn, shared, graph)
  return AttackSurface(modalities, bool(model.is_graph), space, state, features, projected,
                       project, item_vectors_fn, encode_fn, shared, graph)


def _graph_local(model, graphdef) -> GraphLocal | None:
  """The local recomputation of an MMGCN (None for other graph models)."""
  from flax import nnx

  from uatmc_jax.recsys.attacks import graph_local
  from uatmc_jax.recsys.models.mmgcn import MMGCN
  if not isinstance(model, MMGCN):
    return None

  def clean_fn(params, projected_table):
    return graph_local.clean_activations(nnx.merge(graphdef, params), projected_table)

  def local_fn(params, cache, row, nb, shape):
    return graph_local.local_vectors(nnx.merge(graphdef, params), cache, row, nb, shape)

  return GraphLocal(graph_local.neighbourhoods_of(model), clean_fn, local_fn)
