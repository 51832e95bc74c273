"""Vanilla BPR training (METHODS.md A.7, the baseline row): BPR + reg·EmbLoss.

The objective itself is the trainer's default,
``uatmc_jax.recsys.losses.bpr_objective`` (plus the backbone's auxiliary
loss, e.g. VBPR-MLP's InfoNCE); this module only makes it selectable as the defence
``vanilla`` (``config.loss = "vanilla"``).
"""
from __future__ import annotations


def make_loss_fn(config):
  """The trainer's loss seam for ``vanilla``."""
  from uatmc_jax.recsys.defences import registry
  return registry.make_defence_loss("vanilla", config)
