"""experiments.uatmc_paired on hand-built stage files: differences, counts, intervals.

The bootstrap cases are built so the percentile intervals are hand-computable: a seed
with two distinct per-target differences puts 1/4 of its own resamples on each
all-equal draw, so (with enough resamples) the 2.5 % / 97.5 % quantiles sit exactly on
known atoms of the resampling distribution.
"""
import json
import os

import numpy as np
import pytest

from uatmc_jax.core.errors import ConfigError
from uatmc_jax.recsys import paired as uatmc_paired


def _write(root, seed, defence, hits, ids=None, before=None):
  d = os.path.join(root, f"seed_{seed}", defence)
  os.makedirs(d, exist_ok=True)
  out = {}
  for a, h in hits.items():
    out[a] = {"per_target_hit@50_after": h, "hit@50_after": float(np.mean(h))}
    if ids is not None:
      out[a]["per_target_ids"] = ids
    if before is not None:
      out[a]["per_target_hit@50_before"] = before
  with open(os.path.join(d, "attack_results_eps0.2.json"), "w") as f:
    json.dump(out | {"settings": {"epsilon": 0.2}}, f)


def test_paired_differences_counts_and_interval(tmp_path):
  root = str(tmp_path)
  # FGSM, UAT-MC − Vanilla per target: seed 1 [−0.4, 0.0], seed 2 [+0.2, +0.4].
  _write(root, 1, "vanilla", {"fgsm": [0.5, 0.1], "pgd": [0.2, 0.2],
                              "pgd_aligned": [0.1, 0.2]}, ids=[3, 7])
  _write(root, 1, "uat_mc", {"fgsm": [0.1, 0.1], "pgd": [0.1, 0.1],
                             "pgd_aligned": [0.1, 0.1]}, ids=[3, 7])
  _write(root, 2, "vanilla", {"fgsm": [0.0, 0.0], "pgd": [0.3, 0.3],
                              "pgd_aligned": [0.0, 0.3]}, ids=[5, 1])
  _write(root, 2, "uat_mc", {"fgsm": [0.2, 0.4], "pgd": [0.2, 0.2],
                             "pgd_aligned": [0.2, 0.2]}, ids=[5, 1])
  res = uatmc_paired.compare(uatmc_paired.load_stages(root, 0.2), n_boot=4000)
  assert res["seeds"] == [1, 2]
  by = {(p["attacker"], p["first"], p["second"]): p for p in res["defence_pairs"]}
  assert set(by) == {("fgsm", "uat_mc", "vanilla"), ("pgd", "uat_mc", "vanilla")}
  assert res["n_comparisons"] == {"defence_pairs": 2, "attacker_pairs": 2}
  fg = by[("fgsm", "uat_mc", "vanilla")]
  diffs = np.array([-0.4, 0.0, 0.2, 0.4])
  np.testing.assert_allclose(fg["mean_diff"], diffs.mean())
  assert (fg["first_lower"], fg["first_higher"], fg["targets"]) == (1, 2, 4)
  lo, hi = fg["ci95_targets_within_seeds"]
  assert diffs.min() <= lo <= fg["mean_diff"] <= hi <= diffs.max() and hi > lo
  # Within seeds: each seed's all-equal draws have probability 1/4, so the extremes
  # (−0.4·2 + 0.2·2) / 4 = −0.1 and (0·2 + 0.4·2) / 4 = +0.2 each carry 1/16 > 2.5 %:
  # the interval is exactly [−0.1, +0.2] (a 50 % interval, or resampling the pooled
  # targets across seeds, would not be).
  np.testing.assert_allclose(fg["ci95_targets_within_seeds"], [-0.1, 0.2], atol=1e-12)
  # Hierarchical: seeds (1, 1) with probability 1/4, then 4 draws from {−0.4, 0}: the
  # minimum −0.4 has 1/64 < 2.5 %, −0.3 (three −0.4, one 0) brings it to 5/64 > 2.5 %;
  # symmetrically 0.4 (1/64) and 0.35 on seed 2's side. Interval [−0.3, +0.35].
  np.testing.assert_allclose(fg["ci95_hierarchical"], [-0.3, 0.35], atol=1e-12)
  assert fg["per_seed_mean_diff"] == pytest.approx({"1": -0.2, "2": 0.3})
  np.testing.assert_allclose(fg["between_seed_std"], 0.5 / np.sqrt(2))
  # Bonferroni over the m = 2 defence comparisons: the 97.5 % interval holds the 95 % one.
  assert fg["bonferroni_level"] == pytest.approx(0.975)
  blo, bhi = fg["ci_hierarchical_bonferroni"]
  assert blo <= -0.3 and bhi >= 0.35 and blo >= -0.4 - 1e-12 and bhi <= 0.4 + 1e-12
  # A constant difference has degenerate intervals at that constant.
  pg = by[("pgd", "uat_mc", "vanilla")]
  np.testing.assert_allclose([pg["mean_diff"], *pg["ci95_targets_within_seeds"],
                              *pg["ci95_hierarchical"]], [-0.1] * 5, atol=1e-12)
  np.testing.assert_allclose(pg["between_seed_std"], 0.0, atol=1e-12)
  assert (pg["first_lower"], pg["first_higher"]) == (4, 0)
  # Attacker pairs on one defence: aligned PGD against PGD on the vanilla model.
  ap = {(p["defence"], p["first"]): p for p in res["attacker_pairs"]}
  np.testing.assert_allclose(ap[("vanilla", "pgd_aligned")]["mean_diff"],
                             np.mean([-0.1, 0, -0.3, 0]))
  assert ap[("vanilla", "pgd_aligned")]["first_lower"] == 2
  text = uatmc_paired.markdown(res)
  assert "first − second" in text and "hierarchical" in text and "m = 2" in text


