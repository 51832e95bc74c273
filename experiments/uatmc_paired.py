"""Paired per-target comparisons of a finished ``experiments.uatmc`` run (METHODS.md A.8).

  python -m experiments.uatmc_paired --workdir=runs/uatmc --epsilon=0.2 \\
      --out=runs/uatmc/paired.json

What is compared and how: ``uatmc_jax.recsys.paired``. For defence pairs read
``ci95_hierarchical`` (seeds resampled, then targets within seeds: includes training-seed
variation) beside ``between_seed_std``; ``ci95_targets_within_seeds`` holds the trained
models fixed. ``n_comparisons`` and the Bonferroni-adjusted interval address
multiplicity.
"""
from __future__ import annotations

import json
import sys

from absl import app, flags

from uatmc_jax.core.errors import ConfigError
from uatmc_jax.recsys import paired


def define_flags() -> None:
  """Only when run as a program: other experiment modules define ``workdir`` / ``out``
  too, and tests import several of them into one process."""
  flags.DEFINE_string("workdir", None, "An experiments.uatmc workdir (holds seed_<s>/...).")
  flags.DEFINE_float("epsilon", 0.2, "The attack budget whose stage files are compared.")
  flags.DEFINE_string("out", None, "JSON output path (default: only print).")
  flags.DEFINE_integer("bootstrap", 4000, "Bootstrap resamples.")


def main(argv):
  del argv
  if not flags.FLAGS.workdir:
    raise app.UsageError("--workdir is required (an experiments.uatmc workdir)")
  try:
    result = paired.compare(paired.load_stages(flags.FLAGS.workdir, flags.FLAGS.epsilon),
                     flags.FLAGS.bootstrap)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  result["epsilon"] = flags.FLAGS.epsilon
  print(f"ε = {flags.FLAGS.epsilon:g}, seeds {result['seeds']}\n\n{paired.markdown(result)}")
  if flags.FLAGS.out:
    with open(flags.FLAGS.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
