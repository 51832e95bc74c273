"""Robustness evaluation of a trained long-tail classifier (METHODS.md B.5).

The pipeline behind ``experiments.eval_robust``. Attacks: clean is always evaluated;
pgd20 (CE, step 2/255, random start), cw (CW margin loss, 30 steps), autoattack
(standard: APGD-CE, APGD-T, FAB-T, Square 5000), autoattack_apgd (the cheaper APGD-CE +
APGD-T subset). ε = 8/255 by default. ``autoattack_per_class=k`` runs the AutoAttack
variants on a smaller seeded subsample (k per class) and the other attacks on the full
test set; each block records n_test and its own ``settings`` (the attack's budget and
seed, the batch size, and fingerprints of the images it ran on and of the run's test
set). ``keep_existing`` adds to an earlier eval_results.json instead of replacing it:
an earlier block is kept only when its own settings equal this run's for that attack;
otherwise (or when it records none) the attack is rerun under this run's settings and a
line says so.

Writes into the workdir (process 0 only):
  eval_results.json  {"clean" | <attack>: {"per_class", "overall", "balanced",
                      "many", "medium", "few", "tail", "seconds", "n_test",
                      "settings"}, "nc1",
                      "equiangularity", "etf_distance", "margin_bound", "settings"}
  eval_results.md    the Markdown table
  per_class_robust_accuracy.png  per-class accuracy under each attack, classes sorted
                      by training frequency (head left, tail right).
Every batch is split over the ``mesh_data`` devices of all processes and each process
attacks only its rows.

The classifier comes from
``longtail.trained_classifier.load_trained_classifier(workdir)``; the test set is
reloaded as recorded in the run's results.json (dataset, data_dir, class names, test
images per class: the same seeded per-class subsample, seed
``longtail.EVAL_SUBSET_SEED``, for TFDS and image folders).

Progress: every attack logs (stderr) a line per batch with the points (or point x
target runs) done / total, the robust count so far, seconds and ETA, and a summary
line per attack and per AutoAttack stage; only the clean-correct points are attacked,
and each AutoAttack stage only the points still robust. Geometry is measured on the
test set's penultimate features (NC1, equiangularity), the classifier rows (ETF
distance) and, for the Theorem-1 bound, on clean vs PGD-20 examples.
``evaluate_classifier`` is the same pipeline for any pure ``logits_fn`` /
``features_fn`` / W. Every attack and feature program runs with float32 matmuls /
convolutions at full precision (``precision.evaluation_precision``, "highest"), also
when the model was trained at "default" (TF32 on recent NVIDIA GPUs).
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
from typing import Callable, Dict, Mapping, Optional, Sequence

import jax
import numpy as np

from uatmc_jax.core import reporting
from uatmc_jax.core.errors import ConfigError
from uatmc_jax.longtail.evaluation import geometry, robust_accuracy


TABLE_KEYS = ("overall", "balanced", "many", "medium", "few", "tail", "n_test", "seconds")


def batched_features(features_fn, images: np.ndarray, batch_size: int,
                     mesh=None) -> np.ndarray:
  """φ(x) for (N, ...) images in fixed-size jitted batches (split over ``mesh``)."""
  from uatmc_jax.longtail.attacks import batching
  from uatmc_jax.core.parallel import precision
  fn = batching.on_mesh(jax.jit(lambda x, _: (features_fn(x),)), mesh, 1)
  with precision.evaluation_precision():
    (out,) = batching.map_in_fixed_batches(fn, [images], batch_size)
  return out


def per_class_plot(path: str, blocks: Dict[str, dict], train_counts: np.ndarray,
                   class_names: Optional[Sequence[str]] = None) -> None:
  """Per-class accuracy per attack, classes sorted by training frequency."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  order = np.argsort(-np.asarray(train_counts), kind="stable")
  xs = np.arange(len(order))
  fig, ax = plt.subplots(figsize=(max(6., 0.35 * len(order)), 4.))
  for name, block in blocks.items():
    acc = [np.nan if block["per_class"][c] is None else block["per_class"][c] for c in order]
    ax.plot(xs, acc, marker="o", ms=3, label=name)
  labels = [f"{class_names[c] if class_names else c}\n{train_counts[c]}" for c in order]
  if len(order) <= 20:
    ax.set_xticks(xs, labels, fontsize=7)
  reporting.finish_accuracy_axes(ax, "class (sorted by training count, head → tail)")
  reporting.save_figure(fig, path)