def test_seed_variation_widens_defence_interval(tmp_path):
  """+1 on every target of seed 1, −1 on every target of seed 2: the models disagree."""
  root = str(tmp_path)
  ids = [0, 1, 2]
  _write(root, 1, "uat_mc", {"pgd": [1.0, 1.0, 1.0]}, ids=ids)
  _write(root, 1, "vanilla", {"pgd": [0.0, 0.0, 0.0]}, ids=ids)
  _write(root, 2, "uat_mc", {"pgd": [0.0, 0.0, 0.0]}, ids=ids)
  _write(root, 2, "vanilla", {"pgd": [1.0, 1.0, 1.0]}, ids=ids)
  res = uatmc_paired.compare(uatmc_paired.load_stages(root, 0.2), n_boot=2000)
  (p,) = res["defence_pairs"]
  assert p["mean_diff"] == 0.0
  # Targets within seeds: every resample keeps three +1 and three −1: degenerate at 0.
  np.testing.assert_allclose(p["ci95_targets_within_seeds"], [0.0, 0.0], atol=1e-12)
  # Seeds resampled: (1, 1) → +1, (2, 2) → −1 (1/4 each), mixed → 0: [−1, +1].
  np.testing.assert_allclose(p["ci95_hierarchical"], [-1.0, 1.0], atol=1e-12)
  assert p["per_seed_mean_diff"] == {"1": 1.0, "2": -1.0}
  np.testing.assert_allclose(p["between_seed_std"], np.sqrt(2.0))
  assert res["n_comparisons"]["defence_pairs"] == 1


