"""Aggregates finished long-tail runs into one Markdown table (mean ± sample std over seeds).

  python -m experiments.longtail_table --workdirs='runs/lt_*' \\
      --out=runs/lt_table.md --plot=runs/lt_per_class.png

Each workdir is a ``train_longtail`` run, optionally followed by ``eval_robust``; what
is aggregated and how: ``uatmc_jax.longtail.table``. ``--skip_unfinished`` leaves out
(and names) directories without a results.json, e.g. runs still training.
"""
from __future__ import annotations

import os
import sys

from absl import flags

from experiments import launch
from uatmc_jax.core.errors import ConfigError
from uatmc_jax.longtail.table import (EVAL_LABELS, aggregate, expand_workdirs, load_run,
                                      markdown, per_class_plot)

flags.DEFINE_list("workdirs", None, "Run directories or glob patterns (comma separated).")
flags.DEFINE_string("out", None, "Markdown output path (default: only print).")
flags.DEFINE_string("plot", None, "Per-class plot path (PNG); default: none.")
flags.DEFINE_bool("skip_unfinished", False,
                  "Leave out directories without results.json instead of failing.")


def main(argv):
  del argv
  if not flags.FLAGS.workdirs:
    raise ConfigError("--workdirs is required (run directories or glob patterns)")
  dirs = expand_workdirs(flags.FLAGS.workdirs)
  unfinished = [d for d in dirs if not os.path.exists(os.path.join(d, "results.json"))]
  if unfinished and not flags.FLAGS.skip_unfinished:
    raise ConfigError(f"--workdirs: {len(unfinished)} matched director"
                      f"{'y has' if len(unfinished) == 1 else 'ies have'} no results.json "
                      f"(not a finished train_longtail run): {unfinished[:3]}"
                      f"{' ...' if len(unfinished) > 3 else ''}; pass --skip_unfinished "
                      "to leave them out")
  if unfinished:
    print(f"longtail_table: skipping unfinished runs {unfinished}", file=sys.stderr)
  dirs = [d for d in dirs if d not in unfinished]
  if not dirs:
    raise ConfigError("--workdirs: no finished run (results.json) among the matches")
  runs = [load_run(d) for d in dirs]
  agg = aggregate(runs)
  md = markdown(agg)
  if flags.FLAGS.plot:
    used = per_class_plot(flags.FLAGS.plot, agg)
    md += (f"\n\nPer-class plot {flags.FLAGS.plot}: " +
           ", ".join(f"IR {ir:g} under {EVAL_LABELS[e]}" for ir, e in used.items()))
  if flags.FLAGS.out:
    with open(flags.FLAGS.out, "w") as f:
      f.write(md + "\n")
  print(md)


if __name__ == "__main__":
  launch.run(main)
