"""The UAT-MC experiment end to end: stages, resume, orchestration (METHODS.md A.7-A.8).

Per seed: trains the backbone (vanilla BPR), trains every defence (APR and AMR
fine-tuned from the backbone by default, ``adv_from_backbone``, or from scratch; UAT-MC
with and without alignment fine-tuned from the backbone's best checkpoint with its
projection MLPs frozen), attacks each trained model through the A.4 protocol
(``attacks.protocol``; the stage itself is ``recsys.attack_stage``) with FGSM, PGD and
aligned PGD (with ``attackers=all`` also the group variants PGD-PCGrad and PGD-shared
groups) at every budget of ``attack_epsilon`` (e.g. 0.05+0.2+0.5), and optionally
sweeps UAT-MC's λ_adv (or ε) for the defence–accuracy trade-off. ``report`` aggregates
and writes:

* ``results.json``: ``{"defences": {name: {"recall@20", "ndcg@10", "ndcg@20",
  "attacks": {"fgsm" | "pgd" | "pgd_aligned": {"hit@K_before", "hit@K_after",
  "avg_rank_change"}}}}}`` with K the attack objective's ``attack_k`` (50, A.4; also
  under ``hit_k``) and every number ``{"mean", "std"}`` over seeds (sample std, ddof 1;
  a seed's value is the mean over its targets) at the first budget ``epsilon``, every
  budget under ``by_epsilon`` ({"0.2": {defence: {attacker: ...}}}), the A.5
  diagnostics under ``mismatch`` ({defence: {attacker: cosine quantiles, shares, gain
  correlation}}, see ``report.mismatch_summary``), plus ``attackers``, ``protocol``,
  ``relative_ndcg@10_drop``, ``sweep`` and ``seconds``;
* ``results.md``: the table in the paper's layout (A.8), one per further budget, and
  the mismatch diagnostics;
* ``tradeoff.png``: clean NDCG@10 against Hit@K after PGD, every defence and the sweep;
* ``mismatch.png``: per-target cross-modal gradient cosines (A.5).

Every stage writes its own result files under ``<workdir>/seed_<s>/<stage>/``
(``train_results.json``, ``attack_results_eps<ε>.json`` per budget, next to the
trainer's checkpoints), so a restarted run skips finished stages, resumes an unfinished
training from its newest checkpoint, and runs only the attackers a result file lacks.
Whether a stage is finished is decided on process 0 and broadcast to the others
(``stage_io.saved_json``), so processes of a pod never disagree about it. An attack
entry keeps its targets' ids (``per_target_ids``) and per-target Hit@K before and after,
which the paired comparisons (``recsys.paired``) check and use.

Most-popular check: the most-popular ranking's valid Recall@20 is computed once per
run; a stage whose model ends at or below it gets ``below_popularity`` (the trainer's
verdict: the two values and advice; None otherwise) in its ``train_results.json``, a loud
log block, its seed in results.json's
``defences.<name>.below_popularity`` (and ``sweep.below_popularity``), and a warning
above results.md's table.

Stage summaries: ``<workdir>/tensorboard/<stage>/`` holds TensorBoard scalars of each
stage (step = seed; see ``write_stage_summary``): ``tensorboard --logdir <workdir>/tensorboard``.

Workdirs may be remote (``gs://...``): the experiment's own files go through
``etils.epath`` and are never made absolute or local (TensorBoard summaries are written
for local workdirs only).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uatmc_jax.core.errors import ConfigError
from uatmc_jax.core.metric_writer import ScalarWriter
from uatmc_jax.core.parallel import mesh as mesh_lib
from uatmc_jax.core.reporting import is_remote_path, std_header, write_json, write_text
from uatmc_jax.recsys import report, train_job
from uatmc_jax.recsys.attack_stage import AttackBench, attack_stage, attackers_for
from uatmc_jax.recsys.defences import DEFENCES, FINE_TUNES_BACKBONE, defence_hyperparameters
from uatmc_jax.recsys.metrics import most_popular_metrics
from uatmc_jax.recsys.models.registry import build_recommender
from uatmc_jax.recsys.stage_io import join_path, json_plain, make_dirs, plain, saved_json, say
from uatmc_jax.recsys.train_job import load_experiment_data
from uatmc_jax.recsys.trainer import RecsysTrainer

TRAIN_FILE = "train_results.json"
POPULARITY_METRIC = "recall@20"  # the selection metric (A.3) the baseline is compared on
BELOW_KEY = "below_popularity"  # the trainer's results key (train_recsys's results.json)
SUMMARY_DIR = "tensorboard"


# ----------------------------------------------------------------------------------
# The most-popular baseline (a model at or below it has learnt nothing personal).


def popularity_baseline(data, mesh=None) -> dict:
  """The most-popular baseline's valid metrics (train popularity ranking, A.3 protocol)."""
  return most_popular_metrics(data, "valid", ks=(5, 10, 20, 50), mesh=mesh)


