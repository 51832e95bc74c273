"""A finished long-tail AT run, restored for evaluation (METHODS.md B.5).

``load_trained_classifier(workdir)`` rebuilds the model of a ``train_longtail`` run from
its ``trainer_config.json`` (``trainer.TRAINER_CONFIG_FILE``) and restores its latest
(or best) checkpoint as a ``TrainedClassifier``, whose ``logits_fn`` is what evaluation
attacks: the method's inference logits (RoBal's −τ_p log π included, B.3), BatchNorm in
inference mode.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uatmc_jax.core.checkpointing import CheckpointStore
from uatmc_jax.core.errors import ConfigError
from uatmc_jax.core.parallel import mesh as mesh_lib
from uatmc_jax.longtail import methods as methods
from uatmc_jax.longtail.models import image_classifiers as ic
from uatmc_jax.longtail.train_config import LongTailTrainConfig
from uatmc_jax.longtail.trainer import TRAINER_CONFIG_FILE, LongTailTrainer


class TrainedClassifier(NamedTuple):
  """A trained long-tail classifier, ready for evaluation attacks.

  ``logits_fn(x)`` maps images (B, H, W, 3) in [0, 1] to the method's inference logits
  (B, C) (BN in inference mode; RoBal's −τ_p log π included); ``model`` is the NNX
  module in eval mode (raw logits, ``features``, ``classifier_weight``);
  ``logit_adjustment`` (C,) is what ``logits_fn`` adds to ``model(x)``.
  """
  model: ic.ImageClassifier
  logits_fn: Callable[[jax.Array], jax.Array]
  logit_adjustment: np.ndarray
  class_counts: np.ndarray
  method: methods.LongTailMethod
  info: dict


def load_trained_classifier(workdir: str, *, best: bool = False,
                            mesh: jax.sharding.Mesh | None = None) -> TrainedClassifier:
  """Rebuilds the model of a ``train_longtail`` run and restores its latest checkpoint.

  ``mesh``: restore the state replicated on it (e.g. a global mesh of a multi-process
  evaluation; the default is this process's first device).

  Raises:
    ConfigError: no trainer config or no checkpoint under ``workdir``.
  """
  path = os.path.join(workdir, TRAINER_CONFIG_FILE)
  if not os.path.exists(path):
    raise ConfigError(f"{path}: not found; is {workdir} the workdir of a train_longtail run?")
  with open(path) as f:
    info = json.load(f)
  cfg = dict(info["config"])
  config = LongTailTrainConfig(**cfg)
  method = methods.LongTailMethod(**info["method"])
  counts = np.asarray(info["class_counts"], np.int64)
  trainer = LongTailTrainer(config, method, num_classes=info["num_classes"],
                            class_counts=counts, steps_per_epoch=1,
                            mesh=mesh or mesh_lib.make_mesh(devices=jax.local_devices()[:1]))
  template = trainer.init_state()
  store = CheckpointStore(os.path.join(workdir, "checkpoints"))
  restored = store.restore_best(template) if best else store.restore_latest(template)
  store.close()
  if restored is None:
    raise ConfigError(f"{workdir}/checkpoints: no checkpoint to restore")
  state, meta = restored
  model = nnx.merge(trainer.graphdef, state["params"], state["batch_stats"])
  model.eval()
  adjustment = np.asarray(methods.logit_adjustment(method, jnp.asarray(counts, jnp.float32)))
  logits_fn = jax.jit(functools.partial(trainer.inference_logits, state["params"],
                                        state["batch_stats"]))
  return TrainedClassifier(model, logits_fn, adjustment, counts, method,
                           dict(info, checkpoint_meta=meta))
