"""Long-tail trainer host work and matmul precision (trainer.fit, evaluation programs).

* fit fetches the step metrics once per epoch (no per-step host sync) and copies the
  next batch to the devices ahead: its metrics and state equal the per-step-sync loop's
  exactly;
* the training step runs at ``matmul_precision`` and every evaluation program at
  "highest" (uatmc_jax.core.parallel.precision): visible in the lowered text.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uatmc_jax.core.errors import ConfigError
from uatmc_jax.core.parallel import mesh as mesh_lib
from uatmc_jax.core.parallel import multihost
from uatmc_jax.longtail import methods as lm
from uatmc_jax.longtail import trainer as lt
from uatmc_jax.longtail.data.image_pipeline import TrainPipeline
from uatmc_jax.longtail.evaluation import robust_accuracy
from uatmc_jax.longtail.train_config import LongTailTrainConfig


def _tiny(epochs=2, **overrides):
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(3), (12, 8, 4)).astype(np.int32)
  base = rng.integers(0, 256, (3, 1, 1, 3))
  images = np.clip(base[labels] + rng.integers(-40, 40, (labels.size, 8, 8, 3)), 0, 255)
  images = images.astype(np.uint8)
  config = LongTailTrainConfig(model="small_cnn", model_kwargs=dict(widths=(4, 8)),
                               num_epochs=epochs, batch_size=8, attack_steps=1,
                               **overrides)
  pipe = TrainPipeline(images, labels, batch_size=8, seed=0, prefetch=0)
  trainer = lt.LongTailTrainer(config, lm.resolve_method("pgd_at"), num_classes=3,
                               class_counts=np.bincount(labels),
                               steps_per_epoch=pipe.steps_per_epoch)
  return trainer, pipe


def _per_step_sync_reference(trainer, pipe):
  """The loop as it was: every step's metrics fetched to the host right after it."""
  state = trainer.init_state()
  history = []
  for epoch in range(trainer.config.num_epochs):
    flags = trainer.step_flags(epoch)
    sums, diag_sums, class_sums, n = {}, {}, {"adv_correct": 0, "seen": 0}, 0
    for step, batch in enumerate(pipe.epoch(epoch)):
      dev = mesh_lib.shard_batch(batch, trainer.mesh)
      state, metrics = trainer.train_step(state, dev, trainer.step_key(epoch, step),
                                          flags=flags)
      per_class = multihost.to_host(metrics.pop("per_class"))
      for k, v in multihost.to_host(metrics.pop("diag")).items():
        diag_sums[k] = diag_sums.get(k, 0.0) + float(v)
      for k in class_sums:
        class_sums[k] = class_sums[k] + np.asarray(per_class[k], np.int64)
      for k, v in metrics.items():
        sums[k] = sums.get(k, 0.0) + float(v)
      n += 1
    history.append(({k: v / n for k, v in sums.items()}, class_sums,
                    {k: v / n for k, v in diag_sums.items()}))
  return state, history


def test_fit_without_per_step_sync_equals_the_per_step_loop(tmp_path):
  trainer, pipe = _tiny(epochs=2, diagnostics_in_step=True)
  ref_state, ref_hist = _per_step_sync_reference(trainer, pipe)
  state, info = trainer.fit(pipe, str(tmp_path / "w"), progress_every_seconds=0.0)
  assert info["last_epoch_metrics"] == ref_hist[-1][0]  # exact: same float64 sums
  assert set(info["last_epoch_metrics"]) >= {"loss", "adv_train_acc"}
  # the attack diagnostics: epoch means of the step values, like the metrics
  assert [e["inner"] for e in info["diagnostics"]] == [h[2] for h in ref_hist]
  assert set(ref_hist[-1][2]) == {"ce"}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["params"]),
               jax.device_get(ref_state["params"]))
  # every step ran: the epoch's per-class counts cover the whole training set
  np.testing.assert_array_equal(ref_hist[-1][1]["seen"], [12, 8, 4])


def test_device_batches_keep_order_and_count():
  trainer, pipe = _tiny()
  host = list(pipe.epoch(0))
  dev = list(trainer._device_batches(iter(host)))
  assert len(dev) == len(host) == pipe.steps_per_epoch
  for h, d in zip(host, dev):
    np.testing.assert_array_equal(np.asarray(d["image"]), h["image"])
    np.testing.assert_array_equal(np.asarray(d["label"]), h["label"])
  assert list(trainer._device_batches(iter([]))) == []


def test_progress_values_are_fetched_only_when_printed():
  v = lt._OnPrint(jnp.float32(0.123456))
  assert f"{v}" == "0.1235" and f"{v:.2f}" == "0.12"


def _has_highest(text):
  return "HIGHEST" in text or "highest" in text


def test_training_step_carries_matmul_precision():
  for name, expect in (("highest", True), ("default", False)):
    trainer, pipe = _tiny(matmul_precision=name)
    state = trainer.init_state()
    batch = mesh_lib.shard_batch(next(iter(pipe.epoch(0))), trainer.mesh)
    text = trainer.lower_train_step(state, batch, trainer.step_key(0, 0),
                                    flags=trainer.step_flags(0)).as_text()
    assert _has_highest(text) == expect, name
  with pytest.raises(ConfigError, match="matmul_precision"):
    _tiny(matmul_precision="bf16")


def test_evaluation_programs_carry_highest_precision():
  w = jax.random.normal(jax.random.key(0), (12, 3))
  logits_fn = lambda x: x.reshape(x.shape[0], -1) @ w
  x = np.random.default_rng(0).uniform(size=(4, 2, 2, 3)).astype(np.float32)
  y = np.zeros(4, np.int32)
  evaluator = robust_accuracy.RobustEvaluator(
      logits_fn, robust_accuracy.RobustEvalConfig(batch_size=4))
  for attack in ("clean", "pgd20", "cw"):
    assert _has_highest(evaluator.lower(attack, x, y).as_text()), attack
  # without the evaluation context the same program has no HIGHEST (the test bites)
  assert not _has_highest(jax.jit(logits_fn).lower(x).as_text())
