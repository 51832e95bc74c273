"""Long-tail accuracy blocks and geometry diagnostics on hand-built cases (B.5)."""
import dataclasses

import numpy as np
import pytest

from uatmc_jax.longtail import etf
from uatmc_jax.longtail.attacks import batching
from uatmc_jax.longtail.evaluation import geometry
from uatmc_jax.longtail.evaluation import robust_accuracy


def test_accuracy_block_groups_from_train_counts():
  # Train counts: classes 0,1 Many (>100), 2 Medium, 3 Few; Tail = rarest 30% of
  # 4 classes = the rarest one or two (class_groups decides; we check Many/Medium/Few).
  train_counts = np.array([500, 150, 50, 10])
  labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
  correct = np.array([1, 1, 1, 0, 0, 0, 1, 0], bool)
  block = robust_accuracy.accuracy_block_from_correct(correct, labels, train_counts)
  assert block["per_class"] == [1.0, 0.5, 0.0, 0.5]
  assert block["overall"] == pytest.approx(4 / 8)
  assert block["balanced"] == pytest.approx(0.5)
  assert block["many"] == pytest.approx(0.75)
  assert block["medium"] == pytest.approx(0.0)
  assert block["few"] == pytest.approx(0.5)
  assert block["tail"] is not None
  # No Few class on a CIFAR-10-LT-like profile: reported as None, not 0.
  block = robust_accuracy.accuracy_block_from_correct(
      correct, labels, np.array([5000, 1000, 200, 50]))
  assert block["few"] is None


def test_map_in_fixed_batches_pads_and_trims():
  calls = []

  def fn(a, b, batch_index, extra):
    calls.append(a.shape)
    return a * 2 + extra, b

  a = np.arange(10.)
  out_a, out_b = batching.map_in_fixed_batches(fn, [a, a + 1], 4, 100.)
  np.testing.assert_array_equal(out_a, a * 2 + 100.)
  np.testing.assert_array_equal(out_b, a + 1)
  assert calls == [(4,), (4,), (4,)]  # one shape: no recompilation


def _features_at(means, spread, per_class=4, seed=0):
  rng = np.random.default_rng(seed)
  feats, labels = [], []
  for c, mu in enumerate(means):
    noise = rng.normal(size=(per_class, len(mu)))
    noise -= noise.mean(0)
    feats.append(mu + spread * noise)
    labels += [c] * per_class
  return np.concatenate(feats), np.array(labels)


def test_nc1_is_zero_when_collapsed_and_matches_hand_case():
  means = etf.simplex_etf(4, 6)
  feats, labels = _features_at(np.asarray(means), 0.0)
  assert geometry.nc1(feats, labels, 4) == pytest.approx(0., abs=1e-10)
  # 1-D, two classes at ±1 with within-class variance s²: Σ_W = s², Σ_B = 1.
  s = 0.3
  feats = np.array([[1 - s], [1 + s], [-1 - s], [-1 + s]])
  labels = np.array([0, 0, 1, 1])
  assert geometry.nc1(feats, labels, 2) == pytest.approx(s ** 2 / 2)


def test_equiangularity_zero_at_etf_and_hand_case():
  feats, labels = _features_at(np.asarray(etf.simplex_etf(5, 8)), 0.1)
  assert geometry.equiangularity(feats, labels, 5) == pytest.approx(0., abs=1e-10)
  feats = np.array([[1., 0.], [0., 1.], [1., 1.]])
  expected = (2 * abs(-0.8 + 0.5) + 4 * abs(-1 / np.sqrt(10) + 0.5)) / 6
  assert geometry.equiangularity(feats, np.arange(3), 3) == pytest.approx(expected)


def test_etf_distance_zero_at_simplex_and_hand_case():
  assert geometry.etf_distance(np.asarray(etf.simplex_etf(10, 16))) == pytest.approx(0., abs=1e-10)
  assert geometry.etf_distance(np.eye(3)) == pytest.approx(6 * 0.25 / 9)
  # Invariant to row scaling.
  w = np.random.default_rng(0).normal(size=(4, 7))
  assert geometry.etf_distance(w) == pytest.approx(
      geometry.etf_distance(w * np.array([[1.], [3.], [0.5], [2.]])), rel=1e-5)


