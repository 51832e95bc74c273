"""The attack stage of the UAT-MC experiment: every trained model under the A.4 attacks.

Each model of an experiment (every defence, seed and sweep point, A.7) goes through the
one A.4 promotion-attack protocol (``attacks.protocol``: projected space, random
targets, the data's planted user groups or k-means ones) with the requested attackers
(FGSM, PGD, aligned PGD; with ``attackers=all`` also PGD-PCGrad and PGD-shared groups)
at every budget ε, and the A.5 mismatch diagnostics are recorded beside Hit@K (A.8).

* :func:`attackers_for`: the attackers a model supports (no aligned attacker, and no
  UAT-MC alignment, without a shared projected space);
* :class:`AttackBench`: one compiled runner shared by every model of the architecture;
* :func:`attack_stage`: one model's results per budget, kept in
  ``<stage>/attack_results_eps<ε>.json`` and reused on resume when made under the same
  protocol (:func:`attack_settings`); only the attackers a file lacks are run.
"""
from __future__ import annotations

import dataclasses
import types

import numpy as np

from uatmc_jax.core.errors import ConfigError
from uatmc_jax.core.reporting import write_json
from uatmc_jax.recsys.attacks import protocol, user_groups
from uatmc_jax.recsys.attacks.mismatch import per_target_mean
from uatmc_jax.recsys.attacks.objective import METRIC_KS
from uatmc_jax.recsys.attacks.surface import surface_from_recommender
from uatmc_jax.recsys.models.registry import MODEL_CLASSES
from uatmc_jax.recsys.stage_io import join_path, json_plain, plain, saved_json, say

ATTACK_FILE = "attack_results.json"  # the single-budget file of older runs
N_GROUPS = 4  # k-means groups when the data has no planted ones


def has_shared_space(model_name: str) -> bool:
  cls = MODEL_CLASSES.get(model_name)
  return bool(cls is None or cls.shared_projected_space)


def requested_attackers(cfg) -> tuple[str, ...]:
  """``cfg.attack["attackers"]`` checked (``all``: the five of ALL_ATTACKERS)."""
  names = list(cfg.attack.get("attackers") or protocol.ATTACKERS)
  if names == ["all"]:
    names = list(protocol.ALL_ATTACKERS)
  unknown = [n for n in names if n not in protocol.ALL_ATTACKERS]
  if unknown:
    raise ConfigError(f"attackers {unknown} unknown; expected a subset of "
                      f"{'+'.join(protocol.ALL_ATTACKERS)} or 'all'")
  if "pgd" not in names:
    raise ConfigError(f"attackers={'+'.join(names)} must include 'pgd' (the table's clean "
                      "Hit@K column and the trade-off plot read it)")
  return tuple(dict.fromkeys(names))