def test_bootstrap_means_distribution():
  """The two resampling schemes against their closed-form mean and variance."""
  rng = np.random.default_rng(0)
  diff = np.array([0.0, 1.0, 0.0, 0.0, 2.0, 2.0])  # seed 1: {0, 1}; seed 2: {0, 0, 2, 2}
  seeds = np.array([1, 1, 2, 2, 2, 2])
  within = uatmc_paired.bootstrap_means(diff, seeds, 200_000, rng, hierarchical=False)
  # Var = Σ_s n_s · var_s / N² with var_s the seed's population variance.
  var = (2 * 0.25 + 4 * 1.0) / 36
  np.testing.assert_allclose(within.mean(), diff.mean(), atol=3e-3)
  np.testing.assert_allclose(within.var(), var, rtol=0.02)
  hier = uatmc_paired.bootstrap_means(diff, seeds, 200_000, rng, hierarchical=True)
  # Hierarchical: given the seed draw, E = (Σ seed sums) / (Σ n); the 4 draws equally likely.
  outcomes = {(1, 1): (2.0, 4), (2, 2): (8.0, 8), (1, 2): (5.0, 6), (2, 1): (5.0, 6)}
  expected = np.mean([s / n for s, n in outcomes.values()])
  np.testing.assert_allclose(hier.mean(), expected, atol=3e-3)
  assert hier.var() > within.var()


def test_mismatched_target_ids_refused(tmp_path):
  root = str(tmp_path)
  _write(root, 1, "uat_mc", {"pgd": [0.1, 0.2]}, ids=[4, 9])
  _write(root, 1, "vanilla", {"pgd": [0.1, 0.2]}, ids=[9, 4])
  with pytest.raises(ConfigError, match="seed 1.*per_target_ids differ"):
    uatmc_paired.compare(uatmc_paired.load_stages(root, 0.2), n_boot=10)


def test_files_without_ids_paired_by_position_with_warning(tmp_path, capsys):
  root = str(tmp_path)
  _write(root, 1, "uat_mc", {"pgd": [0.1, 0.2]})
  _write(root, 1, "vanilla", {"pgd": [0.3, 0.2]})
  res = uatmc_paired.compare(uatmc_paired.load_stages(root, 0.2), n_boot=10)
  assert "paired by position" in capsys.readouterr().out
  np.testing.assert_allclose(res["defence_pairs"][0]["mean_diff"], -0.1)
  # Different target counts cannot be paired at all.
  _write(root, 1, "vanilla", {"pgd": [0.3, 0.2, 0.1]})
  with pytest.raises(ConfigError, match="cannot pair"):
    uatmc_paired.compare(uatmc_paired.load_stages(root, 0.2), n_boot=10)


def test_gain_pairs_when_clean_hits_are_stored(tmp_path):
  root = str(tmp_path)
  _write(root, 1, "uat_mc", {"pgd": [0.5, 0.2]}, ids=[1, 2], before=[0.4, 0.0])
  _write(root, 1, "vanilla", {"pgd": [0.5, 0.6]}, ids=[1, 2], before=[0.1, 0.3])
  res = uatmc_paired.compare(uatmc_paired.load_stages(root, 0.2), n_boot=100)
  gain = res["defence_pairs"][0]["gain"]
  # gains: UAT-MC [0.1, 0.2], Vanilla [0.4, 0.3] → differences [−0.3, −0.1].
  np.testing.assert_allclose(gain["mean_diff"], -0.2)
  assert (gain["first_lower"], gain["targets"]) == (2, 2)
  assert "Gain (Hit after − Hit before" in uatmc_paired.markdown(res)


def test_paired_missing_files_named(tmp_path):
  with pytest.raises(ConfigError, match="attack_results_eps0.5.json"):
    uatmc_paired.load_stages(str(tmp_path), 0.5)


def test_targets_grouped_by_seed_whatever_their_order():
  """Interleaved seeds are grouped (each seed's targets in their order, padded with 0)."""
  table, counts, labels = uatmc_paired._padded(np.array([1.0, 2, 3, 4, 5]),
                                               np.array([2, 1, 2, 1, 2]))
  np.testing.assert_array_equal(table, [[2, 4, 0], [1, 3, 5]])
  np.testing.assert_array_equal(counts, [2, 3])
  np.testing.assert_array_equal(labels, [1, 2])
  # Within seeds, constant per seed: every resample has the pooled mean exactly.
  means = uatmc_paired.bootstrap_means(np.array([1.0, -1, 1, -1]), np.array([1, 2, 1, 2]),
                                       50, np.random.default_rng(0), hierarchical=False)
  np.testing.assert_allclose(means, 0.0, atol=1e-12)
