"""Long-tail accuracy blocks and geometry diagnostics on hand-built cases (B.5)."""
import numpy as np
import pytest

from uatmc_jax.attacks import batching
from uatmc_jax.evaluation import geometry
from uatmc_jax.evaluation import robust_accuracy
from uatmc_jax.objectives import etf


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
