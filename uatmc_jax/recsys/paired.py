"""Paired per-target comparisons of a finished UAT-MC experiment (METHODS.md A.8).

Within a seed every defence is attacked on the same anchors and the same targets, so
two defences (or two attackers on one defence) can be compared target by target. For
each pair this reads the stage files ``seed_<s>/<defence>/attack_results_eps<ε>.json``
and reports, over all targets of all seeds, the mean difference of Hit@K after attack
(first minus second; negative = the first is more robust for defence pairs, weaker for
attacker pairs), how many targets favour each side, and two percentile-bootstrap 95 %
intervals that answer different questions:

* ``ci95_targets_within_seeds``: targets resampled within their seed, the trained
  models held fixed. It says how sure the difference is *for these trained models* on
  other targets; it leaves out training-seed variation.
* ``ci95_hierarchical``: seeds resampled with replacement, then targets within each
  drawn seed (a two-stage bootstrap; the statistic is the mean over all drawn targets,
  like the point estimate). It includes the variation between trained models, so it is
  the one to read for "defence A is more robust than defence B". With few seeds it is
  coarse (three seeds give ten distinct seed multisets) and it cannot show more spread
  than the seeds have; ``per_seed_mean_diff`` and ``between_seed_std`` (sample std,
  ddof 1, of the per-seed mean differences) stand beside it.

Multiplicity: every pair's interval is a 95 % interval on its own. The output states
``n_comparisons`` per table and ``ci_hierarchical_bonferroni`` at level 1 − 0.05/m
(Bonferroni over the m comparisons of that table); read a claim about any one of m
pairs picked after looking against that one.

Pairing is checked by target id (``per_target_ids``, stored by the experiment's attack
stage): two stage files of one seed with different ids are refused; older files without
ids are paired by position with a printed warning. When both files store the clean
per-target Hit (``per_target_hit@K_before``) each pair also carries the same statistics
of the gain (after − before) under ``gain``.

All resamples are drawn as index arrays at once (no loop over resamples).
"""
from __future__ import annotations

import functools
import json

import numpy as np
from etils import epath

from uatmc_jax.core.errors import ConfigError


DEFENCE_PAIRS = (("uat_mc", "uat_mc_no_align"), ("uat_mc", "vanilla"), ("uat_mc", "apr"),
                 ("uat_mc", "amr"), ("uat_mc_no_align", "vanilla"),
                 ("uat_mc_no_align", "apr"))
DEFENCE_ATTACKERS = ("fgsm", "pgd")
ATTACKER_PAIRS = (("pgd_aligned", "pgd"), ("pgd_pcgrad_groups", "pgd"),
                  ("pgd_shared_groups", "pgd"))
LEVEL = 0.95


def load_stages(workdir: str, epsilon: float) -> dict:
  """{seed: {defence: attack results}} from ``seed_*/<defence>/attack_results_eps<ε>.json``.

  Each result dict also gets ``"_file"``: the path it was read from (for messages).
  """
  name = f"attack_results_eps{float(epsilon):g}.json"
  out: dict = {}
  for path in sorted(epath.Path(workdir).glob(f"seed_*/*/{name}"), key=str):
    defence, seed_dir = path.parent.name, path.parent.parent.name
    try:
      seed = int(seed_dir.split("_", 1)[1])
    except ValueError:
      continue
    got = json.loads(path.read_text())
    got["_file"] = str(path)
    out.setdefault(seed, {})[defence] = got
  if not out:
    raise ConfigError(f"no {name} under {workdir}/seed_*/<defence>/ (is it an "
                      f"experiments.uatmc workdir, and was ε = {epsilon:g} attacked?)")
  return out


def _hit_key(results: dict, when: str = "after") -> str | None:
  keys = [k for k in results if k.startswith("per_target_hit@") and k.endswith(f"_{when}")]
  if len(keys) > 1 or (when == "after" and not keys):
    raise ConfigError(f"expected one per_target_hit@K_{when} entry, found {keys}")
  return keys[0] if keys else None


def _quantiles(stats: np.ndarray, level: float) -> list[float]:
  lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
  return [float(lo), float(hi)]


def _padded(diff: np.ndarray, seeds: np.ndarray):
  """(S, N) per-seed rows of ``diff`` padded with 0, (S,) counts, seed labels."""
  labels, inverse, counts = np.unique(seeds, return_inverse=True, return_counts=True)
  order = np.argsort(inverse, kind="stable")  # targets grouped by seed, order kept
  rows = inverse[order]
  col = np.arange(diff.size) - (np.cumsum(counts) - counts)[rows]
  table = np.zeros((labels.size, counts.max()), np.float64)
  table[rows, col] = diff[order]
  return table, counts, labels