def test_margins_and_bound_on_simplex_etf():
  c = 4
  w = np.asarray(etf.simplex_etf(c, 6), np.float64)
  theta = np.arccos(-1. / (c - 1))
  assert geometry.min_classifier_angle(w) == pytest.approx(theta)
  labels = np.arange(c)
  # Features exactly on their class vector: margin sin(θ/2) for every example.
  np.testing.assert_allclose(geometry.feature_margins(w, labels, w), np.sin(theta / 2))
  # Feature of class 0 on class 1's vector: margin −sin(θ/2).
  assert geometry.feature_margins(w[1:2], np.array([0]), w)[0] == pytest.approx(-np.sin(theta / 2))
  # Identity "network" on 6-d inputs: φ(x') − φ(x) = x' − x, so L̂ = ||δ||₂/||δ||∞.
  x = w.copy()
  delta = np.zeros_like(x)
  delta[:, 0] = 0.01
  delta[:, 1] = -0.01
  out = geometry.margin_bound(w, labels, x, x + delta, x, x + delta, epsilon=0.01)
  assert out["lipschitz_estimate"] == pytest.approx(np.sqrt(2), rel=1e-3)
  assert out["bound"] == pytest.approx(np.sin(theta / 2) - 2 * out["lipschitz_estimate"] * 0.01)
  assert out["clean_margin"]["min"] == pytest.approx(np.sin(theta / 2))
  assert out["adversarial_margin"]["min"] <= out["clean_margin"]["min"]


def _tiny_classifier(seed, n_images, n_classes):
  """A random 2-layer classifier on 2x2x3 images, and images labelled by its own argmax."""
  import jax.numpy as jnp
  rng = np.random.default_rng(seed)
  dim = 2 * 2 * 3
  w1 = jnp.asarray(rng.normal(size=(dim, 8)) / np.sqrt(dim), jnp.float32)
  head = jnp.asarray(rng.normal(size=(n_classes, 8)), jnp.float32)
  features_fn = lambda x: jnp.tanh(4. * (x.reshape(x.shape[0], -1) - 0.5) @ w1)
  logits_fn = lambda x: features_fn(x) @ head.T
  images = rng.uniform(size=(n_images, 2, 2, 3)).astype(np.float32)
  labels = np.asarray(jnp.argmax(logits_fn(images), -1)).astype(np.int32)
  return features_fn, logits_fn, head, images, labels


def test_evaluate_classifier_writes_results_table_and_plot(tmp_path):
  import jax
  import jax.numpy as jnp
  from uatmc_jax.longtail.evaluation import evaluate

  n_classes = 4
  features_fn, logits_fn, head, images, labels = _tiny_classifier(0, 10, n_classes)
  counts = np.array([300, 60, 15, 5])
  config = robust_accuracy.RobustEvalConfig(epsilon=0.05, step_size=0.0125, batch_size=4)
  res = evaluate.evaluate_classifier(logits_fn, features_fn, np.asarray(head), images,
                                        labels, counts, ["pgd20", "cw"], config,
                                        out_dir=str(tmp_path), log=lambda s: None)
  from uatmc_jax.core import reporting
  saved = reporting.read_json(str(tmp_path / "eval_results.json"))
  for name in ("clean", "pgd20", "cw"):
    assert set(saved[name]) >= {"per_class", "overall", "balanced", "many", "medium",
                                "few", "tail", "seconds"}
    assert len(saved[name]["per_class"]) == n_classes
  assert saved["clean"]["overall"] == pytest.approx(1.0)
  assert saved["pgd20"]["overall"] <= 1.0
  # The saved blocks are the evaluator's numbers on these images: recompute each attack
  # with a fresh RobustEvaluator (same config, so the same seeded starts).
  ref_blocks, ref_outcomes = robust_accuracy.evaluate_robustness(
      logits_fn, images, labels, counts, ["clean", "pgd20", "cw"], config)
  for name in ("clean", "pgd20", "cw"):
    for key in ("per_class", "overall", "balanced", "many", "medium", "few", "tail"):
      assert saved[name][key] == pytest.approx(ref_blocks[name][key]), (name, key)
    assert saved[name]["n_test"] == len(labels)
    assert res[name]["overall"] == pytest.approx(ref_outcomes[name].correct.mean())
  # the attack bites at this budget (so the comparison above is not clean vs clean)
  assert saved["pgd20"]["overall"] < saved["clean"]["overall"]
  assert saved["etf_distance"] == pytest.approx(geometry.etf_distance(np.asarray(head)), rel=1e-6)
  assert saved["margin_bound"]["adversarial_examples"] == "pgd20"
  assert np.isfinite(saved["nc1"]) and np.isfinite(saved["equiangularity"])
  assert (tmp_path / "eval_results.md").read_text().startswith("| attack |")
  assert (tmp_path / "per_class_robust_accuracy.png").stat().st_size > 1000
  with pytest.raises(Exception, match="unknown attack"):
    evaluate.evaluate_classifier(logits_fn, features_fn, np.asarray(head), images, labels,
                                    counts, ["fgsm"], config)


