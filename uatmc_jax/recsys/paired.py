"""Paired per-target comparisons of a finished UAT-MC experiment (METHODS.md A.8).

Within a seed every defence is attacked on the same anchors and the same targets, so
two defences (or two attackers on one defence) can be compared target by target, which
has far more power than the mean ± std over three seeds. For each pair this reads the
stage files ``seed_<s>/<defence>/attack_results_eps<ε>.json`` and reports, over all
targets of all seeds, the mean difference of Hit@K after attack (first minus second),
a percentile-bootstrap 95 % interval over targets (targets resampled with their seed
kept, i.e. within-seed resampling), and how many targets favour each side. Negative =
the first is more robust (defence pairs) or weaker (attacker pairs).

Caveat printed with the table: Hit@K after attack includes each model's clean Hit@K;
the per-target clean values are not stored, so defence pairs compare the after-attack
exposure, not the gain.
"""
from __future__ import annotations

import functools
import glob
import json
import os

import numpy as np

from uatmc_jax.core.errors import ConfigError


DEFENCE_PAIRS = (("uat_mc", "uat_mc_no_align"), ("uat_mc", "vanilla"), ("uat_mc", "apr"),
                 ("uat_mc", "amr"), ("uat_mc_no_align", "vanilla"),
                 ("uat_mc_no_align", "apr"))
DEFENCE_ATTACKERS = ("fgsm", "pgd")
ATTACKER_PAIRS = (("pgd_aligned", "pgd"), ("pgd_pcgrad_groups", "pgd"),
                  ("pgd_shared_groups", "pgd"))


def load_stages(workdir: str, epsilon: float) -> dict:
  """{seed: {defence: attack results}} from ``seed_*/<defence>/attack_results_eps<ε>.json``."""
  name = f"attack_results_eps{float(epsilon):g}.json"
  out: dict = {}
  for path in sorted(glob.glob(os.path.join(workdir, "seed_*", "*", name))):
    seed_dir, defence = os.path.split(os.path.dirname(path))
    seed = int(os.path.basename(seed_dir).split("_", 1)[1])
    with open(path) as f:
      out.setdefault(seed, {})[defence] = json.load(f)
  if not out:
    raise ConfigError(f"no {name} under {workdir}/seed_*/<defence>/ (is it an "
                      f"experiments.uatmc workdir, and was ε = {epsilon:g} attacked?)")
  return out


def _hit_key(results: dict) -> str:
  keys = [k for k in results if k.startswith("per_target_hit@") and k.endswith("_after")]
  if len(keys) != 1:
    raise ConfigError(f"expected one per_target_hit@K_after entry, found {keys}")
  return keys[0]


def paired(first: np.ndarray, second: np.ndarray, seeds: np.ndarray, n_boot: int,
           rng: np.random.Generator) -> dict:
  """Mean of first − second, within-seed bootstrap 95 % interval, counts of each side."""
  diff = np.asarray(first, np.float64) - np.asarray(second, np.float64)
  groups = [np.flatnonzero(seeds == s) for s in np.unique(seeds)]
  # (n_boot, targets) indices, each seed's targets resampled within that seed.
  idx = np.concatenate([rng.choice(g, (n_boot, g.size)) for g in groups], axis=1)
  lo, hi = np.quantile(diff[idx].mean(axis=1), [0.025, 0.975])
  return {"mean_diff": float(diff.mean()), "ci95": [float(lo), float(hi)],
          "first_lower": int(np.sum(diff < 0)), "first_higher": int(np.sum(diff > 0)),
          "targets": int(diff.size)}


def compare(stages: dict, n_boot: int = 4000, seed: int = 0) -> dict:
  """Every defence pair under FGSM / PGD and every attacker pair on every defence."""
  rng = np.random.default_rng(seed)
  seeds = sorted(stages)
  defences = [d for d in stages[seeds[0]] if all(d in stages[s] for s in seeds)]

  @functools.cache
  def vec(defence, attacker):
    """(per-target Hit@K after, seed of each target) over all seeds, or None."""
    runs = [stages[s][defence].get(attacker) for s in seeds]
    if any(r is None for r in runs):
      return None
    key = _hit_key(runs[0])
    return np.concatenate([r[key] for r in runs]), np.concatenate(
        [np.full(len(r[key]), s) for s, r in zip(seeds, runs)])

  out = {"seeds": seeds, "defence_pairs": [], "attacker_pairs": []}

  def add(bucket, lead, first, second):
    if first is not None and second is not None:
      out[bucket].append({**lead, **paired(first[0], second[0], first[1], n_boot, rng)})

  for a in DEFENCE_ATTACKERS:
    for x, y in DEFENCE_PAIRS:
      if x in defences and y in defences:
        add("defence_pairs", {"attacker": a, "first": x, "second": y}, vec(x, a), vec(y, a))
  for d in defences:
    for x, y in ATTACKER_PAIRS:
      add("attacker_pairs", {"defence": d, "first": x, "second": y}, vec(d, x), vec(d, y))
  return out


def markdown(result: dict) -> str:
  from uatmc_jax.core.reporting import markdown_table

  def row(lead, p):
    lo, hi = p["ci95"]
    return [*lead, f"{p['mean_diff']:+.4f}", f"[{lo:+.4f}, {hi:+.4f}]",
            f"{p['first_lower']} / {p['first_higher']} of {p['targets']}"]

  cols = ["mean Δ Hit after (first − second)", "95 % CI (within-seed bootstrap)",
          "targets first lower / higher"]
  text = markdown_table(["attacker", "first", "second", *cols],
                        [row((p["attacker"], p["first"], p["second"]), p)
                         for p in result["defence_pairs"]])
  if result["attacker_pairs"]:
    text += "\n\n" + markdown_table(["defence", "first", "second", *cols],
                                    [row((p["defence"], p["first"], p["second"]), p)
                                     for p in result["attacker_pairs"]])
  return (text + "\n\nHit after attack includes each model's clean Hit (per-target clean "
          "values are not stored): defence pairs compare exposure after attack.")