def bootstrap_means(diff: np.ndarray, seeds: np.ndarray, n_boot: int,
                    rng: np.random.Generator, hierarchical: bool) -> np.ndarray:
  """(n_boot,) resampled means of ``diff`` (all targets of all seeds).

  Within seeds: every seed keeps its place and its targets are drawn with replacement.
  Hierarchical: the seeds are first drawn with replacement, then each drawn seed's
  targets with replacement. The statistic is the mean over all drawn targets.
  """
  table, counts, _ = _padded(np.asarray(diff, np.float64), np.asarray(seeds))
  s, width = table.shape
  drawn = (rng.integers(0, s, (n_boot, s)) if hierarchical
           else np.broadcast_to(np.arange(s), (n_boot, s)))
  n = counts[drawn]                                            # (B, S)
  cols = np.floor(rng.random((n_boot, s, width)) * n[..., None]).astype(np.int64)
  live = np.arange(width) < n[..., None]                       # (B, S, N)
  sums = np.sum(np.where(live, table[drawn[..., None], cols], 0.0), axis=(1, 2))
  return sums / n.sum(axis=1)


def paired(first: np.ndarray, second: np.ndarray, seeds: np.ndarray, n_boot: int,
           rng: np.random.Generator, n_comparisons: int = 1) -> dict:
  """Mean of first − second, both bootstrap intervals, between-seed spread, counts."""
  diff = np.asarray(first, np.float64) - np.asarray(second, np.float64)
  seeds = np.asarray(seeds)
  labels = np.unique(seeds)
  per_seed = {int(s): float(diff[seeds == s].mean()) for s in labels}
  within = bootstrap_means(diff, seeds, n_boot, rng, hierarchical=False)
  hier = bootstrap_means(diff, seeds, n_boot, rng, hierarchical=True)
  adjusted = 1 - (1 - LEVEL) / max(int(n_comparisons), 1)
  spread = np.asarray(list(per_seed.values()))
  return {"mean_diff": float(diff.mean()),
          "ci95_targets_within_seeds": _quantiles(within, LEVEL),
          "ci95_hierarchical": _quantiles(hier, LEVEL),
          "ci_hierarchical_bonferroni": _quantiles(hier, adjusted),
          "bonferroni_level": adjusted,
          "per_seed_mean_diff": {str(s): v for s, v in per_seed.items()},
          "between_seed_std": float(spread.std(ddof=1)) if spread.size > 1 else None,
          "first_lower": int(np.sum(diff < 0)), "first_higher": int(np.sum(diff > 0)),
          "targets": int(diff.size), "seeds": int(labels.size)}


def _check_pairing(a: dict, b: dict, seed: int, say=print, warned: set | None = None) -> None:
  """Refuses two stage files of one seed whose targets differ (by id, else by count)."""
  ids_a, ids_b = a.get("per_target_ids"), b.get("per_target_ids")
  key_a, key_b = _hit_key(a), _hit_key(b)
  where = f"seed {seed}: {a.get('_file', '?')} and {b.get('_file', '?')}"
  if ids_a is not None and ids_b is not None:
    if list(ids_a) != list(ids_b):
      raise ConfigError(f"{where} attacked different targets (per_target_ids differ); "
                        "a paired comparison needs the same targets in the same order")
    return
  if len(a[key_a]) != len(b[key_b]):
    raise ConfigError(f"{where} hold {len(a[key_a])} and {len(b[key_b])} targets; "
                      "cannot pair them")
  if warned is None or where not in warned:
    say(f"warning: {where}: no per_target_ids (older files); paired by position")
    if warned is not None:
      warned.add(where)


