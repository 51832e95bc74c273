"""UAT-MC without alignment (the ablation row of METHODS.md A.8).

The same objective as :mod:`uatmc_jax.recsys.defences.uat_mc` with λ_align = 0: one
normalised gradient step on BPR(x̂ + δ) per modality, no second-order cosine term.
Selectable as ``config.loss = "uat_mc_no_align"``.
"""
from __future__ import annotations


def make_loss_fn(config):
  """The trainer's loss seam for ``uat_mc_no_align``."""
  from uatmc_jax.recsys.defences import registry
  return registry.make_defence_loss("uat_mc_no_align", config)
