"""The one training loop for recommenders (METHODS.md A.3), with a pluggable loss.

Protocol: BPR with one uniformly sampled non-train negative per train pair, Adam
(lr 1e-3), batch 2048, model selection on valid Recall@20, early stop after
``patience`` (20) epochs without improvement, full-ranking evaluation.

The loss seam
-------------
The trainer minimises ``loss_fn(model, batch, features, key) -> (loss, aux)``:

* ``model``: the recommender, merged from the current parameters (an NNX module);
* ``batch``: ``{"users", "pos", "neg": int32 (B,), "mask": float32 (B,)}`` (mask 0 marks
  the padding rows of an epoch's last batch);
* ``features``: raw features of all items ``{m: (n_items, d_m)}``;
* ``key``: a PRNG key unique to (seed, epoch, step);
* ``aux``: a dict of scalars, averaged over the epoch into the progress line.

``config.loss`` picks it by name (:func:`resolve_loss_fn`): ``"bpr"`` is
:func:`uatmc_jax.recsys.losses.bpr_objective`; a defence name (``vanilla``, ``apr``,
``amr``, ``uat_mc_no_align``, ``uat_mc``) is looked up in the one defence registry,
``uatmc_jax.recsys.defences.registry``, so a defence adds a registry entry, not a
trainer. A callable may also be passed directly. Which parameters train is
an NNX filter (``trainable``, default every ``nnx.Param``), e.g. UAT-MC freezes the
projection MLPs with ``nnx.All(nnx.Param, nnx.Not(nnx.PathContains("projectors")))``.

Speed: one jitted ``lax.scan`` runs a whole epoch (no per-step dispatch), with the
parameters and optimiser state donated; a background thread samples the next epoch's
batches while the device runs the current one, and each process samples only its own
batch columns. Data parallelism: the epoch's batch columns
are sharded over the mesh ``data`` axis, features and small parameters are replicated;
XLA inserts the gradient all-reduce. Model axis: the ID tables and their Adam moments
are split by rows over the mesh ``model`` axis (``param_sharding`` rules,
``core/parallel/sharding_rules.py``); ``recsys.train_job.train_and_evaluate`` builds
the model with its tables padded to a multiple of that axis and created sharded
(``build_sharded_recommender``), the Adam moments are created on their shardings, and a
table that cannot split as asked is a ConfigError (docs/scale.md).

Reproducibility and resume: every random draw is a function of (seed, epoch, step)
(host-side negatives from ``np.random.default_rng((seed, epoch))``, loss keys from
``fold_in``), a checkpoint (state + epoch + early-stopping record) is written after
every epoch plus the best one; a restarted run continues from the newest checkpoint
and ends with the same metrics as an uninterrupted run.
"""
from __future__ import annotations

import concurrent.futures
import functools
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from uatmc_jax.core.checkpointing import CheckpointStore
from uatmc_jax.core.errors import ConfigError
from uatmc_jax.core.metric_writer import ScalarWriter
from uatmc_jax.core.parallel import mesh as mesh_lib
from uatmc_jax.core.parallel import multihost, precision, sharding_rules
from uatmc_jax.core.reporting import ProgressLogger
from uatmc_jax.recsys.data.interactions import InteractionData
from uatmc_jax.recsys.data.sampling import NegativeSampler, epoch_batches
from uatmc_jax.recsys.defences.registry import DEFENCES, make_defence_loss
from uatmc_jax.recsys.losses import LossFn, make_bpr_objective
from uatmc_jax.recsys.metrics import DEFAULT_KS, RankingEvaluator

# Config keys a resumed run may change (everything else must match the checkpoint's).
RESUMABLE_CHANGES = ("log", "eval_batch_size", "epochs", "patience", "ks")
TRAIN_DEFAULTS = dict(
    loss="bpr", reg_weight=1e-4, learning_rate=1e-3, batch_size=2048, epochs=1000,
    patience=20, seed=999, selection_metric="recall@20", eval_batch_size=2048,
    ks=DEFAULT_KS, log=True, matmul_precision=precision.DEFAULT_TRAIN_MATMUL_PRECISION)


