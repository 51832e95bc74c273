"""End-to-end robust evaluation time (METHODS.md B.5): PGD-20, CW and AutoAttack.

Seconds per attack and per AutoAttack stage, and images/s, for a trained
``train_longtail`` workdir (or a freshly initialised small CNN with ``--fresh``: speed
only, almost no robust points), on a seeded, per-class balanced test subset, through
``RobustEvaluator`` exactly as ``experiments.eval_robust`` runs it (compilation
included: one trace per attack). ``--src`` imports ``uatmc_jax`` from another
checkout, so the same command times an older version in the same conditions:

  git archive 89855ee uatmc_jax | tar -x -C ../base          # the library before
  python benchmarks/bench_robust_eval.py --workdir W --per_class 20 --src ../base
  python benchmarks/bench_robust_eval.py --workdir W --per_class 20

AutoAttack's cost is set by the points that stay robust: each runs APGD-CE, 9 APGD-T
and 9 FAB-T runs of 100 iterations and 5000 Square queries; a broken point stops at
the stage that breaks it. Every line says how many points were clean-correct / robust.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", help="a train_longtail workdir (its model and test set)")
  p.add_argument("--fresh", action="store_true", help="untrained small CNN, random images")
  p.add_argument("--src", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                 help="checkout to import uatmc_jax from (default: this one)")
  p.add_argument("--per_class", type=int, default=20, help="test images per class")
  p.add_argument("--attacks", default="pgd20,cw,autoattack")
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--apgd_iterations", type=int, default=100)
  p.add_argument("--fab_iterations", type=int, default=100)
  p.add_argument("--square_queries", type=int, default=5000)
  p.add_argument("--quiet", action="store_true", help="no per-batch progress lines")
  args = p.parse_args()
  sys.path.insert(0, os.path.abspath(args.src))
  import jax
  import numpy as np
  import uatmc_jax
  from uatmc_jax.longtail.evaluation import robust_accuracy

  if args.fresh:
    from flax import nnx
    from uatmc_jax.longtail.models import image_classifiers as ic
    model = ic.build_classifier("small_cnn", 10, nnx.Rngs(0))
    g, params, stats = ic.split_classifier(model)
    logits_fn = jax.jit(lambda x: ic.apply_logits(g, params, stats, x, train=False)[0])
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(10 * args.per_class, 32, 32, 3)).astype(np.float32)
    labels = np.asarray(jax.numpy.argmax(logits_fn(images), -1), np.int32)
    what = "fresh small_cnn, random images labelled by the model"
  else:
    from uatmc_jax.core import reporting
    from uatmc_jax.longtail import trained_classifier
    from uatmc_jax.longtail.data import image_folder, longtail
    from uatmc_jax.longtail.data.image_pipeline import to_float
    run = reporting.read_json(os.path.join(args.workdir, "results.json"))
    trained = trained_classifier.load_trained_classifier(args.workdir)
    logits_fn = trained.logits_fn
    test = image_folder.load_image_folder(os.path.join(run["data_dir"], "test"),
                                          class_names=run["class_names"])
    # The same seeded balanced subset for every version (chosen here, not by the library).
    idx = longtail.longtail_indices(test.labels, np.full(test.num_classes, args.per_class),
                                    seed=0)
    images, labels = to_float(test.images[idx]), test.labels[idx]
    what = f"{run['model']} {run['method']} from {args.workdir}"
  print(f"bench_robust_eval: uatmc_jax from {os.path.dirname(uatmc_jax.__file__)}; {what}; "
        f"{len(labels)} test images; batch {args.batch_size}; APGD {args.apgd_iterations} "
        f"it, FAB {args.fab_iterations} it, Square {args.square_queries} q; {jax.devices()[0].platform}; "
        f"load {os.getloadavg()}", flush=True)
  config = robust_accuracy.RobustEvalConfig(
      batch_size=args.batch_size, apgd_iterations=args.apgd_iterations,
      fab_iterations=args.fab_iterations, square_queries=args.square_queries)
  evaluator = robust_accuracy.RobustEvaluator(logits_fn, config)
  log = None if args.quiet else (lambda s: print("  " + s, flush=True))
  clean = evaluator.run("clean", images, labels).correct
  print(f"clean: {clean.sum()}/{len(labels)} correct", flush=True)
  rows = []
  for name in args.attacks.split(","):
    start = time.perf_counter()
    if name == "autoattack":
      res = evaluator.autoattack.run(images, labels, log=log)
      robust, stages = res.robust, res.seconds
    else:
      robust, stages = evaluator.run(name, images, labels, log=log).correct, {}
    t = time.perf_counter() - start
    rows.append((name, t, robust.sum()))
    stage_txt = "".join(f"; {k} {v:.1f}s" for k, v in stages.items())
    print(f"RESULT {name}: {t:.1f} s, {len(labels) / t:.2f} images/s, robust "
          f"{robust.sum()}/{len(labels)}{stage_txt}; load {os.getloadavg()[0]:.2f}",
          flush=True)
  print("| attack | seconds | images/s | robust |\n|---|---|---|---|")
  for name, t, r in rows:
    print(f"| {name} | {t:.1f} | {len(labels) / t:.2f} | {r}/{len(labels)} |")


if __name__ == "__main__":
  main()
