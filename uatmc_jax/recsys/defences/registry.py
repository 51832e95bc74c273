"""Defences by name: loss functions for the recsys trainer's loss seam (METHODS.md A.7).

``make_defence_loss(name, config)`` returns ``loss_fn(model, batch, features, key) ->
(loss, aux)``, the signature of ``uatmc_jax.recsys.losses.bpr_objective``,
so the one training loop runs every defence. Hyper-parameters come from ``config``
(keys ``reg_weight``, ``epsilon``, ``adv_weight``, ``align_weight``, ``amr_modality``,
``amr_relative_budget``, ``graph_items``), else from the named ``defence_preset`` (UAT-MC, see
``presets.UAT_MC_PRESETS``), else from ``presets.DEFENCE_DEFAULTS``.

======================  ===========================================================
name                    loss
======================  ===========================================================
``vanilla``             BPR + reg·EmbLoss (+ the backbone's auxiliary loss)
``apr``                 BPR + λ·BPR(vectors + Δ), Δ = ε·Γ/||Γ||       (He et al.)
``amr``                 BPR + λ·BPR(f^m + d), d = ε·∇/||∇||, one modality (Tang et al.)
``uat_mc_no_align``     BPR + λ_adv·BPR(x̂ + δ), normalised step, frozen projections
``uat_mc``              as above with the second-order alignment reward λ_align·cos
======================  ===========================================================
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

from uatmc_jax.core.errors import ConfigError
from uatmc_jax.recsys import losses as recsys_losses
from uatmc_jax.recsys.defences import amr, apr, uat_mc
from uatmc_jax.recsys.defences.batch_slots import GRAPH_ITEMS
from uatmc_jax.recsys.defences.presets import DEFENCE_DEFAULTS, UAT_MC_PRESETS

DEFENCES = ("vanilla", "apr", "amr", "uat_mc_no_align", "uat_mc")
# Defences that fine-tune a trained backbone (A.7) instead of training from scratch.
FINE_TUNES_BACKBONE = ("uat_mc_no_align", "uat_mc")


def defence_hyperparameters(name: str, config: Mapping[str, Any] | None = None) -> dict:
  """The resolved hyper-parameters of defence ``name`` (defaults < preset < config)."""
  if name not in DEFENCES:
    raise ConfigError(f"defence {name!r} is unknown; expected one of {list(DEFENCES)}")
  cfg = dict(config or {})
  out = dict(DEFENCE_DEFAULTS[name])
  preset = cfg.get("defence_preset")
  if preset and name in FINE_TUNES_BACKBONE:
    if preset not in UAT_MC_PRESETS:
      raise ConfigError(f"defence_preset {preset!r} is unknown; expected one of "
                        f"{sorted(UAT_MC_PRESETS)}")
    out.update(UAT_MC_PRESETS[preset])
    if name == "uat_mc_no_align":
      out["align_weight"] = 0.0
  for key in ("epsilon", "adv_weight"):
    if cfg.get(key) is not None and name != "vanilla":
      out[key] = float(cfg[key])
  if cfg.get("align_weight") is not None and name == "uat_mc":
    out["align_weight"] = float(cfg["align_weight"])
  if name == "amr":
    if cfg.get("amr_modality"):
      out["modality"] = str(cfg["amr_modality"])
    if cfg.get("amr_relative_budget") is not None:
      out["relative_budget"] = bool(cfg["amr_relative_budget"])
  if cfg.get("graph_items") is not None and "graph_items" in out:
    out["graph_items"] = str(cfg["graph_items"])
  if out.get("graph_items", GRAPH_ITEMS[0]) not in GRAPH_ITEMS:
    raise ConfigError(f"defence {name!r}: graph_items must be one of {list(GRAPH_ITEMS)}, "
                      f"got {out['graph_items']!r}")
  out["reg_weight"] = float(cfg.get("reg_weight", 1e-4))
  for key, value in out.items():
    if key in ("epsilon", "adv_weight", "align_weight", "reg_weight") and value < 0:
      raise ConfigError(f"defence {name!r}: {key} must be >= 0, got {value}")
  return out


def make_defence_loss(name: str, config: Mapping[str, Any] | None = None):
  """The loss-seam function of defence ``name`` with hyper-parameters from ``config``.

  The same (name, hyper-parameters) always gives the same function object, so jitted
  training epochs keyed on it (static argument) compile once per process, not once per
  trainer (e.g. once for all seeds of an experiment).
  """
  hp = defence_hyperparameters(name, config)
  return _loss_fn(name, tuple(sorted(hp.items())))


@functools.lru_cache(maxsize=None)
def _loss_fn(name: str, hp_items: tuple):
  hp = dict(hp_items)
  if name == "vanilla":
    return functools.partial(recsys_losses.bpr_objective, reg_weight=hp["reg_weight"])
  if name == "apr":
    return functools.partial(apr.apr_objective, **hp)
  if name == "amr":
    return functools.partial(amr.amr_objective, **hp)
  return functools.partial(uat_mc.uat_mc_objective, **hp)