def resolve_loss_fn(config: Mapping[str, Any]) -> LossFn:
  """``config["loss"]`` -> loss function (see the module docstring)."""
  name = config.get("loss", "bpr")
  if name == "bpr":
    return make_bpr_objective(config)
  if name not in DEFENCES:
    raise ConfigError(f"loss {name!r} is unknown (no module of that name in the defence "
                      f"registry); expected 'bpr' or a defence of {list(DEFENCES)}")
  return make_defence_loss(name, config)


@functools.lru_cache(maxsize=None)
def _adam(learning_rate: float) -> optax.GradientTransformation:
  """One optimiser object per learning rate, so trainers share compiled epochs."""
  return optax.adam(learning_rate)


# Retrace guard (the role of chex.assert_max_traces, which keys on the definition site and
# so cannot tell trainers apart): traces of the epoch per (mesh, graphdef, tx, loss_fn,
# epoch shape) -- one trainer configuration must compile its epoch exactly once.
_EPOCH_TRACES: dict = {}


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(4, 5))
def _run_epoch(mesh, graphdef, tx, loss_fn, params, opt_state, rest, features, batches, key):
  """Runs every batch of an epoch (leading axis of ``batches``) with ``lax.scan``.

  Returns:
    (params, opt_state, {"loss", *aux: epoch means over real rows}).
  """
  static = (mesh, graphdef, tx, loss_fn, batches["users"].shape,
            jax.config.jax_default_matmul_precision)  # part of jit's cache key too
  _EPOCH_TRACES[static] = _EPOCH_TRACES.get(static, 0) + 1
  if _EPOCH_TRACES[static] > 1:
    raise AssertionError("the jitted training epoch was traced twice: a shape, dtype or "
                         "sharding of its inputs changed between epochs")

  def step(carry, inputs):
    params, opt_state = carry
    batch, step_key = inputs

    def objective(p):
      return loss_fn(nnx.merge(graphdef, p, rest), batch, features, step_key)

    (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    real = jnp.sum(batch["mask"])
    return (params, opt_state), (loss * real, jax.tree.map(lambda a: a * real, aux), real)

  n_steps = batches["users"].shape[0]
  keys = jax.vmap(lambda s: jax.random.fold_in(key, s))(jnp.arange(n_steps))
  (params, opt_state), (losses, auxes, reals) = jax.lax.scan(
      step, (params, opt_state), (batches, keys))
  total = jnp.sum(reals)
  stats = {"loss": jnp.sum(losses) / total}
  stats.update({k: jnp.sum(v) / total for k, v in auxes.items()})
  return params, opt_state, stats


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, params, rest, features):
  """(user vectors, item vectors) of a split model from raw features."""
  model = nnx.merge(graphdef, params, rest)
  return model.encode(model.project(features))


def _cfg(config: Mapping[str, Any] | None) -> dict:
  out = dict(TRAIN_DEFAULTS)
  out.update({k: v for k, v in dict(config or {}).items() if v is not None})
  return out