def markdown_report(blocks: Dict[str, dict], results: dict) -> str:
  rows = [[name] + [block[k] for k in TABLE_KEYS] for name, block in blocks.items()]
  table = reporting.markdown_table(["attack"] + list(TABLE_KEYS), rows)
  mb = results["margin_bound"]
  lines = [table, "",
           f"NC1 (test features): {results['nc1']:.4f}; equiangularity: "
           f"{results['equiangularity']:.4f}; ETF distance of W: {results['etf_distance']:.4f}"]
  if mb is not None:
    lines.append(
        f"Theorem 1: sin(θ_min/2) = {mb['sin_half_theta_min']:.4f}, L̂ = "
        f"{mb['lipschitz_estimate']:.3f}, bound = {mb['bound']:.4f}; measured margins "
        f"clean mean {mb['clean_margin']['mean']:.4f}, adversarial mean "
        f"{mb['adversarial_margin']['mean']:.4f} (min {mb['adversarial_margin']['min']:.4f})")
  lines.append("Groups from training counts: Many > 100, Medium 20–100, Few < 20, "
               "Tail = rarest 30% of classes; an empty group is shown as None.")
  return "\n".join(lines)


# The RobustEvalConfig fields each attack's numbers depend on (besides the images).
_ATTACK_FIELDS = {
    "clean": (),
    "pgd20": ("epsilon", "step_size", "pgd_steps", "seed", "batch_size"),
    "cw": ("epsilon", "step_size", "cw_steps", "seed", "batch_size"),
    "autoattack": ("epsilon", "apgd_iterations", "fab_iterations", "square_queries",
                   "n_target_classes", "seed", "batch_size"),
    "autoattack_apgd": ("epsilon", "apgd_iterations", "n_target_classes", "seed",
                        "batch_size"),
}


