"""Long-tail AT methods and trainer: composition, perturbation budgets, smoke, resume."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uatmc_jax.core.errors import ConfigError
from uatmc_jax.longtail import losses as cl
from uatmc_jax.longtail import methods as lm
from uatmc_jax.longtail import trainer as lt
from uatmc_jax.longtail.data.image_pipeline import TrainPipeline, eval_batches
from uatmc_jax.longtail.evaluation import class_accuracy
from uatmc_jax.longtail.train_config import LongTailTrainConfig
from uatmc_jax.longtail.trained_classifier import load_trained_classifier

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


def _np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(1, keepdims=True)
  return z - np.log(np.exp(z).sum(1, keepdims=True))


def _np_ce(z, y):
  return -_np_log_softmax(z)[np.arange(len(y)), y]


def _np_kl_rows(p_logits, q_logits):
  """Σ_c p_c (log p_c − log q_c) per row: KL(softmax(p) || softmax(q))."""
  lp, lq = _np_log_softmax(p_logits), _np_log_softmax(q_logits)
  return (np.exp(lp) * (lp - lq)).sum(1)


def _np_etf_penalty(w):
  w = np.asarray(w, np.float64)
  wn = w / np.linalg.norm(w, axis=1, keepdims=True)
  c = len(w)
  target = np.where(np.eye(c, dtype=bool), 1., -1. / (c - 1))
  return ((wn @ wn.T - target) ** 2).mean()


def test_outer_losses_are_their_formulas():
  """Every outer loss against numpy written from the papers / official code."""
  k = jax.random.split(jax.random.key(0), 4)
  adv, clean = jax.random.normal(k[0], (6, 4)) * 2., jax.random.normal(k[1], (6, 4)) * 2.
  y = jax.random.randint(k[2], (6,), 0, 4)
  w = jax.random.normal(k[3], (4, 5))
  counts = jnp.array([100., 30., 10., 3.])
  kw = dict(adv_logits=adv, labels=y, clean_logits=clean, class_counts=counts,
            classifier_weight=w)
  a, c, yy, n = np.asarray(adv, np.float64), np.asarray(clean, np.float64), np.asarray(y), 6
  rows = np.arange(n)
  ce_adv = _np_ce(a, yy).mean()
  # TRADES, official: CE(f(x), y) batch mean + β·(1/B)·Σ_{b,c} p(x)(log p(x) − log p(x')).
  p_clean = np.exp(_np_log_softmax(c))
  trades = _np_ce(c, yy).mean() + 6. / n * np.sum(
      p_clean * (np.log(p_clean) - _np_log_softmax(a)))
  # MART, official: CE(f(x'), y) − log(1 − max_{k≠y} p_k(x')) (batch means) +
  # β·(1/B)·Σ_b KL_b(p(x) || p(x'))·(1 − p_y(x)).
  p_adv = np.exp(_np_log_softmax(a))
  p_wrong = np.where(np.eye(4, dtype=bool)[yy], -np.inf, p_adv).max(1)
  mart = (ce_adv - np.log(1. - p_wrong).mean()
          + 6. / n * np.sum(_np_kl_rows(c, a) * (1. - p_clean[rows, yy])))
  etf_term = 0.01 * _np_etf_penalty(w)
  cases = {
      "pgd_at": ce_adv,
      "at_bsl": _np_ce(a + np.log(np.asarray(counts)), yy).mean(),  # CE(z + log n, y)
      "trades": trades,
      "mart": mart,
      "mcat": ce_adv + etf_term,
      "trades+etf": trades + etf_term,
  }
  for name, expected in cases.items():
    loss, _ = lm.outer_loss(lm.resolve_method(name), **kw)
    np.testing.assert_allclose(loss, expected, rtol=1e-5, err_msg=name)
  # No term is negligible here: MART's boost and weighted KL, TRADES' KL, the ETF term.
  assert -np.log(1. - p_wrong).mean() > 0.1 and mart - ce_adv + np.log(1. - p_wrong).mean() > 0.1
  assert trades - _np_ce(c, yy).mean() > 0.1 and etf_term > 1e-3
  # RoBal: inference subtracts τ_p log π from s·cos
  robal = lm.resolve_method("robal")
  cos = np.tanh(a)
  log_pi = np.log(np.asarray(counts) / np.asarray(counts).sum())
  np.testing.assert_allclose(
      lm.inference_logits(robal, robal.robal_scale * jnp.asarray(cos), counts),
      robal.robal_scale * cos - robal.robal_tau_p * log_pi[None], rtol=1e-5, atol=1e-5)


def test_robal_kl_and_inner_losses_with_clean_not_adv():
  """RoBal's TRADES term and its inner (KL) objective on clean ≠ adv cosines, and the
  KL / CE inner objectives of the other methods, against numpy."""
  k = jax.random.split(jax.random.key(1), 3)
  cos_clean = jnp.tanh(jax.random.normal(k[0], (5, 4)))
  cos_adv = jnp.tanh(jax.random.normal(k[1], (5, 4)))
  y = jax.random.randint(k[2], (5,), 0, 4)
  counts = jnp.array([200., 40., 10., 2.])
  robal = lm.resolve_method("robal")
  s, tb, beta = robal.robal_scale, robal.robal_tau_b, robal.beta
  cc, ca, yy = np.asarray(cos_clean, np.float64), np.asarray(cos_adv, np.float64), np.asarray(y)
  nn = np.asarray(counts, np.float64)
  log_pi = np.log(nn / nn.sum())
  margins = robal.robal_max_margin * (nn.min() / nn) ** 0.25   # m_c ∝ n_c^(−1/4)
  adjusted = lambda cos: s * cos + tb * log_pi[None]           # no label margin
  with_margin = adjusted(ca) - s * np.eye(4)[yy] * margins[yy][:, None]
  kl = _np_kl_rows(adjusted(cc), adjusted(ca))
  assert kl.min() > 1e-3                                       # clean ≠ adv indeed
  expected_outer = (_np_ce(with_margin, yy) + beta * kl).mean()
  kw = dict(labels=y, class_counts=counts)
  loss, _ = lm.outer_loss(robal, adv_logits=s * cos_adv, clean_logits=s * cos_clean,
                          classifier_weight=jnp.eye(4), **kw)
  np.testing.assert_allclose(loss, expected_outer, rtol=1e-5)
  inner = lambda method, clean: lm.attack_head_loss(
      method, adv_logits=s * cos_adv, clean_logits=clean, **kw)
  np.testing.assert_allclose(inner(robal, s * cos_clean), kl, rtol=1e-5, atol=1e-5)
  # the clean side is a constant of the attack
  g = jax.grad(lambda cl_: inner(robal, cl_).sum())(s * cos_clean)
  np.testing.assert_array_equal(g, 0.)
  # TRADES: KL of the raw logits; CE methods: CE(f(x'), y) (clean logits unused).
  np.testing.assert_allclose(inner(lm.resolve_method("trades"), s * cos_clean),
                             _np_kl_rows(s * cc, s * ca), rtol=1e-5, atol=1e-5)
  for name in ("pgd_at", "mart", "at_bsl", "mcat"):
    np.testing.assert_allclose(inner(lm.resolve_method(name), None), _np_ce(s * ca, yy),
                               rtol=1e-5, atol=1e-5, err_msg=name)


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
  config = LongTailTrainConfig(model="small_cnn", model_kwargs=TINY_MODEL,
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
  loaded = load_trained_classifier(str(tmp_path / "full"))
  x = jnp.asarray(images[:8], jnp.float32) / 255.
  ref = trainer.inference_logits(full["params"], full["batch_stats"], x)
  np.testing.assert_allclose(loaded.logits_fn(x), ref, rtol=1e-5, atol=1e-5)
