"""One training job of a recommender, from config to ``results.json`` (METHODS.md A.3).

``train_and_evaluate(config, workdir)`` is what the ``experiments.train_recsys`` launcher
runs: it loads ``config["dataset"]`` (:func:`load_experiment_data`, with optional
random features of given widths), builds ``config["model"]`` on a mesh from config with
its tables created sharded (``build_sharded_recommender``), trains it with the one loop
(``recsys.trainer.RecsysTrainer``), and writes ``config.json`` and ``results.json``
(clean valid/test metrics of the valid-selected checkpoint beside the most-popular
baseline's; :func:`below_popularity` flags a model that ranks no better than it).
``load_trained_recommender(workdir)`` restores such a workdir's model, which the attack
evaluation (A.4, ``recsys.attack_eval``) starts from.
"""
from __future__ import annotations

from typing import Any, Mapping

from uatmc_jax.core.errors import ConfigError
from uatmc_jax.core.parallel import mesh as mesh_lib
from uatmc_jax.core.parallel import sharding_rules
from uatmc_jax.recsys.data.interactions import InteractionData
from uatmc_jax.recsys.stage_io import plain
from uatmc_jax.recsys.trainer import TRAIN_DEFAULTS, RecsysTrainer

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"


def parse_random_features(spec: Any) -> dict[str, int] | None:
  """``"image:4096+text:384"`` (or a dict) -> ``{"image": 4096, "text": 384}``."""
  if not spec:
    return None
  if isinstance(spec, Mapping):
    return {str(k): int(v) for k, v in spec.items()}
  out = {}
  for part in str(spec).replace(";", "+").split("+"):
    name, sep, width = part.partition(":")
    if not sep or not name.strip() or not width.strip().isdigit():
      raise ConfigError(f"random_features {spec!r}: expected modality:width joined by '+', "
                        "e.g. image:4096+text:384")
    out[name.strip()] = int(width)
  return out


def load_experiment_data(config: Mapping[str, Any]) -> InteractionData:
  """The dataset named by ``config["dataset"]``.

  Optional keys: ``random_features`` (see :func:`parse_random_features`) and
  ``dataset_kwargs`` (forwarded to ``load_dataset``, e.g. synthetic generator sizes).
  """
  from uatmc_jax.recsys.data.mmrec import load_dataset
  kwargs = dict(config.get("dataset_kwargs") or {})
  extra = parse_random_features(config.get("random_features"))
  if extra:
    if config["dataset"] == "synthetic":
      raise ConfigError("random_features applies to MMRec folders, not to 'synthetic'")
    kwargs["random_features"] = extra
  return load_dataset(config["dataset"], **kwargs)


def _build(config: Mapping[str, Any], data: InteractionData, workdir: str | None):
  from uatmc_jax.recsys.models.registry import RECOMMENDERS, build_sharded_recommender
  if config["model"] not in RECOMMENDERS:
    raise ConfigError(f"model {config['model']!r} is unknown; expected one of "
                      f"{list(RECOMMENDERS)}")
  train_cfg = dict(config.get("train") or {})
  mesh = mesh_lib.make_mesh(data=int(config.get("mesh_data", -1)),
                            model=int(config.get("mesh_model", 1)))
  # Tables padded to a multiple of the model axis (none when it is 1) and created on
  # their shardings; with mesh_model 1 the values equal build_recommender's.
  model = build_sharded_recommender(
      config["model"], data, config.get("model_config"),
      int(train_cfg.get("seed", TRAIN_DEFAULTS["seed"])), mesh,
      train_cfg.get("param_sharding", sharding_rules.RECSYS_TABLE_RULES))
  return RecsysTrainer(model, data, train_cfg, workdir=workdir, mesh=mesh)


BELOW_POPULARITY_KEY = "below_popularity"


def below_popularity(model_valid: Mapping[str, float], popularity_valid: Mapping[str, float],
                     metric: str, train_config: Mapping[str, Any] | None = None,
                     align_weight: float | None = None) -> dict | None:
  """The verdict on a trained backbone that ranks no better than the most-popular
  baseline on the validation split (None when it ranks better).

  A collapsed model (BPR stuck near log 2, every vector pulled to zero by EmbLoss, e.g.
  VBPR-MLP without its InfoNCE term on TikTok: test Recall@20 .038 vs most-popular
  .087) ends its run normally; this verdict is what makes that visible.

  Returns:
    ``{"split": "valid", "metric", "model", "most_popular", "advice"}``.
  """
  model_value, pop_value = float(model_valid[metric]), float(popularity_valid[metric])
  if model_value > pop_value:
    return None
  cfg = dict(train_config or {})
  advice = ("the model learned less than ranking by train popularity. Likely a collapse "
            "(BPR loss near log 2 = 0.693 in the history) from a regulariser too strong "
            f"for the signal (reg_weight={cfg.get('reg_weight')}"
            f"{', align_weight 0: InfoNCE off' if align_weight == 0 else ''}) or "
            f"too few updates (lr={cfg.get('learning_rate')}). Try the defaults selected "
            "on TikTok (lr 5e-3, reg_weight 2.0, VBPR-MLP align_weight 1.0; "
            "experiments/configs/recsys.py), a smaller reg_weight, a larger lr or more "
            "patience, and compare valid Recall@20 with the most-popular baseline.")
  return {"split": "valid", "metric": metric, "model": model_value,
          "most_popular": pop_value, "advice": advice}


