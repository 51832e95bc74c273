"""Long-tailed adversarial training end to end: data -> LT subset -> trainer -> results.json.

The pipeline behind ``experiments.train_longtail`` (METHODS.md B.1-B.5). Writes
``<workdir>/results.json``: dataset, imbalance_ratio, n_max, method, model,
class_counts (the training counts used), train_seconds, and for ``clean`` and
``pgd20`` the block {per_class, overall, balanced, many, medium, few, tail}.
Checkpoints go to ``<workdir>/checkpoints``; rerunning the same command resumes.
``eval_robust=pgd20+cw+autoattack`` runs the robust evaluation
(``longtail.evaluation.evaluate``) on the trained model afterwards.
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import time

import jax

from uatmc_jax.core import reporting
from uatmc_jax.core.errors import ConfigError
from uatmc_jax.core.parallel import mesh as mesh_lib
from uatmc_jax.longtail import epoch_metrics
from uatmc_jax.longtail import methods as longtail_methods
from uatmc_jax.longtail import trainer as longtail_trainer
from uatmc_jax.longtail.train_config import LongTailTrainConfig
from uatmc_jax.longtail.data import image_folder, longtail
from uatmc_jax.longtail.data.image_pipeline import TrainPipeline, eval_batches


TFDS_NAMES = ("cifar10", "cifar100")


def load_datasets(cfg):
  """(train ImageDataset, test ImageDataset) for dataset = cifar10 | cifar100 | folder."""
  if cfg.dataset == "folder":
    if not cfg.data_dir:
      raise ConfigError("dataset=folder needs data_dir=<root with train/ and test/>")
    n_max = cfg.n_max
    cache_dir = cfg.get("cache_dir") or None
    # With n_max set only a seeded n_max-file subsample of each class (data_seed) is
    # decoded; make_longtail then draws the profile from it (the head class: all of it).
    train = image_folder.load_image_folder(os.path.join(cfg.data_dir, "train"),
                                           max_per_class=n_max, seed=int(cfg.data_seed),
                                           cache_dir=cache_dir)
    test = image_folder.load_image_folder(os.path.join(cfg.data_dir, "test"),
                                          class_names=train.class_names,
                                          max_per_class=cfg.test_per_class,
                                          seed=longtail.EVAL_SUBSET_SEED,
                                          cache_dir=cache_dir)
    return train, test
  if cfg.dataset in TFDS_NAMES:
    from uatmc_jax.longtail.data import tfds_images  # imported lazily: TFDS is slow to import
    train = tfds_images.load_tfds_images(cfg.dataset, "train", cfg.data_dir)
    test = tfds_images.load_tfds_images(cfg.dataset, "test", cfg.data_dir)
    return train, longtail.balanced_subset(test, cfg.test_per_class)
  raise ConfigError(f"dataset: expected one of {TFDS_NAMES + ('folder',)}, got {cfg.dataset!r}")


def _eval_batch_size(n: int) -> int:
  # at most 256; a multiple of 8 (any data-axis size up to 8 divides it)
  return 256 if n >= 256 else 8 * ((n + 7) // 8)


def _cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def train_and_evaluate(cfg, workdir: str) -> dict:
  t_start = time.perf_counter()
  train_full, test = load_datasets(cfg)
  train, counts = longtail.make_longtail(train_full, float(cfg.imbalance_ratio),
                                         n_max=cfg.n_max, seed=int(cfg.data_seed))
  n_max = int(counts[0])
  method = longtail_methods.resolve_method(cfg.method, beta=cfg.beta, etf_weight=cfg.etf_weight,
                                           manifold_weight=cfg.manifold_weight)
  config = LongTailTrainConfig(
      model=cfg.model, model_kwargs=cfg.model_kwargs.to_dict(), num_epochs=int(cfg.epochs), batch_size=int(cfg.batch_size),
      learning_rate=float(cfg.lr), schedule=cfg.schedule,
      warmup_epochs=float(cfg.warmup_epochs), weight_decay=float(cfg.weight_decay),
      attack_steps=int(cfg.pgd_steps), attack_step_size=float(cfg.pgd_step_size),
      latent_dim=int(cfg.latent_dim),
      manifold_hidden_dim=int(cfg.manifold_hidden), latent_steps=int(cfg.latent_steps),
      latent_step_size=float(cfg.latent_step_size), manifold_refresh=cfg.manifold_refresh,
      manifold_warmup_epochs=int(cfg.manifold_warmup_epochs),
      manifold_fit_steps=int(cfg.manifold_fit_steps),
      manifold_learning_rate=float(cfg.manifold_lr), seed=int(cfg.seed),
      compute_dtype=str(cfg.compute_dtype),
      matmul_precision=str(cfg.get("matmul_precision", "default")),
      diagnostics=bool(cfg.get("diagnostics", True)),
      diagnostics_batch_size=int(cfg.get("diagnostics_batch_size", 64)),
      diagnostics_in_step=bool(cfg.get("diagnostics_in_step", False)))
  batch_size = min(config.batch_size, len(train))
  pipe = TrainPipeline(train.images, train.labels, batch_size=batch_size,
                       seed=int(cfg.seed))
  trainer = longtail_trainer.LongTailTrainer(
      config, method, num_classes=train.num_classes, class_counts=counts,
      steps_per_epoch=pipe.steps_per_epoch, mesh=mesh_lib.make_mesh(data=int(cfg.mesh_data)))
  print(f"train_longtail: {cfg.dataset} IR={cfg.imbalance_ratio} n_max={n_max} "
        f"counts={counts.tolist()} method={method.name} model={cfg.model} "
        f"test={len(test)} images", file=sys.stderr, flush=True)
  eval_bs = _eval_batch_size(len(test))
  monitor = longtail.balanced_subset(test, int(cfg.monitor_per_class))
  state, info = trainer.fit(
      pipe, workdir, monitor_every=int(cfg.monitor_every),
      monitor_pgd_steps=int(cfg.monitor_pgd_steps),
      monitor_batches=lambda: eval_batches(monitor.images, monitor.labels,
                                           batch_size=_eval_batch_size(len(monitor))))
  t_eval = time.perf_counter()
  blocks = trainer.evaluate(state, eval_batches(test.images, test.labels, batch_size=eval_bs),
                            pgd_steps=int(cfg.eval_pgd_steps), seed=int(cfg.seed))
  test_scalars = {}
  for name, block in blocks.items():
    test_scalars.update(epoch_metrics.group_scalars(f"test/{name}", block))
  trainer.write_scalars(workdir, int(cfg.epochs) * pipe.steps_per_epoch, test_scalars)
  results = {
      "dataset": cfg.dataset, "data_dir": cfg.data_dir,
      "imbalance_ratio": float(cfg.imbalance_ratio), "n_max": n_max,
      "n_max_note": ("runlocal: reduced n_max" if cfg.runlocal else "") or None,
      "method": method.name,
      "method_spec": {k: getattr(method, k) for k in method.__dataclass_fields__},
      "model": cfg.model, "epochs": int(cfg.epochs), "seed": int(cfg.seed),
      "class_counts": counts.tolist(), "n_train": int(len(train)), "n_test": int(len(test)),
      "class_names": list(train.class_names),
      "preset": cfg.preset,
      "train_seconds": info["train_seconds"], "eval_seconds": time.perf_counter() - t_eval,
      "total_seconds": time.perf_counter() - t_start,
      # user+system CPU time of this process: comparable across machine loads (on an
      # idle 2-core machine the wall time is roughly half of it).
      "cpu_seconds": _cpu_seconds(),
      "monitor": info["monitor"],
      "last_epoch_metrics": info["last_epoch_metrics"],
      "diagnostics": info["diagnostics"],
      "runlocal": bool(cfg.runlocal),
      **blocks,
  }
  if mesh_lib.is_primary_process():
    reporting.write_json(os.path.join(workdir, "results.json"), results)
    rows = [[k, results[k]["overall"], results[k]["balanced"], results[k]["tail"]]
            for k in blocks]
    print(reporting.markdown_table(["eval", "overall", "balanced", "tail"], rows))
  attacks = [a for a in str(cfg.eval_robust or "").replace(";", "+").split("+") if a] \
      if isinstance(cfg.eval_robust, str) else list(cfg.eval_robust or ())
  if attacks and jax.process_count() > 1:
    # Multi-host: evaluate in this jax.distributed run (a subprocess would be a separate,
    # single-process job on every host), after process 0 has written results.json.
    from jax.experimental import multihost_utils
    from uatmc_jax.longtail.evaluation import evaluate
    multihost_utils.sync_global_devices("train_longtail: results.json written")
    evaluate.evaluate_workdir(workdir, attacks, mesh_data=int(cfg.mesh_data))
  elif attacks:
    subprocess.run([sys.executable, "-m", "experiments.eval_robust", f"--workdir={workdir}",
                    f"--attacks={','.join(attacks)}"], check=True)
  return results
