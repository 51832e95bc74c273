"""Mechanism diagnostics of MCAT's terms (uatmc_jax.longtail.diagnostics), each against
a direct computation, and their per-epoch history in a training run."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uatmc_jax.core import metric_writer
from uatmc_jax.longtail import diagnostics as dg
from uatmc_jax.longtail import etf
from uatmc_jax.longtail import losses as cl
from uatmc_jax.longtail import manifold as ml
from uatmc_jax.longtail import methods as lm
from uatmc_jax.longtail import trainer as lt
from uatmc_jax.longtail.attacks import linf
from uatmc_jax.longtail.data.image_pipeline import TrainPipeline
from uatmc_jax.longtail.evaluation import geometry
from uatmc_jax.longtail.models import image_classifiers as ic
from uatmc_jax.longtail.train_config import LongTailTrainConfig

TINY_MODEL = dict(widths=(4, 8))


def _tiny_data(n_per_class=(12, 8, 4), size=8, seed=0):
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(len(n_per_class)), n_per_class).astype(np.int32)
  base = rng.integers(0, 256, (len(n_per_class), 1, 1, 3))
  images = np.clip(base[labels] + rng.integers(-40, 40, (labels.size, size, size, 3)), 0, 255)
  return images.astype(np.uint8), labels


def _trainer(method_name, epochs=2, method_kwargs=None, **overrides):
  images, labels = _tiny_data()
  config = LongTailTrainConfig(model="small_cnn", model_kwargs=TINY_MODEL,
                               num_epochs=epochs, batch_size=8, latent_dim=2,
                               manifold_hidden_dim=8,
                               **{"attack_steps": 3, "diagnostics_batch_size": 16,
                                  "manifold_warmup_epochs": 1, **overrides})
  method = lm.resolve_method(method_name, **(method_kwargs or {}))
  pipe = TrainPipeline(images, labels, batch_size=8, seed=0, prefetch=0)
  trainer = lt.LongTailTrainer(config, method, num_classes=3,
                               class_counts=np.bincount(labels),
                               steps_per_epoch=pipe.steps_per_epoch)
  return trainer, pipe, images, labels


def _batch(images, labels, n=8):
  return jnp.asarray(images[:n], jnp.float32) / 255., jnp.asarray(labels[:n])


def test_ms_pgd_diagnostics_equal_each_term_differentiated_separately():
  """Per PGD step, ∇_δ CE and ∇_δ λ·d_My by jax.grad of each term alone at the same δ;
  the step itself as plain linf.pgd_attack on the MS-PGD objective (the trainer's
  path without diagnostics): same x', same norms, ratios, sign flips, final values."""
  lam = 1.0
  trainer, _, images, labels = _trainer("mcat", method_kwargs=dict(manifold_weight=lam))
  cfg = trainer.config
  state = trainer.init_state()
  x, y = _batch(images[::3], labels[::3])
  key = jax.random.key(3)
  x_adv, aux = dg.inner_attack(trainer, state, x, y, key, attack_with_manifold=True)
  x_plain = trainer.adversarial_examples(state, x, y, key, attack_with_manifold=True)
  np.testing.assert_array_equal(np.asarray(x_adv), np.asarray(x_plain))

  feats, head_loss = trainer.attack_objective(state, x, y)
  params = ml.ManifoldParams(*state["manifold"]["params"])

  def ce(xa):
    return head_loss(feats(xa))

  def man(xa):
    return lam * ml.manifold_distance_from_features(
        params, feats(xa), y, num_steps=cfg.latent_steps, step_size=cfg.latent_step_size)

  x_cur = linf.linf_random_init(key, x, cfg.epsilon)
  ratios, n_ce, n_man, flips = [], [], [], []
  for _ in range(cfg.attack_steps):  # a reference loop over 3 steps
    g_ce = np.asarray(jax.grad(lambda z: jnp.sum(ce(z)))(x_cur), np.float64)
    g_man = np.asarray(jax.grad(lambda z: jnp.sum(man(z)))(x_cur), np.float64)
    a = np.linalg.norm(g_ce.reshape(len(y), -1), axis=1)
    b = np.linalg.norm(g_man.reshape(len(y), -1), axis=1)
    ratios.append(b / a); n_ce.append(a.mean()); n_man.append(b.mean())
    flips.append(np.mean(np.sign(g_ce - g_man) != np.sign(g_ce)))
    g = linf.loss_gradient(lambda z: ce(z) - man(z), x_cur)
    x_cur = linf.linf_project(linf.sign_gradient_step(x_cur, g, cfg.attack_step_size), x,
                              cfg.epsilon)
  np.testing.assert_array_equal(np.asarray(x_cur), np.asarray(x_adv))
  ratios = np.concatenate(ratios)
  assert float(aux["grad_norm_manifold"]) > 1e-3  # the term is not trivially zero here
  np.testing.assert_allclose(aux["grad_ratio_mean"], ratios.mean(), rtol=1e-4)
  np.testing.assert_allclose(aux["grad_ratio_median"], np.median(ratios), rtol=1e-4)
  np.testing.assert_allclose(aux["grad_norm_ce"], np.mean(n_ce), rtol=1e-4)
  np.testing.assert_allclose(aux["grad_norm_manifold"], np.mean(n_man), rtol=1e-4)
  # coordinates with |∇CE| ≈ |∇man| may round either way: a few in 10^3 at most
  np.testing.assert_allclose(aux["sign_flip_share"], np.mean(flips), atol=3e-3)
  np.testing.assert_allclose(aux["ce"], np.mean(ce(x_adv)), rtol=1e-5)
  np.testing.assert_allclose(aux["manifold_term"], np.mean(man(x_adv)), rtol=1e-5)