def below_popularity(metrics: dict, popularity: dict | None, train_cfg: dict | None = None,
                     model_name: str = "") -> dict | None:
  """The verdict when the stage's valid Recall@20 is at or below the most-popular one.

  The trainer's verdict (``recsys.train_job.below_popularity``, the format of
  ``train_recsys``'s results.json: ``{"split", "metric", "model", "most_popular",
  "advice"}``), or None when the model ranks better (or no baseline is given).
  """
  if popularity is None or "valid" not in metrics:
    return None
  return train_job.below_popularity(metrics["valid"], popularity, POPULARITY_METRIC,
                                    train_cfg, model_name)


def _flag_popularity(stage_dir: str, metrics: dict, popularity: dict | None,
                     train_cfg: dict | None = None, model_name: str = "") -> None:
  """Sets the stage's ``below_popularity`` (verdict or None); says so loudly when set."""
  if popularity is None:
    return
  verdict = below_popularity(metrics, popularity, train_cfg, model_name)
  metrics[BELOW_KEY] = verdict
  metrics["popularity_valid"] = {k: float(v) for k, v in popularity.items()}
  _warn_below(stage_dir, verdict)


def _warn_below(stage_dir: str, verdict: dict | None) -> None:
  if not verdict:
    return
  say("!" * 72)
  say(f"WARNING: {stage_dir}: BELOW THE MOST-POPULAR BASELINE: valid {verdict['metric']} "
      f"{verdict['model']:.4f} vs most-popular {verdict['most_popular']:.4f}; its attack "
      f"numbers say little. {verdict['advice']}")
  say("!" * 72)


# ----------------------------------------------------------------------------------
# Stages.


def defence_train_config(cfg, name: str, seed: int, overrides: dict | None = None) -> dict:
  """The trainer config of defence ``name`` for one seed (loss picked by name)."""
  train = dict(plain(cfg.train))
  train.update(loss=name, seed=int(seed), log=True)
  if name in ("uat_mc", "uat_mc_no_align"):
    train.update(epochs=cfg.finetune["epochs"], patience=cfg.finetune["patience"])
    train.update({k: v for k, v in plain(cfg.uat_mc).items() if v is not None})
  elif name in ("apr", "amr"):
    train.update({k: v for k, v in plain(cfg[name]).items() if v is not None})
    if cfg.adv_from_backbone:
      train.update(epochs=cfg.finetune["epochs"], patience=cfg.finetune["patience"])
  train.update(overrides or {})
  return train


def train_stage(stage_dir: str, model, data, train_cfg: dict, mesh,
                popularity: dict | None = None, model_name: str = ""):
  """Trains (or resumes, or just restores) one model; returns (best model, metrics).

  Whether the stage is finished (its ``train_results.json`` exists) is decided on
  process 0 and broadcast (``stage_io.saved_json``). With ``popularity`` (the most-popular
  baseline's valid metrics) the metrics get ``below_popularity``: the verdict of
  :func:`below_popularity` when the model is at or below it, else None.
  """
  path = join_path(stage_dir, TRAIN_FILE)
  trainer = RecsysTrainer(model, data, train_cfg, workdir=stage_dir, mesh=mesh)
  saved_metrics = saved_json(path)
  if saved_metrics is not None:
    if not trainer.restore("best"):
      raise ConfigError(f"{path} exists but {stage_dir}/checkpoints has no best checkpoint "
                        "(on this process: a multi-process run needs a workdir every "
                        "process can read)")
    metrics = saved_metrics
    saved = metrics.get("config")
    current = json_plain({k: v for k, v in train_cfg.items() if k != "ks"})
    if saved is not None and saved != current:
      changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
      raise ConfigError(
          f"{path} was trained with a different config (fields {changed}: saved "
          f"{ {k: saved.get(k) for k in changed} }, now { {k: current.get(k) for k in changed} }); "
          "use a new --workdir or the original arguments")
    if popularity is not None and BELOW_KEY not in metrics:
      _flag_popularity(stage_dir, metrics, popularity, train_cfg, model_name)
      write_json(path, metrics)  # older stage files gain the verdict once
    else:
      _warn_below(stage_dir, metrics.get(BELOW_KEY))
  else:
    t0 = time.perf_counter()
    record = trainer.fit()
    trainer.restore_best()
    metrics = {"test": trainer.evaluate("test"), "valid": trainer.evaluate("valid"),
               "epochs_run": int(record["epoch"]) + 1, "best_epoch": int(record["best_epoch"]),
               "train_seconds": float(record["train_seconds"]),
               "stage_seconds": time.perf_counter() - t0,
               "seconds_per_epoch": float(np.mean([h["seconds"] for h in record["history"]]))
               if record["history"] else None,
               "config": {k: v for k, v in train_cfg.items() if k != "ks"}}
    _flag_popularity(stage_dir, metrics, popularity, train_cfg, model_name)
    write_json(path, metrics)
  model = trainer.model
  trainer.store.close()
  return model, metrics