def images_fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
  """A short content hash of (images, labels): which test points a block ran on."""
  h = hashlib.sha1()
  for a in (np.ascontiguousarray(np.asarray(images, np.float32)),
            np.ascontiguousarray(np.asarray(labels, np.int64))):
    h.update(str(a.shape).encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


def block_settings(config: robust_accuracy.RobustEvalConfig, attack: str, *,
                   images_fp: str, test_set_fp: str, n_test: int) -> dict:
  """The settings one attack block was computed under (stored with the block)."""
  out = {k: getattr(config, k) for k in _ATTACK_FIELDS[attack]}
  out.update(images=images_fp, test_set=test_set_fp, n_test=int(n_test))
  return out


def _settings_diff(old: Optional[dict], new: dict) -> str:
  if not isinstance(old, dict):
    return "it records no settings"
  diffs = [f"{k} {old.get(k)!r} -> {new[k]!r}" for k in new
           if k != "images" and old.get(k) != new[k]]
  return ", ".join(diffs)


def _plan_keep_existing(path: str, attacks: Sequence[str], config, test_set_fp: str,
                        subset_fps: Mapping[str, str], n_tests: Mapping[str, int],
                        log: Callable[[str], None]) -> tuple[dict, list]:
  """Which blocks of an earlier eval_results.json can be kept, and which attacks this
  run must redo because their stored settings differ from this run's.

  A block is kept only when its own settings (attack budget, seed, batch size, the test
  set it was drawn from and, when this run gives that attack its own subset, that
  subset) equal this run's; a block on a seeded subset of the same test set is kept as
  such. Returns ({name: old block}, [attacks to rerun])."""
  if not os.path.exists(path):
    return {}, []
  old = reporting.read_json(path)
  kept, rerun = {}, []
  for name, block in old.items():
    if (name not in _ATTACK_FIELDS or name == "clean" or name in attacks
        or not isinstance(block, dict) or "per_class" not in block):
      continue
    old_settings = block.get("settings")
    want = block_settings(config, name, images_fp="", test_set_fp=test_set_fp,
                          n_test=n_tests.get(name, 0))
    same = isinstance(old_settings, dict) and all(
        old_settings.get(k) == v for k, v in want.items() if k not in ("images", "n_test"))
    if same and name in subset_fps:
      same = old_settings.get("images") == subset_fps[name]
    if same:
      kept[name] = block
      companion = f"clean_{name}_subset"
      if isinstance(old.get(companion), dict):
        kept[companion] = old[companion]
    else:
      diff = _settings_diff(old_settings, {k: v for k, v in want.items() if k != "n_test"})
      log(f"keep_existing: {name} in {path} was computed under other settings "
          f"({diff}); rerunning it under this run's settings")
      rerun.append(name)
  return kept, rerun


def evaluate_classifier(logits_fn: Callable, features_fn: Callable, weight: np.ndarray,
                        images: np.ndarray, labels: np.ndarray, train_counts: np.ndarray,
                        attacks: Sequence[str], config: robust_accuracy.RobustEvalConfig,
                        out_dir: Optional[str] = None,
                        class_names: Optional[Sequence[str]] = None,
                        log: Callable[[str], None] = print, mesh=None,
                        evaluator: Optional[robust_accuracy.RobustEvaluator] = None,
                        attack_subsets: Optional[Mapping[str, tuple]] = None,
                        keep_existing: bool = False) -> dict:
  """Runs clean + `attacks`, geometry, and (if out_dir) writes json / md / png.

  With a `mesh` every batch is split over its devices (one host or many): each process
  attacks its rows, the per-example results are gathered on every process, and process
  0 writes the files. `logits_fn` / `features_fn` must then close over arrays
  replicated on the mesh. `evaluator` (optional) is used instead of a new one."""
  for a in attacks:
    if a not in robust_accuracy.ATTACK_NAMES or a == "clean":
      raise ConfigError(f"--attacks: unknown attack {a!r}; expected some of "
                        f"{robust_accuracy.ATTACK_NAMES[1:]}")
  attack_subsets = dict(attack_subsets or {})
  for a in attack_subsets:
    if a not in attacks and not keep_existing:
      raise ConfigError(f"attack_subsets: {a!r} is not among the attacks {list(attacks)}")
  test_set_fp = images_fingerprint(images, labels)
  subset_fps = {a: images_fingerprint(*sub) for a, sub in attack_subsets.items()}
  kept_blocks: dict = {}
  if keep_existing and out_dir is not None:
    kept_blocks, rerun = _plan_keep_existing(
        os.path.join(out_dir, "eval_results.json"), attacks, config, test_set_fp,
        subset_fps, {a: len(sub[1]) for a, sub in attack_subsets.items()}, log)
    attacks = list(attacks) + rerun
  # A subset given for an attack that is neither run nor rerun is not used.
  attack_subsets = {a: sub for a, sub in attack_subsets.items() if a in attacks}
  names = ["clean"] + [a for a in attacks if a != "clean" and a not in attack_subsets]
  evaluator = evaluator or robust_accuracy.RobustEvaluator(logits_fn, config, mesh=mesh)
  blocks, outcomes = robust_accuracy.evaluate_robustness(
      logits_fn, images, labels, train_counts, names, config, log=log, mesh=mesh,
      evaluator=evaluator)
  for name, block in blocks.items():
    block["n_test"] = int(len(labels))
    block["settings"] = block_settings(config, name, images_fp=test_set_fp,
                                       test_set_fp=test_set_fp, n_test=len(labels))
  for a, (sub_images, sub_labels) in attack_subsets.items():
    sub_blocks, sub_outcomes = robust_accuracy.evaluate_robustness(
        logits_fn, sub_images, sub_labels, train_counts, ["clean", a], config, log=log,
        mesh=mesh, evaluator=evaluator)
    for name, block in sub_blocks.items():
      block["n_test"] = int(len(sub_labels))
      block["settings"] = block_settings(config, name, images_fp=subset_fps[a],
                                         test_set_fp=test_set_fp, n_test=len(sub_labels))
    blocks[a], outcomes[a] = sub_blocks[a], sub_outcomes[a]
    blocks[f"clean_{a}_subset"] = sub_blocks["clean"]
  num_classes = len(train_counts)
  clean_feats = batched_features(features_fn, images, config.batch_size, mesh)
  results = dict(blocks)
  results["nc1"] = geometry.nc1(clean_feats, labels, num_classes)
  results["equiangularity"] = geometry.equiangularity(clean_feats, labels, num_classes)
  results["etf_distance"] = geometry.etf_distance(np.asarray(weight))
  # The margin bound pairs clean and adversarial features of the same images.
  adv_name = next((n for n in ("pgd20", "cw", "autoattack_apgd", "autoattack")
                   if n in outcomes and n not in attack_subsets), None)
  if adv_name is None:
    results["margin_bound"] = None
    results["margin_bound_note"] = "needs an attack to estimate L; none was run"
  else:
    adv_feats = batched_features(features_fn, outcomes[adv_name].x_adv, config.batch_size,
                                 mesh)
    results["margin_bound"] = dict(
        geometry.margin_bound(weight, labels, clean_feats, adv_feats, images,
                              outcomes[adv_name].x_adv, config.epsilon),
        adversarial_examples=adv_name)
  results["settings"] = {
      "epsilon": config.epsilon, "step_size": config.step_size,
      "pgd_steps": config.pgd_steps, "cw_steps": config.cw_steps,
      "apgd_iterations": config.apgd_iterations, "fab_iterations": config.fab_iterations,
      "square_queries": config.square_queries, "n_target_classes": config.n_target_classes,
      "batch_size": config.batch_size, "seed": config.seed, "n_test": int(len(labels)),
      "n_test_per_attack": {n: b["n_test"] for n, b in blocks.items()},
      "geometry_features": "test set", "device": jax.devices()[0].platform,
      "devices": 1 if mesh is None else int(mesh.size), "processes": jax.process_count()}
  if keep_existing and out_dir is not None:
    _carry_over_existing(os.path.join(out_dir, "eval_results.json"), blocks, results,
                         kept_blocks)
  if out_dir is not None and jax.process_index() == 0:
    reporting.write_json(os.path.join(out_dir, "eval_results.json"), results)
    md = markdown_report(blocks, results)
    with open(os.path.join(out_dir, "eval_results.md"), "w") as f:
      f.write(md + "\n")
    per_class_plot(os.path.join(out_dir, "per_class_robust_accuracy.png"), blocks,
                   np.asarray(train_counts), class_names)
    print(md)
  return results


def _carry_over_existing(path: str, blocks: dict, results: dict, kept_blocks: dict) -> None:
  """Adds the earlier blocks that ``_plan_keep_existing`` found compatible.

  Only if the earlier clean block is this run's (same images and model), else the
  numbers would mix two evaluations."""
  if not os.path.exists(path):
    return
  old = reporting.read_json(path)
  same = (isinstance(old.get("clean"), dict)
          and old["clean"].get("per_class") == blocks["clean"]["per_class"]
          and old["clean"].get("n_test", blocks["clean"]["n_test"]) == blocks["clean"]["n_test"])
  if not same:
    raise ConfigError(f"{path}: its clean accuracy differs from this evaluation's (another "
                      f"model or other test images); rerun without --keep_existing")
  kept = [n for n in kept_blocks if n not in blocks]
  for n in kept:
    blocks[n] = results[n] = kept_blocks[n]
  results["settings"]["n_test_per_attack"] = {
      n: b.get("n_test") for n, b in blocks.items()}
  results["settings"]["kept_from_previous_run"] = kept


def load_test_set(run: dict, test_per_class: Optional[int]):
  """(images float32 [0,1], labels) of the training run's test set."""
  from uatmc_jax.longtail.data import image_folder
  from uatmc_jax.longtail.data import longtail
  from uatmc_jax.longtail.data.image_pipeline import to_float
  dataset, data_dir = run.get("dataset"), run.get("data_dir")
  class_names = run.get("class_names")
  if test_per_class is None and run.get("n_test") and class_names:
    test_per_class = int(run["n_test"]) // len(class_names)
  if dataset == "folder":
    test = image_folder.load_image_folder(os.path.join(data_dir, "test"),
                                          class_names=class_names,
                                          max_per_class=test_per_class,
                                          seed=longtail.EVAL_SUBSET_SEED)
  elif dataset in ("cifar10", "cifar100"):
    from uatmc_jax.longtail.data import tfds_images
    test = longtail.balanced_subset(tfds_images.load_tfds_images(dataset, "test", data_dir),
                                    test_per_class)
  else:
    raise ConfigError(f"results.json: dataset {dataset!r} is not one eval_robust can reload "
                      f"(expected folder, cifar10 or cifar100)")
  return to_float(test.images), test.labels, list(test.class_names)


def evaluate_workdir(workdir: str, attacks: Sequence[str], *, epsilon: float = 8. / 255.,
                     step_size: float = 2. / 255., batch_size: int = 128, seed: int = 0,
                     test_per_class: Optional[int] = None, apgd_iterations: int = 100,
                     square_queries: int = 5000, best: bool = False,
                     mesh_data: int = -1, autoattack_per_class: Optional[int] = None,
                     keep_existing: bool = False) -> dict:
  """eval_robust on a finished train_longtail workdir (the launcher's body).

  The classifier is restored replicated on a mesh of ``mesh_data`` devices (all
  processes; -1 = all) and every evaluation batch is split over it.
  """
  from uatmc_jax.core.parallel import mesh as mesh_lib
  from uatmc_jax.core.parallel import multihost
  from uatmc_jax.longtail import trained_classifier
  from uatmc_jax.longtail.models import image_classifiers as ic
  results_path = os.path.join(workdir, "results.json")
  if not os.path.exists(results_path):
    raise ConfigError(f"{results_path}: not found; eval_robust needs a finished "
                      f"train_longtail run (it records the data set to reload)")
  run = reporting.read_json(results_path)
  mesh = mesh_lib.make_mesh(data=int(mesh_data))
  if batch_size % mesh.size:
    raise ConfigError(f"--batch_size {batch_size} must be divisible by the {mesh.size} "
                      f"devices of the evaluation mesh (--mesh_data)")
  trained = trained_classifier.load_trained_classifier(workdir, best=best, mesh=mesh)
  images, labels, class_names = load_test_set(run, test_per_class)
  graphdef, params, batch_stats = ic.split_classifier(trained.model)
  features_fn = lambda x: ic.apply_features(graphdef, params, batch_stats, x, train=False)[0]
  weight = np.asarray(multihost.to_host(trained.model.classifier_weight))
  attack_subsets = {}
  if autoattack_per_class is not None:
    if autoattack_per_class < 1:
      raise ConfigError(f"--autoattack_per_class must be >= 1, got {autoattack_per_class}")
    aa = [a for a in attacks if a in ("autoattack", "autoattack_apgd")]
    if not aa:
      raise ConfigError("--autoattack_per_class needs autoattack or autoattack_apgd in "
                        f"--attacks (got {list(attacks)})")
    sub_images, sub_labels, _ = load_test_set(run, autoattack_per_class)
    attack_subsets = {a: (sub_images, sub_labels) for a in aa}
  elif keep_existing and os.path.exists(os.path.join(workdir, "eval_results.json")):
    # An earlier AutoAttack block on a seeded k-per-class subsample: if it has to be
    # rerun (other settings), rerun it on the same subsample, not on the full test set.
    old = reporting.read_json(os.path.join(workdir, "eval_results.json"))
    for a in ("autoattack", "autoattack_apgd"):
      n_old = (old.get(a) or {}).get("n_test") if isinstance(old.get(a), dict) else None
      if a not in attacks and n_old and n_old < len(labels) and class_names:
        sub_images, sub_labels, _ = load_test_set(run, int(n_old) // len(class_names))
        attack_subsets[a] = (sub_images, sub_labels)
  config = robust_accuracy.RobustEvalConfig(
      epsilon=epsilon, step_size=step_size, batch_size=batch_size, seed=seed,
      apgd_iterations=apgd_iterations, square_queries=square_queries)
  start = time.time()
  print(f"eval_robust: {workdir} method={run.get('method')} test={len(labels)} "
        f"attacks={list(attacks)} devices={mesh.size} processes={jax.process_count()}",
        file=sys.stderr, flush=True)
  results = evaluate_classifier(
      trained.logits_fn, features_fn, weight, images, labels, trained.class_counts,
      attacks, config, out_dir=workdir, class_names=class_names,
      log=lambda s: print(s, file=sys.stderr, flush=True), mesh=mesh,
      attack_subsets=attack_subsets, keep_existing=keep_existing)
  print(f"eval_robust: done in {time.time() - start:.1f}s", file=sys.stderr)
  return results