@pytest.mark.parametrize("method,key_name", [("pgd_at", "ce"), ("trades", "kl")])
def test_plain_attack_records_only_its_head_loss(method, key_name):
  """No manifold term: the step records the attack loss at x' and nothing else (no
  zeros standing in for a term the method does not have)."""
  trainer, _, images, labels = _trainer(method)
  state = trainer.init_state()
  x, y = _batch(images[::3], labels[::3])
  key = jax.random.key(0)
  x_adv, aux = dg.inner_attack(trainer, state, x, y, key, attack_with_manifold=False)
  np.testing.assert_array_equal(np.asarray(x_adv), np.asarray(
      trainer.adversarial_examples(state, x, y, key, attack_with_manifold=False)))
  assert set(aux) == {key_name}
  params, stats = state["params"], state["batch_stats"]
  logits = trainer.classify(params, stats, trainer.features_eval(params, stats, x_adv))
  if key_name == "ce":
    ref = cl.softmax_cross_entropy(logits=logits, labels=y)
  else:
    clean = trainer.classify(params, stats, trainer.features_eval(params, stats, x))
    ref = cl.kl_divergence(p_logits=clean, q_logits=logits)
  np.testing.assert_allclose(aux[key_name], np.mean(ref), rtol=1e-5)


def test_monitor_batch_is_fixed_and_spread_over_classes():
  images, labels = _tiny_data(n_per_class=(30, 9, 2))
  a = dg.monitor_batch(images, labels, size=12, num_classes=3, seed=5)
  b = dg.monitor_batch(images, labels, size=12, num_classes=3, seed=5)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(np.bincount(a[1], minlength=3), [5, 5, 2])
  c = dg.monitor_batch(images, labels, size=12, num_classes=3, seed=6)
  assert not np.array_equal(a[0], c[0])


def _etf_grad_closed_form(w):
  """∇_W mean((W̃W̃ᵀ − T)²) = (I − w̃w̃ᵀ)/‖w‖ · 4(G − T)W̃/C² row by row."""
  w = np.asarray(w, np.float64)
  c = w.shape[0]
  norms = np.linalg.norm(w, axis=1, keepdims=True)
  wt = w / norms
  t = np.full((c, c), -1. / (c - 1)) + (1. + 1. / (c - 1)) * np.eye(c)
  d_wt = 4. * (wt @ wt.T - t) @ wt / c**2
  return (d_wt - np.sum(d_wt * wt, 1, keepdims=True) * wt) / norms


