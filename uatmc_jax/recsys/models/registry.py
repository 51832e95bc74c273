"""Recommenders by name: ``build_recommender(name, data, config, rngs)``."""
from __future__ import annotations

from typing import Any, Mapping

import jax
from flax import nnx

from uatmc_jax.core.errors import ConfigError
from uatmc_jax.core.parallel import mesh as mesh_lib
from uatmc_jax.core.parallel import sharding_rules
from uatmc_jax.recsys.data.interactions import InteractionData
from uatmc_jax.recsys.models.mmgcn import MMGCN
from uatmc_jax.recsys.models.mmgcn_mmrec import MMREC_LATENT_DIM, MMREC_NUM_LAYERS, MMGCNMMRec
from uatmc_jax.recsys.models.vbpr import VBPR
from uatmc_jax.recsys.models.vbpr_mlp import VBPRMLP

RECOMMENDERS = ("vbpr", "vbpr_mlp", "mmgcn", "mmgcn_mmrec")
MODEL_CLASSES = {"vbpr": VBPR, "vbpr_mlp": VBPRMLP, "mmgcn": MMGCN, "mmgcn_mmrec": MMGCNMMRec}


def build_recommender(name: str, data: InteractionData, config: Mapping[str, Any] | None,
                      rngs: nnx.Rngs, row_multiple: int = 1):
  """Builds a recommender for ``data``'s users, items and feature widths.

  Args:
    name: one of ``RECOMMENDERS``.
    data: the dataset (MMGCN also takes its train graph from it).
    config: optional mapping with ``embedding_dim`` (64), and per model:
      vbpr: ``item_bias`` (False);
      vbpr_mlp: ``wide_threshold`` (1024), ``align_weight`` (InfoNCE weight, 1.0),
      ``init_temperature`` (0.2); mmgcn: ``num_layers`` (2); mmgcn_mmrec (MMRec's
      MMGCN architecture, ``mmgcn_mmrec.MMGCNMMRec``): ``latent_modality`` ("image", the
      modality projected to ``latent_dim`` before its first layer; None or "none" = every
      branch on raw features), ``latent_dim`` (256); its depth is MMRec's fixed 3 layers
      (``num_layers`` is mmgcn's key and is not read). Other keys are ignored.
    rngs: NNX random streams (``params`` is used).
    row_multiple: ID tables padded with zero rows to a multiple of this (the mesh
      ``model`` axis size, see :func:`build_sharded_recommender`); 1 = unpadded.
  """
  cfg = dict(config or {})
  dims = {m: int(f.shape[1]) for m, f in data.features.items()}
  if not dims:
    raise ConfigError(f"dataset {data.name!r} has no feature modalities; multimodal "
                      "recommenders need at least one <modality>_feat.npy")
  emb = int(cfg.get("embedding_dim", 64))
  if name == "vbpr":
    return VBPR(data.n_users, data.n_items, dims, embedding_dim=emb,
                item_bias=bool(cfg.get("item_bias", False)), row_multiple=row_multiple,
                rngs=rngs)
  if name == "vbpr_mlp":
    return VBPRMLP(data.n_users, data.n_items, dims, embedding_dim=emb,
                   wide_threshold=int(cfg.get("wide_threshold", 1024)),
                   align_weight=float(cfg.get("align_weight", 1.0)),
                   init_temperature=float(cfg.get("init_temperature", 0.2)),
                   row_multiple=row_multiple, rngs=rngs)
  if name == "mmgcn":
    return MMGCN(data.n_users, data.n_items, dims, data.train, embedding_dim=emb,
                 num_layers=int(cfg.get("num_layers", 2)), row_multiple=row_multiple,
                 rngs=rngs)
  if name == "mmgcn_mmrec":
    latent = cfg.get("latent_modality", "image")
    latent = None if latent is None or str(latent).lower() in ("", "none") else str(latent)
    if latent is not None and latent not in dims:
      raise ConfigError(
          f"model mmgcn_mmrec: latent_modality {latent!r} is not a modality of dataset "
          f"{data.name!r} (it has {sorted(dims)}); set latent_modality to its visual "
          "modality, or to none for raw features in every branch")
    try:
      latent_dim = int(cfg.get("latent_dim", MMREC_LATENT_DIM))
    except (TypeError, ValueError):
      latent_dim = 0
    if latent_dim < 1:
      raise ConfigError(f"model mmgcn_mmrec: latent_dim must be an integer >= 1, got "
                        f"{cfg.get('latent_dim')!r} (MMRec: {MMREC_LATENT_DIM})")
    return MMGCNMMRec(data.n_users, data.n_items, dims, data.train, embedding_dim=emb,
                      latent_modality=latent, latent_dim=latent_dim,
                      num_layers=MMREC_NUM_LAYERS, row_multiple=row_multiple, rngs=rngs)
  raise ConfigError(f"model {name!r} is unknown; expected one of {list(RECOMMENDERS)}")


def sharded_recommender_init(name: str, data: InteractionData,
                             config: Mapping[str, Any] | None, seed: int,
                             mesh: jax.sharding.Mesh,
                             rules: sharding_rules.Rules | None = None):
  """The jitted program that creates a recommender straight into its shardings.

  The ID tables are padded to a multiple of the mesh ``model`` axis (none when it is 1)
  and every leaf is an output of one ``jit`` with ``out_shardings`` from ``rules``
  (default ``sharding_rules.RECSYS_TABLE_RULES``), so each device computes and holds
  only its rows of every table (docs/scale.md); the values equal those of
  :func:`build_recommender` with the same seed (partitionable threefry).

  Returns:
    (graphdef, init: jitted ``() -> state``, shardings of the state).

  Raises:
    ConfigError: a rule names a leaf that cannot be split as it asks.
  """
  rules = sharding_rules.RECSYS_TABLE_RULES if rules is None else rules
  multiple = int(mesh.shape[mesh_lib.MODEL_AXIS])

  def create():
    return build_recommender(name, data, config, nnx.Rngs(int(seed)), row_multiple=multiple)

  graphdef, abstract = nnx.split(nnx.eval_shape(create))
  shardings = sharding_rules.tree_shardings(abstract, mesh, rules)
  init = jax.jit(lambda: nnx.state(create()), out_shardings=shardings)
  return graphdef, init, shardings


def build_sharded_recommender(name: str, data: InteractionData,
                              config: Mapping[str, Any] | None, seed: int,
                              mesh: jax.sharding.Mesh,
                              rules: sharding_rules.Rules | None = None):
  """:func:`build_recommender` created sharded over ``mesh`` from the start (no device
  ever holds a whole table): see :func:`sharded_recommender_init`."""
  graphdef, init, _ = sharded_recommender_init(name, data, config, seed, mesh, rules)
  return nnx.merge(graphdef, init())
