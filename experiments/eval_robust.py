"""Robustness evaluation of a trained long-tail classifier (METHODS.md B.5).

  python -m experiments.eval_robust --workdir=<dir of a train_longtail run> \\
      --attacks=pgd20,cw,autoattack

Attacks, outputs and progress: ``uatmc_jax.longtail.evaluation.evaluate``. Multi-host:
add ``--coordinator_address=<host:port of process 0> --num_processes=N --process_id=i``
(or ``--coordinator_address=auto`` on a TPU pod / SLURM); every batch
(``--batch_size``, divisible by the device count) is split over the ``--mesh_data``
devices of all processes.
"""
from absl import flags

from experiments import launch
from uatmc_jax.core.errors import ConfigError
from uatmc_jax.longtail.evaluation import evaluate, robust_accuracy

flags.DEFINE_list("attacks", ["pgd20", "cw", "autoattack"],
                  f"Attacks among {robust_accuracy.ATTACK_NAMES[1:]} (clean is always run).")
flags.DEFINE_float("epsilon", 8. / 255., "L-inf budget.")
flags.DEFINE_float("step_size", 2. / 255., "PGD / CW step.")
flags.DEFINE_integer("batch_size", 128, "Fixed evaluation batch size (last batch padded).")
flags.DEFINE_integer("seed", 0, "Attack seed.")
flags.DEFINE_integer("test_per_class", None,
                     "A seeded subsample of k test images per class (seed "
                     "longtail.EVAL_SUBSET_SEED = 0, the images the training run "
                     "evaluated on; default: as the training run).")
flags.DEFINE_integer("autoattack_per_class", None,
                     "Run autoattack / autoattack_apgd on a smaller seeded subsample of k "
                     "test images per class (the protocol's cost is ~14 s per robust point "
                     "on a 2-core CPU); the other attacks use the full test set. Default: "
                     "the same images as the other attacks.")
flags.DEFINE_bool("keep_existing", False,
                  "Keep the attack blocks of the workdir's earlier eval_results.json that "
                  "this run does not recompute (e.g. add AutoAttack to a CW evaluation); "
                  "a block is kept only if its stored settings (ε, steps, seed, batch "
                  "size, test images) equal this run's, otherwise that attack is rerun "
                  "(a line says so); refused if the earlier clean accuracy differs.")
flags.DEFINE_integer("apgd_iterations", 100, "APGD iterations (100 = reference).")
flags.DEFINE_integer("square_queries", 5000, "Square Attack queries (5000 = reference).")
flags.DEFINE_bool("best", False, "Restore the best checkpoint instead of the latest.")
flags.DEFINE_integer("mesh_data", -1, "Devices (over all processes) that share every "
                     "evaluation batch (-1 = all).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  launch.setup()
  if not FLAGS.workdir:
    raise ConfigError("--workdir is required")
  # Nothing returned: absl's app.run passes main's value to sys.exit, and a dict there
  # printed it and exited with status 1.
  evaluate.evaluate_workdir(
      FLAGS.workdir, FLAGS.attacks, epsilon=FLAGS.epsilon, step_size=FLAGS.step_size,
      batch_size=FLAGS.batch_size, seed=FLAGS.seed, test_per_class=FLAGS.test_per_class,
      apgd_iterations=FLAGS.apgd_iterations, square_queries=FLAGS.square_queries,
      best=FLAGS.best, mesh_data=FLAGS.mesh_data,
      autoattack_per_class=FLAGS.autoattack_per_class, keep_existing=FLAGS.keep_existing)


if __name__ == "__main__":
  launch.run(main)