def attackers_for(cfg) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(attackers, sweep attackers) for ``cfg.model``; checks the defences apply to it.

  A model without a shared projected space (VBPR) has no aligned attacker (the cosine
  reward compares modality gradients in such a space) and refuses UAT-MC's alignment.
  """
  requested = requested_attackers(cfg)
  if has_shared_space(cfg.model):
    return requested, protocol.SWEEP_ATTACKERS
  if "uat_mc" in cfg.defences:
    raise ConfigError(f"defences include 'uat_mc', whose alignment needs a shared projected "
                      f"space, which model={cfg.model!r} does not have "
                      "(shared_projected_space=False); drop it from defences (e.g. "
                      "defences=vanilla+apr+amr+uat_mc_no_align) or use vbpr_mlp / mmgcn")
  drop = ("pgd_aligned",)
  return (tuple(a for a in requested if a not in drop),
          tuple(a for a in protocol.SWEEP_ATTACKERS if a not in drop))


class AttackBench:
  """Attacks models of one architecture with compiled chunk functions shared by all.

  ``PromotionAttackRunner`` takes the parameters and tables as arguments of its jitted
  chunk function and closes only over the architecture (graphdef), so one runner serves
  every trained model of an experiment (its ``surface`` is swapped per model) and each
  attacker compiles once, not once per (defence, seed). Every model goes through the
  one A.4 protocol (``attacks.protocol``): projected space, random targets, the data's
  planted user groups when it has them, else k-means.
  """

  def __init__(self, cfg, data, mesh=None):
    # mesh: each chunk of targets is split over its devices (all processes); the model
    # is replicated for the attack (see PromotionAttackRunner).
    self.cfg, self.data, self.mesh = cfg, data, mesh
    a = cfg.attack
    settings = types.SimpleNamespace(k=int(a["k"]), align_weight=float(a["align_weight"]),
                                     group_temperature=float(a.get("group_temperature", 0.1)))
    # The runner compiles an attacker once whatever its budget (ε is an argument of the
    # compiled function), so the other budgets are ``dataclasses.replace``d copies.
    self.attackers = {n: protocol.make_attacker(n, float(a["epsilon"]), settings,
                                                data.modalities)
                      for n in protocol.ALL_ATTACKERS}
    self.runner = None
    self.planted = protocol.use_planted_groups(data, "auto")
    self.grouping = user_groups.grouping_description(data, self.planted, N_GROUPS)

  def attack(self, model, seed: int, jobs: dict) -> dict:
    """{ε: {attacker: results}} for ``jobs`` = {ε: [attacker names]} on one model.

    The anchors' context (clean scores, top lists, graph cache) is built once for all.
    """
    a, data = self.cfg.attack, self.data
    model = protocol.local_copy(model)
    surface = surface_from_recommender(model, data.features, space="projected")
    n_targets = min(a["targets"], data.n_items)
    if self.runner is None:
      # Hit@K is reported at the K of the attack objective (A.4), whatever it is.
      ks = tuple(sorted(set(METRIC_KS) | {int(a["k"])}))
      self.runner = protocol.make_runner(surface, chunk_size=a["chunk_size"],
                                         n_targets=n_targets, mesh=self.mesh,
                                         graph_path=a.get("graph_path", "local"), ks=ks,
                                         with_mismatch=True, log=say)
    self.runner.surface = surface
    setup = protocol.seed_setup(surface, data, seed, anchor_share=a["anchor_share"],
                                n_targets=n_targets, k=a["k"], planted=self.planted,
                                n_groups=N_GROUPS)
    out = {}
    hit_k = int(a["k"])
    j = list(self.runner.ks).index(hit_k)
    for epsilon, name in [(e, n) for e, names in jobs.items() for n in names]:
      attacker = dataclasses.replace(self.attackers[name], epsilon=float(epsilon))
      r = self.runner.run(attacker, setup.ctx, setup.targets, setup.groups)
      cos_clean = per_target_mean(r["mismatch"].cosine)
      cos_after = per_target_mean(r["mismatch_at_delta"].cosine)
      out.setdefault(epsilon, {})[name] = {
          f"hit@{hit_k}_before": float(np.mean(r["hit_before"][:, j])),
          f"hit@{hit_k}_after": float(np.mean(r["hit_after"][:, j])),
          "avg_rank_before": float(np.mean(r["rank_before"])),
          "avg_rank_after": float(np.mean(r["rank_after"])),
          "avg_rank_change": float(np.mean(r["rank_after"] - r["rank_before"])),
          "dominant_group_differs_share": float(np.mean(r["mismatch"].dominant_differs)),
          "dominant_group_differs_share_after": float(
              np.mean(r["mismatch_at_delta"].dominant_differs)),
          "per_target_cosine_clean": cos_clean.tolist(),
          "per_target_cosine_after": cos_after.tolist(),
          # Pearson r of the per-user gains of the modalities' steps (A.5), per target.
          "per_target_gain_correlation_after": per_target_mean(
              r["mismatch_at_delta"].gain_correlation).tolist(),
          f"per_target_hit@{hit_k}_after": np.asarray(r["hit_after"][:, j], np.float64).tolist(),
          f"per_target_hit@{hit_k}_before": np.asarray(r["hit_before"][:, j],
                                                       np.float64).tolist(),
          # The targets in order: paired comparisons check them (recsys/paired.py).
          "per_target_ids": np.asarray(setup.targets, np.int64).tolist(),
          "n_targets": int(len(setup.targets)), "seconds": float(r["seconds"])}
    return out


def attack_file(epsilon: float) -> str:
  """The stage's result file of budget ε (one per budget, so a sweep of ε resumes)."""
  return f"attack_results_eps{float(epsilon):g}.json"


def attack_settings(cfg, epsilon: float) -> dict:
  """The protocol an attack result file was made under (compared on resume).

  chunk_size and graph_path (local / full re-encode: equal, tested) change memory and
  speed, not results; the budget list and the attacker list are per file (ε) and per
  entry (attacker), so none of them is part of it.
  """
  return json_plain(dict({k: v for k, v in plain(cfg.attack).items()
                          if k not in ("chunk_size", "graph_path", "epsilons", "attackers")},
                         epsilon=float(epsilon)))


def attack_stage(stage_dir: str, bench: AttackBench, model, seed: int, names,
                 epsilons=None) -> dict:
  """{ε: {attacker: results, ...}} for every budget, reusing what the stage saved.

  Saved results are reused only under the same protocol (budget, targets, anchors, K,
  ...): a restart with another budget recomputes instead of reporting stale numbers. A
  file that lacks some attackers (a rerun with more ``attackers``) gets only those run.
  Reads the single-budget ``attack_results.json`` of older runs too.
  """
  epsilons = [float(e) for e in (epsilons or bench.cfg.attack["epsilons"])]
  saved, jobs = {}, {}
  for eps in epsilons:
    settings = attack_settings(bench.cfg, eps)
    done = {}
    for candidate in (attack_file(eps), ATTACK_FILE):
      got = saved_json(join_path(stage_dir, candidate))  # process 0's reading, on all
      if got is not None and got.get("settings") == settings:
        done = got
        break
    saved[eps] = done
    missing = [n for n in names if n not in done]
    if missing:
      jobs[eps] = missing
  fresh = bench.attack(model, seed, jobs) if jobs else {}
  a = bench.cfg.attack
  for eps, results in fresh.items():
    out = dict(saved[eps])
    out.update(results)
    out["settings"] = attack_settings(bench.cfg, eps)
    out["groups"] = bench.grouping
    out["protocol"] = (f"A.4: projected space, random targets, {a['anchor_share']:.0%} "
                       f"anchors, K={a['k']} (objective and Hit@K), ε={eps:g}, ranks over "
                       "all items (train items not masked, the reference's)")
    write_json(join_path(stage_dir, attack_file(eps)), out)
    saved[eps] = out
  return saved