def test_monitor_outputs_against_recomputed_attacks_and_closed_forms():
  """(b): both attacks recomputed outside the trainer with the monitor's key; (c): the
  W-gradient of the CE as (softmax − onehot)ᵀφ/B with φ the training-mode features of
  x', and of λ·L_ETF in closed form."""
  lam_geom = 0.5
  trainer, pipe, _, _ = _trainer("mcat", method_kwargs=dict(manifold_weight=10.,
                                                            etf_weight=lam_geom))
  state = trainer.init_state()
  mon = dg.make_monitor(trainer, pipe.images, pipe.labels)
  assert len(mon.labels) == 16
  x, y = jnp.asarray(mon.images), jnp.asarray(mon.labels)
  key = dg.monitor_key(trainer.config.seed)
  groups, geo = trainer.monitor_fn(True)(state, mon.device["image"], mon.device["label"], key)
  # "inner" is the training attack's own numbers on the monitor batch
  _, inner = dg.inner_attack(trainer, state, x, y, key, attack_with_manifold=True)
  assert set(groups["inner"]) == set(inner) and "manifold_term" in inner
  for k in inner:
    np.testing.assert_allclose(groups["inner"][k], inner[k], rtol=1e-5, err_msg=k)

  params, stats = state["params"], state["batch_stats"]
  x_pgd = trainer.adversarial_examples(state, x, y, key, attack_with_manifold=False)
  x_ms = trainer.adversarial_examples(state, x, y, key, attack_with_manifold=True)
  d = np.asarray(x_ms - x_pgd, np.float64).reshape(len(y), -1)
  b = groups["ms_pgd_vs_pgd"]
  assert float(b["linf"]) > 0  # λ_man = 10 moves MS-PGD away from PGD
  np.testing.assert_allclose(b["linf"], np.abs(d).max(1).mean(), rtol=1e-5)
  np.testing.assert_allclose(b["l2"], np.linalg.norm(d, axis=1).mean(), rtol=1e-5)
  pred = lambda xa: np.asarray(jnp.argmax(trainer.inference_logits(params, stats, xa), -1))
  np.testing.assert_allclose(b["pred_differs"], np.mean(pred(x_ms) != pred(x_pgd)))
  np.testing.assert_allclose(b["adv_acc_pgd"], np.mean(pred(x_pgd) == np.asarray(y)))
  np.testing.assert_allclose(b["adv_acc_ms_pgd"], np.mean(pred(x_ms) == np.asarray(y)))

  phi = np.asarray(ic.apply_features(trainer.graphdef, params, stats, x_ms, train=True)[0],
                   np.float64)
  w = np.asarray(ic.classifier_weight_of(trainer.graphdef, params, stats), np.float64)
  bias = np.asarray(params["classifier"]["bias"][...], np.float64)
  logits = phi @ w.T + bias
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  onehot = np.eye(3)[np.asarray(y)]
  grad_w = (p - onehot).T @ phi / len(y)
  o = groups["outer"]
  np.testing.assert_allclose(o["base_loss"], -np.mean(np.log(p[onehot > 0])), rtol=1e-4)
  np.testing.assert_allclose(o["grad_norm_w_base"], np.linalg.norm(grad_w), rtol=1e-4)
  np.testing.assert_allclose(o["etf_term"], lam_geom * geometry.etf_distance(w), rtol=1e-5)
  np.testing.assert_allclose(o["grad_norm_w_etf"],
                             lam_geom * np.linalg.norm(_etf_grad_closed_form(w)), rtol=1e-4)
  np.testing.assert_allclose(o["grad_ratio_w"], o["grad_norm_w_etf"] / o["grad_norm_w_base"],
                             rtol=1e-6)
  # the geometry inputs are the clean and plain-PGD features and W
  np.testing.assert_allclose(geo["weight"], w, rtol=1e-6)
  np.testing.assert_allclose(geo["adv_inputs"], x_pgd, atol=1e-6)
  np.testing.assert_allclose(geo["clean_features"], trainer.features_eval(params, stats, x),
                             rtol=1e-4, atol=1e-5)


