"""The one long-tailed adversarial-training loop (METHODS.md B.3, B.4).

Every method of ``longtail_methods`` (PGD-AT, TRADES, MART, AT-BSL, RoBal, MCAT and
their combinations) runs through ``LongTailTrainer``:

* inner maximisation: ``attacks.linf.pgd_attack`` (PGD-10, ε 8/255, step 2/255, random
  start) on the method's objective, with BatchNorm in **inference** mode (running
  statistics, no update); MS-PGD (``attacks.manifold_pgd``) when λ_man > 0;
* outer minimisation: the method's loss with BatchNorm in **training** mode (batch
  statistics, running averages updated), SGD momentum 0.9, weight decay 5e-4 (added to
  the gradient, PyTorch style), lr 0.1 with cosine or step (×0.1 at 50% / 75%) decay;
* MCAT's manifold models: fitted on the clean penultimate features of each batch
  (Adam on the autoencoder reconstruction, ``objectives.manifold``) during
  ``manifold_warmup_epochs`` (the attack is plain PGD meanwhile), then either refreshed
  every step (paper) or frozen (reference);
* a pure, jitted step over ``nnx.split`` state with ``donate_argnums``; the batch is
  sharded over the ``data`` axis of the mesh, the state replicated (BN statistics are
  then global-batch statistics, so results do not depend on the device count);
* orbax checkpoints every epoch (``CheckpointStore``) and resume; every random draw
  comes from ``(seed, epoch, step)``, so a resumed run equals an uninterrupted one. The
  checkpoints carry the run's config as a fingerprint: a workdir whose checkpoints come
  from another config (or are corrupt) is refused with a ConfigError;
* no host sync per step: the step metrics stay on device and are fetched once per
  epoch, and the next batch is copied to the devices while the current step runs;
* the step's float32 matmuls run at ``matmul_precision`` (default: the backend's
  choice); the test / monitor evaluation at "highest" (``core.parallel.precision``);
* with ``diagnostics`` (default on) every epoch also records what the MCAT terms do
  (``longtail.diagnostics``): attack-term numbers from inside the step, and MS-PGD vs
  PGD, outer-loss gradients on W and the B.5 geometry on a fixed monitor batch.

The run's settings, lr schedule and optimiser are ``train_config``'s; the epoch scalars
are reduced on the host by ``epoch_metrics``; ``trained_classifier`` restores a finished
run for evaluation.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections import Counter
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from uatmc_jax.core.checkpointing import CheckpointStore
from uatmc_jax.core.errors import ConfigError
from uatmc_jax.core.metric_writer import ScalarWriter
from uatmc_jax.core.parallel import mesh as mesh_lib
from uatmc_jax.core.parallel import multihost
from uatmc_jax.core.parallel import precision
from uatmc_jax.core.progress import StepProgress
from uatmc_jax.core import reporting
from uatmc_jax.core.reporting import ProgressLogger
from uatmc_jax.longtail import diagnostics as diag_lib
from uatmc_jax.longtail import epoch_metrics
from uatmc_jax.longtail import losses as cl
from uatmc_jax.longtail import manifold as manifold_lib
from uatmc_jax.longtail import methods as methods
from uatmc_jax.longtail.attacks import linf
from uatmc_jax.longtail.attacks import manifold_pgd
from uatmc_jax.longtail.evaluation import class_accuracy
from uatmc_jax.longtail.models import image_classifiers as ic
from uatmc_jax.longtail.train_config import (DIAGNOSTICS_FIELDS, LongTailTrainConfig,
                                             learning_rate_schedule, make_optimizer)

TRAINER_CONFIG_FILE = "trainer_config.json"
DIAGNOSTICS_FILE = "diagnostics.json"


class StepFlags(NamedTuple):
  fit_manifold: bool
  attack_with_manifold: bool


class LongTailTrainer:
  """Builds the model, state and jitted steps of one long-tail AT run.

  Args:
    config: hyper-parameters.
    method: a resolved ``LongTailMethod``.
    num_classes: C.
    class_counts: (C,) training counts (balanced softmax, RoBal, groups).
    steps_per_epoch: optimiser steps per epoch (for the schedule).
    mesh: device mesh (default: all devices on the data axis).
  """

  def __init__(self, config: LongTailTrainConfig, method: methods.LongTailMethod, *,
               num_classes: int, class_counts: np.ndarray, steps_per_epoch: int,
               mesh: jax.sharding.Mesh | None = None):
    config.validate()
    self.config, self.method = config, method
    self.num_classes = num_classes
    self.class_counts = np.asarray(class_counts, np.int64)
    self.steps_per_epoch = steps_per_epoch
    self.mesh = mesh if mesh is not None else mesh_lib.make_mesh()
    if config.batch_size % mesh_lib.data_axis_size(self.mesh):
      raise ConfigError(f"batch_size {config.batch_size} is not divisible by the "
                        f"{mesh_lib.data_axis_size(self.mesh)} devices of the data axis")
    self.optimizer = make_optimizer(config, steps_per_epoch)
    model = self.build_model(jax.random.key(config.seed))
    self.graphdef, _, _ = ic.split_classifier(model)
    self._counts_f32 = jnp.asarray(self.class_counts, jnp.float32)
    self._steps: dict[StepFlags, Callable] = {}
    self._monitors: dict[bool, Callable] = {}
    # How often each jitted function was traced, by (name, flags): a second trace of
    # the same key is a silent recompile (tests check it stays at one).
    self.trace_counts: Counter = Counter()

  # --- model and state ------------------------------------------------------------------
  def model_kwargs(self) -> dict:
    kw = dict(self.config.model_kwargs)
    if self.config.compute_dtype != "float32":
      kw.setdefault("dtype", precision.Policy.from_name(self.config.compute_dtype).compute_dtype)
    if self.method.head == "cosine":
      kw.update(head="cosine", cosine_scale=self.method.robal_scale)
    return kw

  def build_model(self, key: jax.Array) -> ic.ImageClassifier:
    return ic.build_classifier(self.config.model, self.num_classes,
                               nnx.Rngs(params=key, dropout=jax.random.fold_in(key, 1)),
                               **self.model_kwargs())

  def init_state(self) -> dict:
    """Fresh replicated state: params, batch_stats, opt_state, manifold fit state."""
    key = jax.random.key(self.config.seed)
    model = self.build_model(key)
    _, params, batch_stats = ic.split_classifier(model)
    state = {"params": params, "batch_stats": batch_stats,
             "opt_state": self.optimizer.init(params), "manifold": {}}
    if self.method.uses_manifold:
      state["manifold"] = manifold_lib.init_manifold_fit(
          jax.random.fold_in(key, 7), num_classes=self.num_classes,
          feature_dim=model.feature_dim, latent_dim=self.config.latent_dim,
          hidden_dim=self.config.manifold_hidden_dim,
          learning_rate=self.config.manifold_learning_rate)._asdict()
    return mesh_lib.replicate(state, self.mesh)

  def step_flags(self, epoch: int) -> StepFlags:
    if not self.method.uses_manifold:
      return StepFlags(False, False)
    warm = epoch < self.config.manifold_warmup_epochs
    refresh = warm or self.config.manifold_refresh == "every_step"
    return StepFlags(fit_manifold=refresh, attack_with_manifold=not warm)

  # --- pure pieces ----------------------------------------------------------------------
  def features_eval(self, params, batch_stats, x):
    return ic.apply_features(self.graphdef, params, batch_stats, x, train=False)[0]

  def classify(self, params, batch_stats, phi):
    return ic.apply_classify(self.graphdef, params, batch_stats, phi)

  def attack_objective(self, state: dict, x, y):
    """(φ with BN in inference mode, the method's per-example head loss of φ)."""
    params, stats = state["params"], state["batch_stats"]
    feats = functools.partial(self.features_eval, params, stats)
    clean_logits = None
    if self.method.inner_loss == "kl":
      clean_logits = jax.lax.stop_gradient(self.classify(params, stats, feats(x)))

    def head_loss(phi):
      return methods.attack_head_loss(self.method,
                                      adv_logits=self.classify(params, stats, phi),
                                      labels=y, clean_logits=clean_logits,
                                      class_counts=self._counts_f32)

    return feats, head_loss

  def adversarial_examples(self, state: dict, x, y, key, *, attack_with_manifold: bool):
    """The method's inner maximisation (PGD-10 or MS-PGD), BN in inference mode."""
    cfg, method = self.config, self.method
    feats, head_loss = self.attack_objective(state, x, y)
    if attack_with_manifold:
      loss_fn = manifold_pgd.manifold_constrained_loss(
          features_fn=feats, head_loss_fn=head_loss, labels=y,
          manifold_params=manifold_lib.ManifoldParams(*state["manifold"]["params"]),
          manifold_weight=method.manifold_weight, latent_steps=cfg.latent_steps,
          latent_step_size=cfg.latent_step_size)
    else:
      loss_fn = lambda xa: head_loss(feats(xa))
    return linf.pgd_attack(loss_fn, x, epsilon=cfg.epsilon, step_size=cfg.attack_step_size,
                           num_steps=cfg.attack_steps, key=key,
                           random_start=method.attack_start)

  def outer_objective(self, params, batch_stats, x, x_adv, y):
    """The method's outer loss with BN in training mode.

    Returns ``(loss, (new_batch_stats, parts, adv_logits))``.
    """
    method = self.method
    stats = batch_stats
    clean_logits = None
    if method.needs_clean_logits:
      clean_logits, stats = ic.apply_logits(self.graphdef, params, stats, x, train=True)
    adv_logits, stats = ic.apply_logits(self.graphdef, params, stats, x_adv, train=True)
    weight = ic.classifier_weight_of(self.graphdef, params, stats)
    loss, parts = methods.outer_loss(method, adv_logits=adv_logits, labels=y,
                                     clean_logits=clean_logits,
                                     class_counts=self._counts_f32,
                                     classifier_weight=weight)
    return loss, (stats, parts, adv_logits)

  def _train_step(self, state: dict, batch: dict, key: jax.Array, *, flags: StepFlags):
    self.trace_counts[("train_step", flags)] += 1
    cfg = self.config
    x, y = batch["image"], batch["label"]
    metrics = {}
    state = dict(state)
    if flags.fit_manifold:
      phi_clean = jax.lax.stop_gradient(
          self.features_eval(state["params"], state["batch_stats"], x))
      fit = manifold_lib.ManifoldFitState(
          manifold_lib.ManifoldParams(*state["manifold"]["params"]),
          state["manifold"]["opt_state"])
      fit, metrics["manifold_recon"] = manifold_lib.manifold_fit_steps(
          fit, phi_clean, y, num_steps=cfg.manifold_fit_steps,
          learning_rate=cfg.manifold_learning_rate)
      state["manifold"] = fit._asdict()
    if cfg.diagnostics and cfg.diagnostics_in_step:
      x_adv, metrics["diag"] = diag_lib.inner_attack(
          self, state, x, y, key, attack_with_manifold=flags.attack_with_manifold)
    else:
      x_adv = self.adversarial_examples(state, x, y, key,
                                        attack_with_manifold=flags.attack_with_manifold)

    def loss_fn(params):
      return self.outer_objective(params, state["batch_stats"], x, x_adv, y)

    (loss, (stats, parts, adv_logits)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state["params"])
    updates, opt_state = self.optimizer.update(grads, state["opt_state"], state["params"])
    state.update(params=optax.apply_updates(state["params"], updates), batch_stats=stats,
                 opt_state=opt_state)
    correct = jnp.argmax(adv_logits, -1) == y
    metrics.update(parts, loss=loss, adv_train_acc=jnp.mean(correct))
    # Per-class counts of this batch (summed over the epoch, not averaged): the training
    # robust accuracy per Many/Medium/Few/Tail group at no extra forward pass.
    onehot = jax.nn.one_hot(y, self.num_classes, dtype=jnp.int32)
    metrics["per_class"] = {"adv_correct": jnp.sum(onehot * correct[:, None], 0),
                            "seen": jnp.sum(onehot, 0)}
    return state, metrics

  def train_step(self, state: dict, batch: dict, key: jax.Array, *, flags: StepFlags):
    """One jitted, state-donating step (compiled once per ``flags``).

    Returns ``(state, metrics)``: scalar batch means (``loss``, ``adv_train_acc``, the
    method's loss parts), ``metrics["per_class"]``, the (C,) int counts
    ``adv_correct`` / ``seen`` of the batch's labels, and with ``diagnostics``
    ``metrics["diag"]``, the attack's diagnostic scalars (``diagnostics`` "inner").
    """
    with precision.matmul_precision(self.config.matmul_precision):
      return self._step_fn(flags)(state, batch, key)

  def _step_fn(self, flags: StepFlags):
    if flags not in self._steps:
      self._steps[flags] = jax.jit(functools.partial(self._train_step, flags=flags),
                                   donate_argnums=(0,))
    return self._steps[flags]

  def lower_train_step(self, state: dict, batch: dict, key: jax.Array, *,
                       flags: StepFlags):
    """The lowered (not compiled, not run) step as ``train_step`` runs it (its text
    shows the matmul precision)."""
    with precision.matmul_precision(self.config.matmul_precision):
      return self._step_fn(flags).lower(state, batch, key)

  # --- mechanism diagnostics -----------------------------------------------------------
  def monitor_fn(self, attack_with_manifold: bool) -> Callable:
    """``diagnostics.monitor_outputs`` jitted (once per ``attack_with_manifold``), its
    outputs replicated."""
    if attack_with_manifold not in self._monitors:

      def monitor(state, x, y, key):
        self.trace_counts[("monitor", attack_with_manifold)] += 1
        return diag_lib.monitor_outputs(self, state, x, y, key,
                                        attack_with_manifold=attack_with_manifold)

      self._monitors[attack_with_manifold] = jax.jit(
          monitor, out_shardings=mesh_lib.replicated(self.mesh))
    return self._monitors[attack_with_manifold]

  # --- evaluation -----------------------------------------------------------------------
  def inference_logits(self, params, batch_stats, x):
    logits = ic.apply_logits(self.graphdef, params, batch_stats, x, train=False)[0]
    return methods.inference_logits(self.method, logits, self._counts_f32)

  @functools.cached_property
  def _eval_fn(self):
    cfg = self.config

    @functools.partial(jax.jit, static_argnames=("num_steps",))
    def predict(params, batch_stats, x, y, key, num_steps):
      logits_fn = functools.partial(self.inference_logits, params, batch_stats)
      if num_steps:
        x = linf.pgd_attack(lambda xa: cl.softmax_cross_entropy(logits=logits_fn(xa), labels=y),
                            x, epsilon=cfg.epsilon, step_size=cfg.attack_step_size,
                            num_steps=num_steps, key=key, random_start=True)
      return jnp.argmax(logits_fn(x), -1)

    return predict

  def evaluate(self, state: dict, batches, *, pgd_steps: int = 20, seed: int = 0) -> dict:
    """Clean and PGD-``pgd_steps`` long-tail accuracy blocks over eval batches."""
    c = self.num_classes
    correct = {"clean": np.zeros(c, np.int64), f"pgd{pgd_steps}": np.zeros(c, np.int64)}
    total = np.zeros(c, np.int64)
    for i, batch in enumerate(batches):
      dev = mesh_lib.shard_batch({"image": batch["image"], "label": batch["label"]}, self.mesh)
      key = jax.random.fold_in(jax.random.key(seed), i)
      # Multi-process: predictions, labels and mask of the *global* batch on every process.
      labels, mask = multihost.gather_process_local((batch["label"], batch["mask"]))
      for name, steps in (("clean", 0), (f"pgd{pgd_steps}", pgd_steps)):
        with precision.evaluation_precision():
          pred = multihost.to_host(self._eval_fn(state["params"], state["batch_stats"],
                                                 dev["image"], dev["label"], key, steps))
        ok, tot = class_accuracy.per_class_counts(pred, labels, mask, c)
        correct[name] += ok
      total += tot
    return {k: class_accuracy.accuracy_block(v, total, self.class_counts)
            for k, v in correct.items()}

  # --- the loop -------------------------------------------------------------------------
  def step_key(self, epoch: int, step: int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(self.config.seed + 1), epoch),
                              step)

  def run_info(self) -> dict:
    """Everything the trained state depends on (trainer_config.json; also the
    checkpoints' fingerprint, so a checkpoint of another config is refused)."""
    return {"config": dataclasses.asdict(self.config),
            "method": dataclasses.asdict(self.method),
            "num_classes": self.num_classes,
            "class_counts": self.class_counts.tolist(),
            "model_kwargs": self.model_kwargs()}

  def checkpoint_fingerprint(self) -> dict:
    """``run_info`` and the steps per epoch, less the diagnostics settings: they only
    add records (the trained state is the same with them on or off, tested), so a run
    may resume with them switched, and checkpoints from before they existed resume."""
    info = self.run_info()
    config = {k: v for k, v in info["config"].items() if k not in DIAGNOSTICS_FIELDS}
    return dict(info, config=config, steps_per_epoch=self.steps_per_epoch)

  def save_config(self, workdir: str) -> None:
    info = self.run_info()
    os.makedirs(workdir, exist_ok=True)
    if mesh_lib.is_primary_process():
      with open(os.path.join(workdir, TRAINER_CONFIG_FILE), "w") as f:
        json.dump(info, f, indent=2, default=str)

  def write_scalars(self, workdir: str, step: int, scalars: dict) -> None:
    """Appends ``scalars`` at ``step`` to the TensorBoard event files in ``workdir``
    (e.g. the final test evaluation; process 0 only)."""
    with ScalarWriter(workdir, enabled=mesh_lib.is_primary_process()) as writer:
      writer.write(step, scalars)

  def fit(self, pipeline, workdir: str, *, logger: ProgressLogger | None = None,
          stop_after_epoch: int | None = None, monitor_batches: Callable[[], Any] | None = None,
          monitor_every: int = 0, monitor_pgd_steps: int = 10,
          progress_every_seconds: float = 10.0) -> tuple[dict, dict]:
    """Trains ``num_epochs`` (resuming from ``workdir/checkpoints``); returns (state, info).

    ``pipeline.epoch(e)`` yields host batches ``{"image", "label"}``. ``stop_after_epoch``
    ends the run early after that epoch (used to test resume).

    Progress: a line every ``progress_every_seconds`` (step, epoch, loss, images/s, ETA;
    ``training.progress``), one line per epoch (``logger``). Every epoch's scalars go to
    TensorBoard event files in ``workdir`` (``training.tensorboard_writer``), at the
    global step of the epoch's end: ``train/*`` (epoch means of the step metrics, the
    learning rate, images/s) and ``train_adv/{overall,balanced,many,medium,few,tail}``
    (accuracy on the adversarial training examples, per class group). With
    ``monitor_batches`` (a callable returning eval batches, e.g. a small test subset)
    and ``monitor_every`` = k > 0, every k-th epoch and the last one are also evaluated
    clean and under PGD-``monitor_pgd_steps``: ``monitor/clean/*``,
    ``monitor/pgd<k>/*`` (same keys); ``info["monitor"]`` holds the history.
    With ``config.diagnostics``, ``info["diagnostics"]`` is the per-epoch list of
    ``diagnostics.epoch_diagnostics`` entries (each with its ``epoch``), also written to
    ``workdir/diagnostics.json`` after every epoch, kept in the checkpoints' meta (so a
    resumed run has the whole history) and logged as ``diag/<group>/<name>``.
    """
    store = CheckpointStore(os.path.join(workdir, "checkpoints"),
                            fingerprint=self.checkpoint_fingerprint())
    state = self.init_state()
    start_epoch, train_seconds = 0, 0.0
    # Refused (ConfigError) before trainer_config.json is overwritten: a checkpoint of
    # another config, or a corrupt one.
    restored = store.restore_latest(state)
    self.save_config(workdir)
    diag_hist = []
    if restored is not None:
      state, meta = restored
      start_epoch, train_seconds = meta["epoch"] + 1, meta["train_seconds"]
      diag_hist = list(meta.get("diagnostics") or [])
    monitor = None
    if self.config.diagnostics:
      monitor = diag_lib.make_monitor(self, pipeline.images, pipeline.labels)
    primary = mesh_lib.is_primary_process()
    logger = logger or ProgressLogger(f"longtail:{self.method.name}", enabled=primary)
    spe, epochs = self.steps_per_epoch, self.config.num_epochs
    progress = StepProgress(f"longtail:{self.method.name}", total_steps=epochs * spe,
                            images_per_step=self.config.batch_size, num_epochs=epochs,
                            every_seconds=progress_every_seconds,
                            enabled=primary and progress_every_seconds >= 0)
    writer = ScalarWriter(workdir, enabled=primary)
    schedule = learning_rate_schedule(self.config, spe)
    metrics_hist, monitor_hist = {}, []
    for epoch in range(start_epoch, epochs):
      flags = self.step_flags(epoch)
      t0 = time.perf_counter()
      # No host sync per step: the step metrics stay on device and are fetched once at
      # the epoch's end (a progress line reads its two scalars only when it prints),
      # and the next batch is copied to the devices while the current step runs.
      step_metrics = []
      for step, dev in enumerate(self._device_batches(pipeline.epoch(epoch))):
        state, metrics = self.train_step(state, dev, self.step_key(epoch, step), flags=flags)
        step_metrics.append(metrics)
        progress.update(epoch * spe + step + 1, epoch, loss=_OnPrint(metrics["loss"]),
                        adv_train_acc=_OnPrint(metrics["adv_train_acc"]))
      sums, class_sums, diag_sums, n = epoch_metrics.epoch_sums(multihost.to_host(step_metrics))
      seconds = time.perf_counter() - t0
      train_seconds += seconds
      metrics_hist = {k: v / max(n, 1) for k, v in sums.items()}
      logger.log(epoch, examples=n * self.config.batch_size, seconds=seconds, **metrics_hist)
      global_step = (epoch + 1) * spe
      scalars = {f"train/{k}": v for k, v in metrics_hist.items()}
      scalars.update({"train/learning_rate": float(schedule(global_step - 1)),
                      "train/images_per_second": n * self.config.batch_size / seconds,
                      "train/epoch_seconds": seconds})
      train_block = class_accuracy.accuracy_block(class_sums["adv_correct"],
                                                  class_sums["seen"], self.class_counts)
      scalars.update(epoch_metrics.group_scalars("train_adv", train_block))
      last = epoch == epochs - 1 or (stop_after_epoch is not None and epoch >= stop_after_epoch)
      if monitor_batches is not None and monitor_every > 0 and (
          (epoch + 1) % monitor_every == 0 or last):
        blocks = self.evaluate(state, monitor_batches(), pgd_steps=monitor_pgd_steps,
                               seed=self.config.seed)
        monitor_hist.append({"epoch": epoch, **blocks})
        for name, block in blocks.items():
          scalars.update(epoch_metrics.group_scalars(f"monitor/{name}", block))
        logger.log(epoch, **{f"monitor_{name}_balanced": b["balanced"]
                             for name, b in blocks.items()})
      if monitor is not None:
        entry = {"epoch": epoch, **diag_lib.epoch_diagnostics(
            self, state, monitor, attack_with_manifold=flags.attack_with_manifold,
            inner=({k: v / max(n, 1) for k, v in diag_sums.items()}
                   if self.config.diagnostics_in_step else None))}
        diag_hist.append(entry)
        scalars.update(diag_lib.flatten(entry))
        if primary:
          reporting.write_json(os.path.join(workdir, DIAGNOSTICS_FILE), diag_hist)
      writer.write(global_step, scalars)
      writer.flush()
      store.save(epoch, state, {"epoch": epoch, "train_seconds": train_seconds,
                                "metrics": metrics_hist, "diagnostics": diag_hist})
      if stop_after_epoch is not None and epoch >= stop_after_epoch:
        break
    writer.close()
    store.close()
    return state, {"train_seconds": train_seconds, "last_epoch_metrics": metrics_hist,
                   "monitor": monitor_hist, "diagnostics": diag_hist}


  def _device_batches(self, host_batches):
    """Host batches -> batches on the mesh, one ahead: batch i+1's copy is issued
    before batch i is handed out, so it overlaps step i's compute."""
    it = iter(host_batches)
    first = next(it, None)
    if first is None:
      return
    ahead = mesh_lib.shard_batch(first, self.mesh)
    for batch in it:
      current, ahead = ahead, mesh_lib.shard_batch(batch, self.mesh)
      yield current
    yield ahead


class _OnPrint:
  """A device scalar formatted (and so fetched) only when a progress line prints it."""

  def __init__(self, value):
    self.value = value

  def __format__(self, spec: str) -> str:
    return format(float(self.value), spec or ".4f")

  __str__ = lambda self: format(self, ".4f")
