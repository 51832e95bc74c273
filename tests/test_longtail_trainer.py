"""Long-tail AT methods and trainer: composition, perturbation budgets, smoke, resume."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uatmc_jax.data.image_pipeline import TrainPipeline, eval_batches
from uatmc_jax.errors import ConfigError
from uatmc_jax.evaluation import class_accuracy
from uatmc_jax.objectives import classification_losses as cl
from uatmc_jax.training import longtail_methods as lm
from uatmc_jax.training import longtail_trainer as lt

TINY_MODEL = dict(widths=(4, 8))


def test_method_registry_and_composition():
  assert set(lm.METHODS) == {"pgd_at", "trades", "mart", "at_bsl", "robal", "mcat"}
  mcat = lm.resolve_method("mcat")
  assert (mcat.inner_loss, mcat.outer_loss, mcat.etf_weight, mcat.manifold_weight) == (
      "ce", "ce", 0.01, 0.1)
  combo = lm.resolve_method("trades+etf")
  assert (combo.inner_loss, combo.outer_loss, combo.etf_weight, combo.manifold_weight) == (
      "kl", "trades", 0.01, 0.0)
  combo = lm.resolve_method("at_bsl", manifold_weight=0.3)
  assert combo.outer_loss == "balanced_ce" and combo.uses_manifold
  assert lm.resolve_method("mcat", etf_weight=0.0, manifold_weight=0.0).uses_manifold is False
  for bad in ("nope", "trades+foo"):
    with pytest.raises(ConfigError):
      lm.resolve_method(bad)
  with pytest.raises(ConfigError):
    lm.resolve_method("pgd_at", etf_weight=-1.0)


def test_outer_losses_are_their_formulas():
  k = jax.random.split(jax.random.key(0), 4)
  adv, clean = jax.random.normal(k[0], (6, 4)), jax.random.normal(k[1], (6, 4))
  y = jax.random.randint(k[2], (6,), 0, 4)
  w = jax.random.normal(k[3], (4, 5))
  counts = jnp.array([100., 30., 10., 3.])
  kw = dict(adv_logits=adv, labels=y, clean_logits=clean, class_counts=counts,
            classifier_weight=w)
  from uatmc_jax.objectives import etf
  cases = {
      "pgd_at": cl.softmax_cross_entropy(logits=adv, labels=y).mean(),
      "at_bsl": cl.softmax_cross_entropy(logits=adv + jnp.log(counts), labels=y).mean(),
      "trades": cl.trades_loss(clean_logits=clean, adv_logits=adv, labels=y, beta=6.).mean(),
      "mart": cl.mart_loss(clean_logits=clean, adv_logits=adv, labels=y, beta=6.).mean(),
      "mcat": cl.softmax_cross_entropy(logits=adv, labels=y).mean()
              + 0.01 * etf.etf_gram_penalty(w),
      "trades+etf": cl.trades_loss(clean_logits=clean, adv_logits=adv, labels=y).mean()
                    + 0.01 * etf.etf_gram_penalty(w),
  }
  for name, expected in cases.items():
    loss, _ = lm.outer_loss(lm.resolve_method(name), **kw)
    np.testing.assert_allclose(loss, expected, rtol=1e-5, err_msg=name)
  # RoBal: inference subtracts τ_p log π from s·cos
  robal = lm.resolve_method("robal")
  cos = jnp.tanh(adv)
  np.testing.assert_allclose(
      lm.inference_logits(robal, robal.robal_scale * cos, counts),
      robal.robal_scale * cos - robal.robal_tau_p * cl.log_prior(counts), rtol=1e-5)


def test_accuracy_block_groups():
  train_counts = np.array([500, 150, 90, 40, 15, 5])
  correct, total = np.array([9, 8, 5, 4, 2, 0]), np.full(6, 10)
  block = class_accuracy.accuracy_block(correct, total, train_counts)
  assert block["per_class"] == [0.9, 0.8, 0.5, 0.4, 0.2, 0.0]
  assert np.isclose(block["overall"], 28 / 60) and np.isclose(block["balanced"], 28 / 60)
  assert np.isclose(block["many"], 0.85) and np.isclose(block["medium"], 0.45)
  assert np.isclose(block["few"], 0.1) and np.isclose(block["tail"], 0.1)  # 2 rarest
  pred = np.array([0, 1, 1, 2, 0]); lab = np.array([0, 1, 2, 2, 1])
  c, t = class_accuracy.per_class_counts(pred, lab, np.array([1, 1, 1, 1, 0]), 3)
  np.testing.assert_array_equal(c, [1, 1, 1]); np.testing.assert_array_equal(t, [1, 1, 2])


def _tiny_data(n_per_class=(12, 8, 4), size=8, seed=0):
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(len(n_per_class)), n_per_class).astype(np.int32)
  base = rng.integers(0, 256, (len(n_per_class), 1, 1, 3))
  images = np.clip(base[labels] + rng.integers(-40, 40, (labels.size, size, size, 3)), 0, 255)
  return images.astype(np.uint8), labels


def _trainer(method_name, epochs=2, **overrides):
  images, labels = _tiny_data()
  counts = np.bincount(labels)
  config = lt.LongTailTrainConfig(model="small_cnn", model_kwargs=TINY_MODEL,
                                  num_epochs=epochs, batch_size=8,
                                  latent_dim=2, manifold_hidden_dim=8,
                                  manifold_warmup_epochs=1,
                                  **{"attack_steps": 2, **overrides})
  method = lm.resolve_method(method_name)
  pipe = TrainPipeline(images, labels, batch_size=8, seed=0, prefetch=0)
  trainer = lt.LongTailTrainer(config, method, num_classes=3, class_counts=counts,
                               steps_per_epoch=pipe.steps_per_epoch)
  return trainer, pipe, images, labels


@pytest.mark.parametrize("method", ["trades", "mcat"])
def test_adversarial_examples_stay_in_ball_and_box(method):
  trainer, _, images, labels = _trainer(method)
  state = trainer.init_state()
  x = jnp.asarray(images[:8], jnp.float32) / 255.
  y = jnp.asarray(labels[:8])
  x_adv = trainer.adversarial_examples(state, x, y, jax.random.key(0),
                                       attack_with_manifold=trainer.method.uses_manifold)
  assert float(jnp.abs(x_adv - x).max()) <= 8 / 255 + 1e-6
  assert float(x_adv.min()) >= 0. and float(x_adv.max()) <= 1.
  assert float(jnp.abs(x_adv - x).max()) > 4 / 255  # it moved


@pytest.mark.parametrize("method,official_start", [
    ("pgd_at", "uniform"), ("at_bsl", "uniform"), ("mcat", "uniform"),
    ("trades", "gaussian"), ("mart", "gaussian")])
def test_inner_attack_starts_where_the_official_code_does(method, official_start):
  """With 0 PGD steps the attack returns its start: TRADES and MART x + 0.001·N(0, 1)
  (their official code), the others uniform in the ε-ball (std ε/√3)."""
  trainer, _, images, labels = _trainer(method, attack_steps=0)
  assert trainer.method.attack_start == official_start
  x = jnp.asarray(images[:8], jnp.float32) / 255.
  x_adv = trainer.adversarial_examples(trainer.init_state(), x, jnp.asarray(labels[:8]),
                                       jax.random.key(0),
                                       attack_with_manifold=trainer.method.uses_manifold)
  eps = trainer.config.epsilon
  inside = (np.asarray(x) >= eps) & (np.asarray(x) <= 1 - eps)  # box never clips
  d = np.asarray(x_adv - x, np.float64)[inside]
  assert d.size > 1000 and np.abs(d).max() <= eps + 1e-6
  std = 1e-3 if official_start == "gaussian" else eps / np.sqrt(3.)
  assert abs(d.std() / std - 1.) < 0.1, d.std()
  assert abs(d.mean()) < 0.2 * std


def test_training_smoke_and_resume_equals_uninterrupted(tmp_path):
  trainer, pipe, images, labels = _trainer("mcat", manifold_refresh="every_step")
  full, info = trainer.fit(pipe, str(tmp_path / "full"))
  assert np.isfinite(info["last_epoch_metrics"]["loss"])
  assert "manifold_recon" in info["last_epoch_metrics"]
  # killed after epoch 0, restarted: the state comes back from the checkpoint on disk
  # (the same trainer object is reused only to share its compiled steps)
  trainer.fit(pipe, str(tmp_path / "resumed"), stop_after_epoch=0)
  resumed, _ = trainer.fit(pipe, str(tmp_path / "resumed"))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               full, resumed)
  # evaluation and the loader used by eval_robust
  blocks = trainer.evaluate(full, eval_batches(images, labels, batch_size=8), pgd_steps=2)
  assert set(blocks) == {"clean", "pgd2"} and len(blocks["clean"]["per_class"]) == 3
  assert blocks["pgd2"]["overall"] <= blocks["clean"]["overall"] + 1e-9
  loaded = lt.load_trained_classifier(str(tmp_path / "full"))
  x = jnp.asarray(images[:8], jnp.float32) / 255.
  ref = trainer.inference_logits(full["params"], full["batch_stats"], x)
  np.testing.assert_allclose(loaded.logits_fn(x), ref, rtol=1e-5, atol=1e-5)