def test_mean_std_is_the_sample_std():
  """Tables report mean ± sample std (ddof 1), numpy's std(ddof=1); one value: no std."""
  from uatmc_jax.core import reporting
  values = [0.31, 0.27, 0.40]
  ms = reporting.mean_std(values)
  np.testing.assert_allclose(ms["std"], np.std(values, ddof=1), rtol=1e-12)
  assert abs(ms["std"] - np.std(values)) > 1e-3  # not the population std
  np.testing.assert_allclose(ms["mean"], np.mean(values))
  assert reporting.mean_std([0.5]) == {"mean": 0.5, "std": None}
  assert reporting.format_value(reporting.mean_std([0.5])) == "0.5000"
  assert " ± " not in reporting.std_header(1) and "1 seed " in reporting.std_header(1)
  assert reporting.std_header(3) == "mean ± sample std (ddof 1) over 3 seeds"
  assert reporting.format_value(ms, 2) == f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def test_evaluate_classifier_runs_an_attack_on_its_own_subset(tmp_path):
  """attack_subsets (eval_robust --autoattack_per_class): that attack runs on the other
  images only, equal to evaluating those images alone; the rest stay on the full set."""
  import jax.numpy as jnp
  from uatmc_jax.core import reporting
  from uatmc_jax.core.errors import ConfigError
  from uatmc_jax.longtail.evaluation import evaluate

  n_classes = 4
  features_fn, logits_fn, head, images, labels = _tiny_classifier(1, 12, n_classes)
  labels[:2] = (labels[:2] + 1) % n_classes  # two clean-wrong points in the subset
  counts = np.array([300, 60, 15, 5])
  config = robust_accuracy.RobustEvalConfig(epsilon=0.08, step_size=0.02, batch_size=4)
  sub = (images[:6], labels[:6])
  res = evaluate.evaluate_classifier(
      logits_fn, features_fn, np.asarray(head), images, labels, counts, ["pgd20", "cw"],
      config, out_dir=str(tmp_path), log=lambda s: None, attack_subsets={"cw": sub})
  alone = evaluate.evaluate_classifier(
      logits_fn, features_fn, np.asarray(head), *sub, counts, ["cw"], config,
      log=lambda s: None)
  saved = reporting.read_json(str(tmp_path / "eval_results.json"))
  assert saved["cw"]["n_test"] == 6 and saved["pgd20"]["n_test"] == 12
  assert saved["clean"]["n_test"] == 12 and saved["clean_cw_subset"]["n_test"] == 6
  assert saved["settings"]["n_test_per_attack"]["cw"] == 6
  assert res["cw"]["per_class"] == alone["cw"]["per_class"]  # None = class absent
  assert res["cw"]["overall"] == alone["cw"]["overall"]
  np.testing.assert_allclose(res["clean_cw_subset"]["overall"], alone["clean"]["overall"])
  assert res["clean_cw_subset"]["overall"] == pytest.approx(4 / 6)
  assert saved["margin_bound"]["adversarial_examples"] == "pgd20"  # same images as clean
  # keep_existing: a later call with only pgd20 keeps the earlier cw block.
  evaluate.evaluate_classifier(
      logits_fn, features_fn, np.asarray(head), images, labels, counts, ["pgd20"], config,
      out_dir=str(tmp_path), log=lambda s: None, keep_existing=True)
  again = reporting.read_json(str(tmp_path / "eval_results.json"))
  assert again["cw"] == saved["cw"] and again["settings"]["kept_from_previous_run"] == [
      "cw", "clean_cw_subset"]
  evaluate.evaluate_classifier(
      logits_fn, features_fn, np.asarray(head), images, labels, counts, ["pgd20"], config,
      out_dir=str(tmp_path), log=lambda s: None)
  assert "cw" not in reporting.read_json(str(tmp_path / "eval_results.json"))
  with pytest.raises(ConfigError, match="clean accuracy differs"):
    evaluate.evaluate_classifier(
        logits_fn, features_fn, np.asarray(head), images, (labels + 1) % n_classes, counts,
        ["pgd20"], config, out_dir=str(tmp_path), log=lambda s: None, keep_existing=True)
  with pytest.raises(ConfigError, match="not among the attacks"):
    evaluate.evaluate_classifier(logits_fn, features_fn, np.asarray(head), images, labels,
                                    counts, ["pgd20"], config, log=lambda s: None,
                                    attack_subsets={"cw": sub})


