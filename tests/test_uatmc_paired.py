"""experiments.uatmc_paired on hand-built stage files: differences, counts, interval."""
import json
import os

import numpy as np
import pytest

from uatmc_jax.core.errors import ConfigError
from uatmc_jax.recsys import paired as uatmc_paired


def _write(root, seed, defence, hits):
  d = os.path.join(root, f"seed_{seed}", defence)
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, "attack_results_eps0.2.json"), "w") as f:
    json.dump({a: {"per_target_hit@50_after": h, "hit@50_after": float(np.mean(h))}
               for a, h in hits.items()} | {"settings": {"epsilon": 0.2}}, f)


def test_paired_differences_counts_and_interval(tmp_path):
  root = str(tmp_path)
  # Seed 1: UAT-MC lower on 2 targets, equal on 1; seed 2: higher on 1, lower on 1.
  _write(root, 1, "vanilla", {"fgsm": [0.5, 0.3, 0.1], "pgd": [0.2, 0.2, 0.2],
                              "pgd_aligned": [0.1, 0.2, 0.2]})
  _write(root, 1, "uat_mc", {"fgsm": [0.1, 0.2, 0.1], "pgd": [0.1, 0.1, 0.1],
                             "pgd_aligned": [0.1, 0.1, 0.1]})
  _write(root, 2, "vanilla", {"fgsm": [0.0, 0.4], "pgd": [0.3, 0.3],
                              "pgd_aligned": [0.0, 0.3]})
  _write(root, 2, "uat_mc", {"fgsm": [0.2, 0.1], "pgd": [0.2, 0.2],
                             "pgd_aligned": [0.2, 0.2]})
  res = uatmc_paired.compare(uatmc_paired.load_stages(root, 0.2), n_boot=500)
  assert res["seeds"] == [1, 2]
  by = {(p["attacker"], p["first"], p["second"]): p for p in res["defence_pairs"]}
  assert set(by) == {("fgsm", "uat_mc", "vanilla"), ("pgd", "uat_mc", "vanilla")}
  fg = by[("fgsm", "uat_mc", "vanilla")]
  diffs = np.array([-0.4, -0.1, 0.0, 0.2, -0.3])
  np.testing.assert_allclose(fg["mean_diff"], diffs.mean())
  assert (fg["first_lower"], fg["first_higher"], fg["targets"]) == (3, 1, 5)
  lo, hi = fg["ci95"]
  assert diffs.min() <= lo <= fg["mean_diff"] <= hi <= diffs.max() and hi > lo
  # A constant difference has a degenerate interval at that constant.
  pg = by[("pgd", "uat_mc", "vanilla")]
  np.testing.assert_allclose([pg["mean_diff"], *pg["ci95"]], [-0.1] * 3, atol=1e-12)
  assert (pg["first_lower"], pg["first_higher"]) == (5, 0)
  # Attacker pairs on one defence: aligned PGD against PGD on the vanilla model.
  ap = {(p["defence"], p["first"]): p for p in res["attacker_pairs"]}
  np.testing.assert_allclose(ap[("vanilla", "pgd_aligned")]["mean_diff"],
                             np.mean([-0.1, 0, 0, -0.3, 0]))
  assert ap[("vanilla", "pgd_aligned")]["first_lower"] == 2
  assert "first − second" in uatmc_paired.markdown(res)


def test_paired_missing_files_named(tmp_path):
  with pytest.raises(ConfigError, match="attack_results_eps0.5.json"):
    uatmc_paired.load_stages(str(tmp_path), 0.5)