def train_and_evaluate(config: Mapping[str, Any], workdir: str) -> dict:
  """Trains ``config["model"]`` on ``config["dataset"]`` and writes ``results.json``.

  Args:
    config: ``experiments/configs/recsys.py`` config (model, dataset, random_features,
      model_config, train, mesh_data); a plain dict works too.
    workdir: output folder: ``config.json``, ``checkpoints/``, ``results.json``. A rerun
      with the same workdir resumes from the newest checkpoint.

  Returns:
    the results dict: dataset, model, n_users, n_items, n_train, epochs_run, best_epoch,
    train_seconds, valid / test / popularity_valid / popularity_test ({"recall@20": ..}
    for every metric and K), ``below_popularity`` (None, or the verdict of
    :func:`below_popularity` when the selected model's valid metric is at or below the
    most-popular baseline's), plus config and history.
  """
  import os
  from uatmc_jax.core.reporting import write_json
  from uatmc_jax.recsys.metrics import most_popular_metrics

  config = dict(plain(config))
  data = load_experiment_data(config)
  trainer = _build(config, data, workdir)
  if mesh_lib.is_primary_process():
    write_json(os.path.join(workdir, CONFIG_FILE), config)
  record = trainer.fit()
  trainer.restore_best()
  ks = tuple(trainer.config["ks"])
  valid = trainer.evaluate("valid")
  popularity_valid = most_popular_metrics(data, "valid", ks, mesh=trainer.mesh)
  metric = trainer.config["selection_metric"]
  align = (config.get("model_config") or {}).get("align_weight")
  verdict = below_popularity(valid, popularity_valid, metric, trainer.config,
                             align if config["model"] == "vbpr_mlp" else None)
  if verdict is not None:
    from absl import logging
    logging.warning("%s on %s is BELOW THE MOST-POPULAR BASELINE: valid %s %.4f vs %.4f; %s",
                    config["model"], data.name, metric, verdict["model"],
                    verdict["most_popular"], verdict["advice"])
  results = {
      "dataset": data.name, "dataset_path": str(config["dataset"]), "model": config["model"],
      "n_users": data.n_users, "n_items": data.n_items, "n_train": int(len(data.train)),
      "modalities": list(data.modalities),
      "epochs_run": int(record["epoch"]) + 1, "best_epoch": int(record["best_epoch"]),
      "stopped_early": bool(record["stopped_early"]),
      "train_seconds": float(record["train_seconds"]),
      "valid": valid, "test": trainer.evaluate("test"),
      "popularity_valid": popularity_valid,
      "popularity_test": most_popular_metrics(data, "test", ks, mesh=trainer.mesh),
      BELOW_POPULARITY_KEY: verdict,
      "config": config, "history": record["history"],
  }
  if mesh_lib.is_primary_process():
    write_json(os.path.join(workdir, RESULTS_FILE), results)
  if trainer.store is not None:
    trainer.store.close()
  return results


def load_trained_recommender(workdir: str, *, best: bool = True):
  """(model, data, config) of a workdir written by :func:`train_and_evaluate`.

  Args:
    workdir: the training workdir (holds ``config.json`` and ``checkpoints/``).
    best: restore the best (valid-selected) checkpoint, else the newest one.

  Raises:
    ConfigError: the workdir has no config or no checkpoint.
  """
  import os
  from uatmc_jax.core.reporting import read_json

  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise ConfigError(f"{path} not found: --workdir must hold a model trained by "
                      "experiments.train_recsys")
  config = read_json(path)
  config.setdefault("train", {})["log"] = False
  data = load_experiment_data(config)
  trainer = _build(config, data, workdir)
  if not trainer.restore("best" if best else "latest") and not trainer.restore("latest"):
    raise ConfigError(f"{workdir}/checkpoints: no checkpoint to restore")
  model = trainer.model
  trainer.store.close()
  return model, data, config
