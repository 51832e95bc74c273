"""Long-tailed adversarial training: data -> LT subset -> one trainer -> results.json.

  python -m experiments.train_longtail \\
    --config=experiments/configs/longtail.py:dataset=folder,data_dir=../shared/data/cifar10,imbalance_ratio=100,method=mcat,model=small_cnn,runlocal=True \\
    --workdir=runs/lt

What it writes and how it resumes: ``uatmc_jax.longtail.experiment``.
"""
from __future__ import annotations

from experiments import launch
from uatmc_jax.longtail import experiment

_CONFIG = launch.define_config_flag("experiments/configs/longtail.py:<args>")


def main(argv):
  del argv
  cfg, workdir = launch.start(
      _CONFIG, "experiments/configs/longtail.py:dataset=folder,data_dir=../shared/data/cifar10,"
      "runlocal=True")
  experiment.train_and_evaluate(cfg, workdir)


if __name__ == "__main__":
  launch.run(main)