def test_etf_closed_form_gradient_matches_finite_differences():
  """The closed form used above, checked once by central differences (float64)."""
  rng = np.random.default_rng(0)
  w = rng.normal(size=(4, 5))
  g = _etf_grad_closed_form(w)

  def penalty(m):
    m = m / np.linalg.norm(m, axis=1, keepdims=True)
    t = np.full((4, 4), -1. / 3) + (4. / 3) * np.eye(4)
    return np.mean((m @ m.T - t) ** 2)

  u = rng.normal(size=w.shape)
  h = 1e-6
  fd = (penalty(w + h * u) - penalty(w - h * u)) / (2 * h)
  np.testing.assert_allclose(np.sum(g * u), fd, rtol=1e-6)
  np.testing.assert_allclose(g, np.asarray(jax.grad(etf.etf_gram_penalty)(
      jnp.asarray(w, jnp.float32))), rtol=1e-4, atol=1e-6)


def test_plain_method_monitor_leaves_out_absent_terms():
  trainer, pipe, _, _ = _trainer("pgd_at")
  mon = dg.make_monitor(trainer, pipe.images, pipe.labels)
  groups, _ = trainer.monitor_fn(False)(trainer.init_state(), mon.device["image"],
                                        mon.device["label"], dg.monitor_key(0))
  assert set(groups) == {"inner", "outer"}
  assert set(groups["inner"]) == {"ce"}  # no manifold term, no MS-PGD numbers
  assert set(groups["outer"]) == {"base_loss", "grad_norm_w_base"}


@pytest.mark.slow
def test_fit_writes_per_epoch_diagnostics_once_compiled_and_resumable(tmp_path):
  """3 MCAT epochs (1 manifold warm-up): one entry per epoch in info, diagnostics.json
  and TensorBoard; each jitted function traced once (no retrace per epoch or on a
  second fit); a run killed after epoch 0 and resumed has the same history."""
  trainer, pipe, _, _ = _trainer("mcat", epochs=3)
  state, info = trainer.fit(pipe, str(tmp_path / "full"), progress_every_seconds=-1)
  hist = info["diagnostics"]
  assert [e["epoch"] for e in hist] == [0, 1, 2]
  assert [e["attack"] for e in hist] == ["pgd", "ms_pgd", "ms_pgd"]
  assert set(hist[0]["inner"]) == {"ce"}
  assert set(hist[1]["inner"]) == {"ce", "manifold_term", "grad_norm_ce",
                                   "grad_norm_manifold", "grad_ratio_mean",
                                   "grad_ratio_median", "sign_flip_share"}
  for e in hist:
    assert set(e) == {"epoch", "attack", "inner", "inner_source", "ms_pgd_vs_pgd", "outer",
                      "geometry"}
    assert e["inner_source"] == "monitor batch"
    assert set(e["outer"]) == {"base_loss", "etf_term", "grad_norm_w_base",
                               "grad_norm_w_etf", "grad_ratio_w"}
    assert all(np.isfinite(v) for v in e["inner"].values())
  w = ic.classifier_weight_of(trainer.graphdef, state["params"], state["batch_stats"])
  np.testing.assert_allclose(hist[-1]["geometry"]["etf_distance"],
                             geometry.etf_distance(np.asarray(w)), rtol=1e-6)
  with open(tmp_path / "full" / lt.DIAGNOSTICS_FILE) as f:
    assert json.load(f) == hist
  scalars = metric_writer.read_scalars(str(tmp_path / "full"))
  spe = pipe.steps_per_epoch
  assert [s for s, _ in scalars["diag/geometry/nc1"]] == [spe, 2 * spe, 3 * spe]
  assert [s for s, _ in scalars["diag/inner/grad_ratio_mean"]] == [2 * spe, 3 * spe]
  np.testing.assert_allclose(scalars["diag/inner/grad_ratio_mean"][-1][1],
                             hist[-1]["inner"]["grad_ratio_mean"], rtol=1e-6)

  trainer.fit(pipe, str(tmp_path / "resumed"), stop_after_epoch=0, progress_every_seconds=-1)
  _, resumed = trainer.fit(pipe, str(tmp_path / "resumed"), progress_every_seconds=-1)
  assert resumed["diagnostics"] == hist
  assert trainer.trace_counts and set(trainer.trace_counts.values()) == {1}, \
      trainer.trace_counts
  assert len(trainer.trace_counts) == 4  # 2 step flags (warm-up, MS-PGD) x step/monitor


