"""The hyper-parameters and optimiser of one long-tail AT run (METHODS.md B.3, B.4).

``LongTailTrainConfig`` holds every setting of ``trainer.LongTailTrainer`` (defaults:
the field's B.3 settings and MCAT's B.4 ones) and checks them (``validate``, a
ConfigError naming the field); ``learning_rate_schedule`` is the lr per optimiser step
(optional linear warm-up, then cosine or step decay) and ``make_optimizer`` the outer
step's SGD (momentum 0.9) with PyTorch-style coupled weight decay 5e-4 (added to the
gradient). ``DIAGNOSTICS_FIELDS`` are the config fields left out of the checkpoint
fingerprint (they do not change the trained state).
"""
from __future__ import annotations

import dataclasses

import optax

from uatmc_jax.core.errors import ConfigError
from uatmc_jax.core.parallel import precision

# LongTailTrainConfig fields that do not change the trained state (left out of the
# checkpoint fingerprint).
DIAGNOSTICS_FIELDS = ("diagnostics", "diagnostics_batch_size", "diagnostics_in_step")


@dataclasses.dataclass(frozen=True)
class LongTailTrainConfig:
  """Hyper-parameters of one run (defaults: the field's settings of B.3 / B.4)."""
  model: str = "resnet18"
  model_kwargs: dict = dataclasses.field(default_factory=dict)
  num_epochs: int = 100
  batch_size: int = 128
  learning_rate: float = 0.1
  schedule: str = "cosine"            # cosine | step
  # Linear warm-up from 0 over this many epochs (may be fractional), then the schedule
  # over the remaining steps; 0 = none (the B.3/B.4 settings).
  warmup_epochs: float = 0.0
  momentum: float = 0.9
  weight_decay: float = 5e-4
  epsilon: float = 8 / 255
  attack_step_size: float = 2 / 255
  attack_steps: int = 10
  # MCAT manifold models (used only when the method's manifold_weight > 0)
  latent_dim: int = 128
  manifold_hidden_dim: int = 1024
  latent_steps: int = 5               # T_z
  latent_step_size: float = 0.01
  manifold_refresh: str = "every_step"  # every_step | frozen
  manifold_warmup_epochs: int = 1
  manifold_fit_steps: int = 1         # Adam steps on each batch's clean features
  manifold_learning_rate: float = 1e-3
  seed: int = 0
  # float32 | bfloat16: the model's compute dtype (params, BN statistics and optimiser
  # state stay float32); see uatmc_jax.core.parallel.precision.
  compute_dtype: str = "float32"
  # Matmul / convolution precision of the training step's float32 ops
  # (precision.MATMUL_PRECISIONS: default | high | highest; "default" = the backend's
  # choice, e.g. TF32 on recent NVIDIA GPUs). Evaluation always runs at "highest".
  matmul_precision: str = precision.DEFAULT_TRAIN_MATMUL_PRECISION
  # Per-epoch mechanism diagnostics (longtail.diagnostics): on/off, and the size of the
  # fixed monitor batch of training images they use (a multiple of the data-axis size).
  diagnostics: bool = True
  diagnostics_batch_size: int = 64
  # The attack's "inner" numbers from every training step (epoch means; the MS-PGD step
  # costs ~1/3 more: one more backward per PGD step) instead of from the monitor batch.
  diagnostics_in_step: bool = False

  def validate(self) -> None:
    precision.check_matmul_precision(self.matmul_precision)
    if self.schedule not in ("cosine", "step"):
      raise ConfigError(f"schedule: expected cosine|step, got {self.schedule!r}")
    if self.manifold_refresh not in ("every_step", "frozen"):
      raise ConfigError(f"manifold_refresh: expected every_step|frozen, got "
                        f"{self.manifold_refresh!r}")
    if self.num_epochs < 1 or self.batch_size < 1 or self.attack_steps < 0:
      raise ConfigError("num_epochs, batch_size must be >= 1 and attack_steps >= 0")
    if self.diagnostics and self.diagnostics_batch_size < 1:
      raise ConfigError(f"diagnostics_batch_size: expected >= 1 with diagnostics on, got "
                        f"{self.diagnostics_batch_size}")
    if not 0 <= self.warmup_epochs < self.num_epochs:
      raise ConfigError(f"warmup_epochs: expected 0 <= warmup_epochs < num_epochs "
                        f"({self.num_epochs}), got {self.warmup_epochs}")


def learning_rate_schedule(config: LongTailTrainConfig, steps_per_epoch: int) -> optax.Schedule:
  """Linear warm-up over ``warmup_epochs`` (if any), then cosine decay to 0 or step decay
  (x0.1 at 50% and 75% of the post-warm-up steps)."""
  total = max(config.num_epochs * steps_per_epoch, 1)
  warm = int(round(config.warmup_epochs * steps_per_epoch))
  rest = max(total - warm, 1)
  if config.schedule == "cosine":
    decay = optax.cosine_decay_schedule(config.learning_rate, rest)
  else:
    decay = optax.piecewise_constant_schedule(
        config.learning_rate, {int(0.5 * rest): 0.1, int(0.75 * rest): 0.1})
  if not warm:
    return decay
  return optax.join_schedules(
      [optax.linear_schedule(0.0, config.learning_rate, warm), decay], [warm])


def make_optimizer(config: LongTailTrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
  """SGD(momentum) with coupled weight decay and ``learning_rate_schedule``."""
  return optax.chain(optax.add_decayed_weights(config.weight_decay),
                     optax.sgd(learning_rate_schedule(config, steps_per_epoch),
                               momentum=config.momentum))