class RecsysTrainer:
  """Trains a recommender on an :class:`InteractionData` with early stopping.

  Args:
    model: a recommender (``uatmc_jax.recsys.models.base`` protocol); its current
      weights are the starting point (so a trained backbone can be fine-tuned).
    data: the dataset.
    config: mapping overriding ``TRAIN_DEFAULTS`` (plus whatever the loss reads).
    workdir: checkpoint directory (``<workdir>/checkpoints``); None = no checkpoints.
    mesh: device mesh (default: all devices on the data axis).
    loss_fn: overrides ``config["loss"]``.
    trainable: NNX filter of the parameters to train.
  """

  def __init__(self, model, data: InteractionData, config: Mapping[str, Any] | None = None,
               workdir: str | None = None, mesh: jax.sharding.Mesh | None = None,
               loss_fn: LossFn | None = None, trainable: Any = nnx.Param):
    self.config = _cfg(config)
    self.data = data
    self.mesh = mesh if mesh is not None else mesh_lib.make_mesh()
    self.loss_fn = loss_fn if loss_fn is not None else resolve_loss_fn(self.config)
    # compute_dtype="bfloat16": bf16 forward/backward, float32 params and Adam state.
    self.loss_fn = precision.mixed_precision_loss(
        self.loss_fn, precision.Policy.from_name(self.config.get("compute_dtype")))
    # Training matmuls at config["matmul_precision"] (precision.MATMUL_PRECISIONS);
    # evaluation always ranks at float32 "highest" (recsys/metrics.py).
    self.matmul_precision = precision.check_matmul_precision(
        self.config.get("matmul_precision"))
    self.batch_size = int(self.config["batch_size"])
    n_data = mesh_lib.data_axis_size(self.mesh)
    if self.batch_size % n_data:
      raise ConfigError(f"batch_size {self.batch_size} must be a multiple of the mesh data "
                        f"axis ({n_data} devices)")
    self.seed = int(self.config["seed"])
    self.sampler = NegativeSampler(data.train, data.n_users, data.n_items)

    self.graphdef, params, rest = nnx.split(model, trainable, ...)
    self.tx = _adam(float(self.config["learning_rate"]))
    replicate = lambda t: mesh_lib.replicate(t, self.mesh)
    # Placement from config: user/item tables (and their Adam moments) split by rows over
    # the mesh `model` axis, the rest replicated (uatmc_jax.core.parallel.sharding_rules);
    # a table that does not split as asked raises ConfigError. A model created sharded
    # (build_sharded_recommender) is kept where it is.
    rules = self.config.get("param_sharding", sharding_rules.RECSYS_TABLE_RULES)
    place = lambda t: sharding_rules.shard_tree(t, self.mesh, rules)
    self.params = place(params)
    self.rest = place(rest)
    # Adam's moments are created on their shardings: no device holds a whole moment.
    opt_shardings = sharding_rules.tree_shardings(
        jax.eval_shape(self.tx.init, self.params), self.mesh, rules)
    self.opt_state = jax.jit(self.tx.init, out_shardings=opt_shardings)(self.params)
    self.features = replicate({m: jnp.asarray(x, jnp.float32) for m, x in data.features.items()})
    self._epoch_sharding = NamedSharding(self.mesh, P(None, mesh_lib.DATA_AXIS))

    ks = tuple(self.config["ks"])
    eval_bs = int(self.config["eval_batch_size"])
    self.evaluators = {s: RankingEvaluator(data, s, ks, eval_bs, mesh=self.mesh)
                       for s in ("valid", "test")}
    self._static = (self.mesh, self.graphdef, self.tx, self.loss_fn)
    # The settings the saved state depends on: a resume under others is refused
    # (core/checkpointing.py). Stopping rule, metric cut-offs and logging may change.
    fingerprint = {k: v for k, v in self.config.items() if k not in RESUMABLE_CHANGES}
    self.store = (CheckpointStore(f"{workdir}/checkpoints", fingerprint=fingerprint)
                  if workdir else None)
    self.workdir = workdir
    self.logger = ProgressLogger(f"{data.name}/{type(model).__name__}",
                                 enabled=bool(self.config["log"]))
    self.record = {"epoch": -1, "best_epoch": -1, "best_metric": -float("inf"),
                   "bad_epochs": 0, "stopped_early": False, "train_seconds": 0.0,
                   "history": []}
    self._best_params = None
    # one background thread samples the next epoch while the device runs this one
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="epoch-prefetch")
    self._prefetch: dict = {}

  # -- pure functions -------------------------------------------------------
  def _encode_fn(self, params, rest, features):
    return _encode(self.graphdef, params, rest, features)

  @property
  def epoch_traces(self) -> int:
    """How often the jitted epoch was traced for this (model, optimiser, loss)."""
    n_batches = -(-self.data.train.shape[0] // self.batch_size)
    prec = None if self.matmul_precision == "default" else self.matmul_precision
    return _EPOCH_TRACES.get(self._static + ((n_batches, self.batch_size), prec), 0)

  # -- state ----------------------------------------------------------------
  @property
  def model(self):
    """The recommender with the current parameters (a fresh NNX module)."""
    return nnx.merge(self.graphdef, self.params, self.rest)

  def _state(self):
    return {"params": self.params, "opt_state": self.opt_state, "rest": self.rest}

  def _set_state(self, state):
    self.params, self.opt_state, self.rest = state["params"], state["opt_state"], state["rest"]

  def _checkpoint_tree(self):
    leaves = jax.tree.leaves(self._state())
    return {f"{i:05d}": leaf for i, leaf in enumerate(leaves)}

  def _from_checkpoint_tree(self, tree):
    treedef = jax.tree.structure(self._state())
    self._set_state(jax.tree.unflatten(treedef, [tree[k] for k in sorted(tree)]))

  def restore(self, which: str = "latest") -> bool:
    """Loads the newest (or best) checkpoint into the trainer; False when none exists."""
    if self.store is None:
      return False
    fn = self.store.restore_latest if which == "latest" else self.store.restore_best
    out = fn(self._checkpoint_tree())
    if out is None:
      return False
    tree, meta = out
    self._from_checkpoint_tree(tree)
    if which == "latest":
      self.record = dict(meta)
    return True

  # -- evaluation -----------------------------------------------------------
  def vectors(self) -> tuple[jax.Array, jax.Array]:
    """(user vectors, item vectors) of the current parameters."""
    return _encode(self.graphdef, self.params, self.rest, self.features)

  def evaluate(self, split: str) -> dict[str, float]:
    """Full-ranking metrics of the current parameters on "valid" or "test"."""
    return self.evaluators[split].evaluate(*self.vectors())

  # -- training -------------------------------------------------------------
  def _host_epoch(self, epoch: int) -> dict[str, np.ndarray]:
    """This process's columns of the epoch's batches (all of them on one process):
    only its share is sampled (recsys/data/sampling.py)."""
    if jax.process_count() == 1:
      return epoch_batches(self.sampler, self.data.train, self.batch_size, self.seed, epoch)
    n_batches = -(-self.data.train.shape[0] // self.batch_size)
    box, contiguous = multihost._local_box(self._epoch_sharding,
                                           (n_batches, self.batch_size))
    if not contiguous:
      raise ConfigError("this process's devices do not hold one contiguous block of batch "
                        "columns; order the mesh's data axis by process")
    share = epoch_batches(self.sampler, self.data.train, self.batch_size, self.seed, epoch,
                          columns=box[1])
    return {"share": share, "box": box}

  def _next_host_epoch(self, epoch: int):
    """The host batches of ``epoch``: from the background prefetch when it was started,
    and the next epoch's sampling started behind it (overlaps this epoch's device work)."""
    pending = self._prefetch.pop(epoch, None)
    host = pending.result() if pending is not None else self._host_epoch(epoch)
    self._prefetch.clear()
    if epoch + 1 < int(self.config["epochs"]):
      self._prefetch[epoch + 1] = self._pool.submit(self._host_epoch, epoch + 1)
    return host

  def _device_epoch(self, epoch: int):
    host = self._next_host_epoch(epoch)
    if jax.process_count() == 1:
      return jax.device_put(host, self._epoch_sharding)
    n_batches = -(-self.data.train.shape[0] // self.batch_size)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(
            self._epoch_sharding, np.ascontiguousarray(x), (n_batches, self.batch_size)),
        host["share"])

  def _epoch_args(self, epoch: int) -> tuple:
    key = jax.random.fold_in(jax.random.key(self.seed), epoch)
    return (*self._static, self.params, self.opt_state, self.rest, self.features,
            self._device_epoch(epoch), key)

  def lower_epoch(self, epoch: int = 0):
    """The lowered (not compiled, not run) training epoch, as :meth:`train_epoch` builds
    it (its text shows the matmul precision, its ``compile().memory_analysis()`` the
    memory)."""
    with precision.matmul_precision(self.matmul_precision):
      return _run_epoch.lower(*self._epoch_args(epoch))

  def train_epoch(self, epoch: int) -> dict[str, float]:
    """One epoch of updates; returns the epoch's mean loss terms."""
    with precision.matmul_precision(self.matmul_precision):
      self.params, self.opt_state, stats = _run_epoch(*self._epoch_args(epoch))
    return {k: float(v) for k, v in jax.device_get(stats).items()}

  def fit(self, max_new_epochs: int | None = None) -> dict:
    """Trains until early stopping or ``epochs``; resumes from the newest checkpoint.

    Args:
      max_new_epochs: stop after this many epochs in this call (as if the process were
        killed; a later ``fit`` resumes). None = run to the end.

    Returns:
      the early-stopping record: ``epoch`` (last finished), ``best_epoch``,
      ``best_metric``, ``stopped_early``, ``train_seconds`` and a per-epoch ``history``.
    """
    if self.restore("latest"):
      self.logger.log(self.record["epoch"], resumed="from checkpoint")
    # TensorBoard scalars under the workdir (process 0): train/<loss term> and
    # valid/<metric@K> per epoch (core/metric_writer.py; `tensorboard --logdir <workdir>`).
    writer = ScalarWriter(self.workdir, enabled=bool(self.workdir) and
                          mesh_lib.is_primary_process())
    metric = self.config["selection_metric"]
    max_epochs, patience = int(self.config["epochs"]), int(self.config["patience"])
    n_train = int(self.data.train.shape[0])
    epoch = self.record["epoch"] + 1
    done = 0
    while not self.record["stopped_early"] and epoch < max_epochs:
      if max_new_epochs is not None and done >= max_new_epochs:
        break
      t0 = time.perf_counter()
      stats = self.train_epoch(epoch)
      t_train = time.perf_counter() - t0
      valid = self.evaluate("valid")
      seconds = time.perf_counter() - t0
      rec = self.record
      improved = valid[metric] > rec["best_metric"]
      if improved:
        rec.update(best_metric=valid[metric], best_epoch=epoch, bad_epochs=0)
        if self.store is None:  # keep the best weights in memory instead
          self._best_params = jax.tree.map(jnp.copy, self.params)
      else:
        rec["bad_epochs"] += 1
      rec["epoch"] = epoch
      rec["train_seconds"] += seconds
      rec["history"].append({"epoch": epoch, **stats, f"valid_{metric}": valid[metric],
                             "seconds": seconds})
      rec["stopped_early"] = rec["bad_epochs"] >= patience
      if self.store is not None:
        self.store.save(epoch, self._checkpoint_tree(), rec, is_best=improved)
      self.logger.log(epoch, examples=n_train, seconds=t_train, loss=stats["loss"],
                      **{f"valid_{metric}": valid[metric]}, best_epoch=rec["best_epoch"])
      writer.write(epoch, {**{f"train/{k}": v for k, v in stats.items()},
                           "train/epoch_seconds": seconds,
                           **{f"valid/{k}": v for k, v in valid.items()}})
      writer.flush()
      epoch += 1
      done += 1
    writer.close()
    return self.record

  def restore_best(self) -> None:
    """Loads the best checkpoint (selection on valid) into the trainer, if any."""
    if self.store is not None and self.store.best_epoch() is not None:
      self.restore("best")
    elif self._best_params is not None:
      self.params = self._best_params