def compare(stages: dict, n_boot: int = 4000, seed: int = 0, say=print) -> dict:
  """Every defence pair under FGSM / PGD and every attacker pair on every defence."""
  rng = np.random.default_rng(seed)
  seeds = sorted(stages)
  defences = [d for d in stages[seeds[0]] if all(d in stages[s] for s in seeds)]

  @functools.cache
  def runs(defence, attacker):
    got = [stages[s][defence].get(attacker) for s in seeds]
    if any(r is None for r in got):
      return None
    for s, r in zip(seeds, got):
      r.setdefault("_file", stages[s][defence].get("_file", f"seed_{s}/{defence}"))
    return got

  def vectors(rs, when):
    keys = [_hit_key(r, when) for r in rs]
    if any(k is None for k in keys):
      return None
    return np.concatenate([np.asarray(r[k], np.float64) for r, k in zip(rs, keys)])

  jobs = {"defence_pairs": [], "attacker_pairs": []}
  for a in DEFENCE_ATTACKERS:
    for x, y in DEFENCE_PAIRS:
      if x in defences and y in defences and runs(x, a) and runs(y, a):
        jobs["defence_pairs"].append(({"attacker": a, "first": x, "second": y},
                                      runs(x, a), runs(y, a)))
  for d in defences:
    for x, y in ATTACKER_PAIRS:
      if runs(d, x) and runs(d, y):
        jobs["attacker_pairs"].append(({"defence": d, "first": x, "second": y},
                                       runs(d, x), runs(d, y)))

  out = {"seeds": seeds, "level": LEVEL,
         "n_comparisons": {b: len(j) for b, j in jobs.items()}}
  warned: set = set()
  for bucket, items in jobs.items():
    out[bucket] = []
    for lead, ra, rb in items:
      for s, a, b in zip(seeds, ra, rb):
        _check_pairing(a, b, s, say, warned)
      labels = np.concatenate([np.full(len(r[_hit_key(r)]), s) for s, r in zip(seeds, ra)])
      m = len(items)
      entry = {**lead, **paired(vectors(ra, "after"), vectors(rb, "after"), labels, n_boot,
                                rng, m)}
      before_a, before_b = vectors(ra, "before"), vectors(rb, "before")
      if before_a is not None and before_b is not None:
        entry["gain"] = paired(vectors(ra, "after") - before_a, vectors(rb, "after") - before_b,
                               labels, n_boot, rng, m)
      out[bucket].append(entry)
  return out


def markdown(result: dict) -> str:
  from uatmc_jax.core.reporting import markdown_table

  def ci(p, key):
    lo, hi = p[key]
    return f"[{lo:+.4f}, {hi:+.4f}]"

  def row(lead, p):
    std = p["between_seed_std"]
    return [*lead, f"{p['mean_diff']:+.4f}", ci(p, "ci95_hierarchical"),
            ci(p, "ci_hierarchical_bonferroni"), "–" if std is None else f"{std:.4f}",
            ci(p, "ci95_targets_within_seeds"),
            f"{p['first_lower']} / {p['first_higher']} of {p['targets']}"]

  def cols(m):
    return ["mean Δ Hit after (first − second)", "95 % CI hierarchical (seeds, then targets)",
            f"Bonferroni CI (m = {m})", "between-seed std of Δ",
            "95 % CI targets within seeds (models fixed)", "targets first lower / higher"]

  n = result.get("n_comparisons", {})
  text = (f"Defence pairs ({n.get('defence_pairs', len(result['defence_pairs']))} "
          "comparisons): read the hierarchical interval, which includes training-seed "
          "variation.\n\n")
  text += markdown_table(["attacker", "first", "second",
                          *cols(n.get("defence_pairs", 1))],
                         [row((p["attacker"], p["first"], p["second"]), p)
                          for p in result["defence_pairs"]])
  if result["attacker_pairs"]:
    text += (f"\n\nAttacker pairs on one defence "
             f"({n.get('attacker_pairs', len(result['attacker_pairs']))} comparisons):\n\n")
    text += markdown_table(["defence", "first", "second",
                            *cols(n.get("attacker_pairs", 1))],
                           [row((p["defence"], p["first"], p["second"]), p)
                            for p in result["attacker_pairs"]])
  with_gain = [p for p in result["defence_pairs"] if "gain" in p]
  if with_gain:
    text += "\n\nGain (Hit after − Hit before, per target), defence pairs:\n\n"
    text += markdown_table(["attacker", "first", "second",
                            *cols(n.get("defence_pairs", 1))],
                           [row((p["attacker"], p["first"], p["second"]), p["gain"])
                            for p in with_gain])
  else:
    text += ("\n\nHit after attack includes each model's clean Hit (these stage files do "
             "not store per-target clean values): defence pairs compare exposure after "
             "attack.")
  return (text + f"\n\nEach interval is {LEVEL:.0%} for its own pair; the Bonferroni "
          "column holds the family of m comparisons of its table at 95 %. With few seeds "
          "the hierarchical interval is coarse; the between-seed std (ddof 1) of the "
          "per-seed mean differences stands beside it.")
