"""Recommenders by name: ``build_recommender(name, data, config, rngs)``."""
from __future__ import annotations

from typing import Any, Mapping

from flax import nnx

from uatmc_jax.core.errors import ConfigError
from uatmc_jax.recsys.data.interactions import InteractionData
from uatmc_jax.recsys.models.mmgcn import MMGCN
from uatmc_jax.recsys.models.vbpr import VBPR
from uatmc_jax.recsys.models.vbpr_mlp import VBPRMLP

RECOMMENDERS = ("vbpr", "vbpr_mlp", "mmgcn")
MODEL_CLASSES = {"vbpr": VBPR, "vbpr_mlp": VBPRMLP, "mmgcn": MMGCN}


def build_recommender(name: str, data: InteractionData, config: Mapping[str, Any] | None,
                      rngs: nnx.Rngs):
  """Builds a recommender for ``data``'s users, items and feature widths.

  Args:
    name: one of ``RECOMMENDERS``.
    data: the dataset (MMGCN also takes its train graph from it).
    config: optional mapping with ``embedding_dim`` (64), and per model:
      vbpr: ``item_bias`` (False);
      vbpr_mlp: ``wide_threshold`` (1024), ``align_weight`` (InfoNCE weight, 1.0),
      ``init_temperature`` (0.2); mmgcn: ``num_layers`` (2). Other keys are ignored.
    rngs: NNX random streams (``params`` is used).
  """
  cfg = dict(config or {})
  dims = {m: int(f.shape[1]) for m, f in data.features.items()}
  if not dims:
    raise ConfigError(f"dataset {data.name!r} has no feature modalities; multimodal "
                      "recommenders need at least one <modality>_feat.npy")
  emb = int(cfg.get("embedding_dim", 64))
  if name == "vbpr":
    return VBPR(data.n_users, data.n_items, dims, embedding_dim=emb,
                item_bias=bool(cfg.get("item_bias", False)), rngs=rngs)
  if name == "vbpr_mlp":
    return VBPRMLP(data.n_users, data.n_items, dims, embedding_dim=emb,
                   wide_threshold=int(cfg.get("wide_threshold", 1024)),
                   align_weight=float(cfg.get("align_weight", 1.0)),
                   init_temperature=float(cfg.get("init_temperature", 0.2)), rngs=rngs)
  if name == "mmgcn":
    return MMGCN(data.n_users, data.n_items, dims, data.train, embedding_dim=emb,
                 num_layers=int(cfg.get("num_layers", 2)), rngs=rngs)
  raise ConfigError(f"model {name!r} is unknown; expected one of {list(RECOMMENDERS)}")