def test_keep_existing_reruns_blocks_computed_under_other_settings(tmp_path):
  """keep_existing keeps an earlier attack block only when its own settings equal this
  run's; a block from another ε / step count / seed / test set is rerun (and a line
  says so), never reported under the new run's settings."""
  from uatmc_jax.core import reporting
  from uatmc_jax.longtail.evaluation import evaluate

  n_classes = 4
  features_fn, logits_fn, head, images, labels = _tiny_classifier(2, 12, n_classes)
  counts = np.array([300, 60, 15, 5])
  path = tmp_path / "eval_results.json"
  run = lambda attacks, config, **kw: evaluate.evaluate_classifier(
      logits_fn, features_fn, np.asarray(head), images, labels, counts, attacks, config,
      out_dir=str(tmp_path), **kw)
  small = robust_accuracy.RobustEvalConfig(epsilon=0.01, step_size=0.005, batch_size=4)
  run(["pgd20", "cw"], small, log=lambda s: None)
  first = reporting.read_json(str(path))
  assert first["cw"]["settings"]["epsilon"] == 0.01
  assert first["cw"]["settings"]["cw_steps"] == small.cw_steps
  # Same settings: cw is kept as it was.
  lines = []
  run(["pgd20"], small, log=lines.append, keep_existing=True)
  kept = reporting.read_json(str(path))
  assert kept["cw"] == first["cw"] and kept["settings"]["kept_from_previous_run"] == ["cw"]
  assert not any("rerunning" in s for s in lines)
  # Another ε: the old cw block must not survive; cw is rerun at the new ε.
  large = robust_accuracy.RobustEvalConfig(epsilon=0.2, step_size=0.05, batch_size=4)
  lines = []
  run(["pgd20"], large, log=lines.append, keep_existing=True)
  after = reporting.read_json(str(path))
  assert any(s.startswith("keep_existing: cw") and "epsilon 0.01 -> 0.2" in s
             for s in lines), lines
  assert after["cw"]["settings"]["epsilon"] == 0.2
  assert after["settings"]["kept_from_previous_run"] == []
  fresh_blocks, _ = robust_accuracy.evaluate_robustness(
      logits_fn, images, labels, counts, ["clean", "cw"], large)
  assert after["cw"]["per_class"] == fresh_blocks["cw"]["per_class"]
  assert after["cw"]["overall"] < first["cw"]["overall"]  # the stale block was stronger
  # Another step count or seed: rerun too.
  for other in (dataclasses.replace(large, cw_steps=5), dataclasses.replace(large, seed=3)):
    lines = []
    run(["pgd20"], other, log=lines.append, keep_existing=True)
    assert any(s.startswith("keep_existing: cw") for s in lines), lines
    assert reporting.read_json(str(path))["cw"]["settings"]["cw_steps"] == other.cw_steps
    assert reporting.read_json(str(path))["cw"]["settings"]["seed"] == other.seed
  # A block written without per-block settings (an older file) is rerun, not kept.
  old = reporting.read_json(str(path))
  del old["cw"]["settings"]
  reporting.write_json(str(path), old)
  lines = []
  run(["pgd20"], other, log=lines.append, keep_existing=True)
  assert any("records no settings" in s for s in lines), lines
  assert "settings" in reporting.read_json(str(path))["cw"]
