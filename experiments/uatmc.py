"""The UAT-MC experiment end to end (METHODS.md A.7-A.8).

  python -m experiments.uatmc \\
    --config=experiments/configs/uatmc.py:dataset=synthetic,model=vbpr_mlp,seeds=1+2+3,runlocal=True \\
    --workdir=runs/uatmc

The pipeline and the files it writes are described in ``uatmc_jax.recsys.experiment``
(stages, resume) and ``uatmc_jax.recsys.report`` (results.json, results.md, plots).
"""
from __future__ import annotations

from absl import flags

from experiments import launch
from uatmc_jax.recsys import experiment, report

FLAGS = flags.FLAGS
_CONFIG = launch.define_config_flag("experiments/configs/uatmc.py:...")


def main(argv):
  del argv
  cfg, workdir = launch.start(
      _CONFIG, "experiments/configs/uatmc.py:dataset=synthetic,model=vbpr_mlp,seeds=1+2+3,"
      "runlocal=True")
  results = experiment.run_experiment(cfg, workdir)
  print(report.markdown(results), flush=True)
  print(f"\n{results['seconds']:.1f} s; results: {FLAGS.workdir}/results.json, results.md, "
        "tradeoff.png, mismatch.png", flush=True)


if __name__ == "__main__":
  launch.run(main)