def test_diagnostics_off_writes_nothing_extra(tmp_path):
  trainer, pipe, _, _ = _trainer("pgd_at", epochs=1, diagnostics=False)
  _, info = trainer.fit(pipe, str(tmp_path / "w"), progress_every_seconds=-1)
  assert info["diagnostics"] == []
  assert not os.path.exists(tmp_path / "w" / lt.DIAGNOSTICS_FILE)
  assert not any(k.startswith("diag/") for k in metric_writer.read_scalars(str(tmp_path / "w")))
  assert set(trainer.trace_counts) == {("train_step", lt.StepFlags(False, False))}


@pytest.mark.slow
def test_diagnostics_leave_the_trained_state_unchanged(tmp_path):
  """One MS-PGD epoch (no warm-up) with diagnostics on and off: bitwise the same state,
  so the checkpoint fingerprint leaves the diagnostics settings out."""
  states, trainers = [], []
  for on in (True, False):
    trainer, pipe, _, _ = _trainer("mcat", epochs=1, manifold_warmup_epochs=0,
                                   diagnostics=on, diagnostics_in_step=on)
    state, info = trainer.fit(pipe, str(tmp_path / f"w{on}"), progress_every_seconds=-1)
    assert len(info["diagnostics"]) == int(on)
    states.append(state)
    trainers.append(trainer)
  assert info["diagnostics"] == [] and trainers[0].trace_counts[
      ("train_step", lt.StepFlags(True, True))] == 1
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               *states)
  assert trainers[0].checkpoint_fingerprint() == trainers[1].checkpoint_fingerprint()
  assert trainers[0].run_info() != trainers[1].run_info()  # trainer_config.json has it


def test_table_adds_last_epoch_diagnostics_per_group(tmp_path):
  from uatmc_jax.longtail import table
  block = {"per_class": [.5, .5, .5], "overall": .5, "balanced": .5, "many": .5,
           "medium": .5, "few": .5, "tail": .5}

  def write(name, method, seed, last):
    d = tmp_path / name
    d.mkdir()
    (d / "results.json").write_text(json.dumps(
        {"imbalance_ratio": 10., "method": method, "seed": seed, "class_counts": [50, 20, 5],
         "clean": block, "pgd20": block}))
    first = {"epoch": 0, "attack": "pgd", "inner": {"ce": 9.}}
    (d / lt.DIAGNOSTICS_FILE).write_text(json.dumps([first, last]))

  for seed, ratio in ((1, 0.2), (2, 0.4)):
    write(f"mcat_s{seed}", "mcat", seed, {
        "epoch": 1, "attack": "ms_pgd", "inner": {"ce": 1., "grad_ratio_median": ratio},
        "ms_pgd_vs_pgd": {"pred_differs": 0.25}, "outer": {"grad_ratio_w": 0.01},
        "geometry": {"etf_distance": 0.3, "nc1": None}})
  write("pgd_at_s1", "pgd_at", 1, {"epoch": 1, "attack": "pgd", "inner": {"ce": 1.},
                                   "outer": {}, "geometry": {"etf_distance": 0.5}})
  agg = table.aggregate([table.load_run(str(tmp_path / n))
                         for n in ("mcat_s1", "mcat_s2", "pgd_at_s1")])
  d = agg[(10., "mcat")]["diagnostics"]
  assert d["n"] == 2
  np.testing.assert_allclose(d["inner/grad_ratio_median"]["mean"], 0.3)  # last epoch only
  np.testing.assert_allclose(d["inner/grad_ratio_median"]["std"], np.std([.2, .4], ddof=1))
  assert d["geometry/nc1"] is None and agg[(10., "pgd_at")]["diagnostics"][
      "inner/grad_ratio_median"] is None
  md = table.markdown(agg)
  rows = [line for line in md.splitlines() if line.startswith("| 10 |")]
  mcat_row = [r for r in rows if "| mcat |" in r and "0.3 ± 0.14" in r]
  # One seed: its ETF distance is printed alone (no "± 0", a spread of one value).
  pgd_row = [r for r in rows if "| pgd_at |" in r and "n/a" in r and "| 0.5 |" in r
             and "±" not in r]
  assert mcat_row and pgd_row, md