# ----------------------------------------------------------------------------------
# The experiment.


def run_experiment(cfg, workdir: str) -> dict:
  """Runs (or resumes) every stage and writes results.json / results.md / plots."""

  unknown = sorted(set(cfg.defences) - set(DEFENCES))
  if unknown:
    raise ConfigError(f"defences {unknown} unknown; expected a subset of {list(DEFENCES)}")
  if "vanilla" not in cfg.defences:
    raise ConfigError("defences must include 'vanilla' (the backbone every UAT-MC run "
                      "fine-tunes and every row is compared with)")
  if cfg.sweep and cfg.sweep not in ("adv_weight", "epsilon"):
    raise ConfigError(f"sweep must be 'adv_weight', 'epsilon' or empty, got {cfg.sweep!r}")
  attackers, sweep_attackers = attackers_for(cfg)
  k = int(cfg.attack["k"])
  main_eps = float(cfg.attack["epsilon"])
  t_start = time.perf_counter()
  workdir = str(workdir)
  make_dirs(workdir)
  write_json(join_path(workdir, "config.json"), plain(cfg))
  data = load_experiment_data({"dataset": cfg.dataset})
  say(data.summary())
  n_data = int(cfg.mesh_data)
  mesh = (mesh_lib.make_mesh() if n_data == -1
          else mesh_lib.make_mesh(data=n_data, devices=jax.devices()[:n_data]))
  bench = AttackBench(cfg, data, mesh)
  say(f"user groups of the A.5 diagnostics: {bench.grouping}")
  popularity = popularity_baseline(data, mesh)
  say(f"most-popular baseline: valid {POPULARITY_METRIC} {popularity[POPULARITY_METRIC]:.4f} "
      "(a stage at or below it is flagged below_popularity)")
  if is_remote_path(workdir):
    say("TensorBoard stage summaries are written for local workdirs only "
        f"({workdir} is remote)")
  per_seed: dict[int, dict] = {}
  sweep_runs: dict[int, dict] = {}

  def fresh_model(seed):
    return build_recommender(cfg.model, data, plain(cfg.model_config), nnx.Rngs(seed))

  for seed in cfg.seeds:
    seed_dir = join_path(workdir, f"seed_{seed}")
    per_seed[seed] = {}
    backbone, metrics = train_stage(join_path(seed_dir, "vanilla"), fresh_model(seed), data,
                                    defence_train_config(cfg, "vanilla", seed), mesh,
                                    popularity, cfg.model)
    backbone_state = nnx.state(backbone)

    def from_backbone():
      # A copy: trainers donate their parameter buffers to the jitted epoch.
      m = fresh_model(seed)
      nnx.update(m, jax.tree.map(jnp.copy, backbone_state))
      return m

    for name in [d for d in DEFENCES if d in cfg.defences]:
      stage_dir = join_path(seed_dir, name)
      if name == "vanilla":
        model = backbone
      else:
        start = from_backbone() if (name in FINE_TUNES_BACKBONE or cfg.adv_from_backbone) \
            else fresh_model(seed)
        model, metrics = train_stage(stage_dir, start, data,
                                     defence_train_config(cfg, name, seed), mesh, popularity,
                                     cfg.model)
      by_eps = attack_stage(stage_dir, bench, model, seed, attackers)
      attacks = by_eps[main_eps]
      per_seed[seed][name] = {"train": metrics, "attacks": attacks,
                              "attacks_by_epsilon": by_eps}
      write_stage_summary(workdir, name, seed, metrics, by_eps, k)
      say(f"seed {seed} {name}: test ndcg@10 {metrics['test']['ndcg@10']:.4f}; hit@{k} "
          + ", ".join(f"{a} {attacks[a][f'hit@{k}_before']:.3f}->"
                      f"{attacks[a][f'hit@{k}_after']:.3f}" for a in attackers)
          + f"  [{time.perf_counter() - t_start:.0f} s]")

    if cfg.sweep and "uat_mc" in cfg.defences and seed in cfg.seeds[:cfg.sweep_seeds]:
      sweep_runs[seed] = {}
      for value in cfg.sweep_values:
        stage = f"uat_mc_{cfg.sweep}={value:g}"
        stage_dir = join_path(seed_dir, stage)
        model, metrics = train_stage(
            stage_dir, from_backbone(), data,
            defence_train_config(cfg, "uat_mc", seed, {cfg.sweep: float(value)}), mesh,
            popularity, cfg.model)
        by_eps = attack_stage(stage_dir, bench, model, seed, sweep_attackers, [main_eps])
        attacks = by_eps[main_eps]
        sweep_runs[seed][float(value)] = {"train": metrics, "attacks": attacks}
        write_stage_summary(workdir, stage, seed, metrics, by_eps, k)

  results = report.aggregate(cfg, per_seed, sweep_runs, attackers, sweep_attackers)
  results["protocol"] = {
      "dataset": data.name, "dataset_path": cfg.dataset, "model": cfg.model,
      "n_users": data.n_users, "n_items": data.n_items, "modalities": list(data.modalities),
      "seeds": list(cfg.seeds), "runlocal": bool(cfg.runlocal),
      "train": {k: v for k, v in plain(cfg.train).items()},
      "finetune": plain(cfg.finetune),
      "defence_hyperparameters": {n: _resolved(cfg, n) for n in cfg.defences},
      "attack": dict(plain(cfg.attack), space="projected", target_set="random",
                     ranking="all items, train items not masked (reference)"),
      "groups": bench.grouping,
      f"popularity_valid_{POPULARITY_METRIC}": float(popularity[POPULARITY_METRIC]),
      "metrics": "clean metrics on test (full ranking, A.3) of the valid-selected checkpoint; "
                 "attack numbers: per seed the mean over targets, then mean and sample std "
                 "(ddof 1) over seeds",
  }
  results["seconds"] = time.perf_counter() - t_start
  write_json(join_path(workdir, "results.json"), results)
  if jax.process_index() != 0:  # the Markdown table and the plots: process 0 only
    return results
  table = report.markdown(results)
  write_text(join_path(workdir, "results.md"),
             f"UAT-MC experiment: {data.name} / {cfg.model}, seeds {list(cfg.seeds)}"
             f"{' (runlocal)' if cfg.runlocal else ''}; attacks at ε = "
             f"{cfg.attack['epsilon']:g} (A.4), Hit@{k} over {cfg.attack['anchor_share']:.0%} "
             f"anchor users, {std_header(len(cfg.seeds))}; A.5 user groups: "
             f"{bench.grouping}\n\n{table}\n")
  report.tradeoff_plot(join_path(workdir, "tradeoff.png"), results)
  report.mismatch_plot(join_path(workdir, "mismatch.png"), per_seed)
  return results


def write_stage_summary(workdir: str, stage: str, seed: int, metrics: dict, by_eps: dict,
                        k: int) -> None:
  """One stage's clean metrics and attack results as TensorBoard scalars.

  Folder ``<workdir>/tensorboard/<stage>`` (one TensorBoard run per defence or sweep
  point), step = the seed; tags ``clean/{recall@20,ndcg@10,ndcg@20}``,
  ``valid/recall@20``, ``below_popularity`` (0 / 1), and per budget ε
  ``attack/eps<ε>/hit@K_before`` and ``attack/eps<ε>/hit@K_after/<attacker>``,
  ``attack/eps<ε>/avg_rank_change/<attacker>``. Process 0 only; local workdirs only
  (the writer makes its folder with ``os.makedirs``).
  """
  if is_remote_path(workdir):
    return
  scalars = {f"clean/{m}": metrics["test"][m] for m in ("recall@20", "ndcg@10", "ndcg@20")}
  scalars[f"valid/{POPULARITY_METRIC}"] = metrics["valid"][POPULARITY_METRIC]
  if BELOW_KEY in metrics:
    scalars[BELOW_KEY] = float(bool(metrics[BELOW_KEY]))
  for eps, results in by_eps.items():
    tag = f"attack/eps{float(eps):g}"
    for attacker, r in results.items():
      if not isinstance(r, dict) or f"hit@{k}_after" not in r:
        continue  # settings / groups / protocol entries of the stage file
      scalars[f"{tag}/hit@{k}_before"] = r[f"hit@{k}_before"]
      scalars[f"{tag}/hit@{k}_after/{attacker}"] = r[f"hit@{k}_after"]
      scalars[f"{tag}/avg_rank_change/{attacker}"] = r["avg_rank_change"]
  with ScalarWriter(join_path(workdir, SUMMARY_DIR, stage),
                    enabled=jax.process_index() == 0) as writer:
    writer.write(int(seed), scalars)


def _resolved(cfg, name):
  return defence_hyperparameters(name, defence_train_config(cfg, name, cfg.seeds[0]))
