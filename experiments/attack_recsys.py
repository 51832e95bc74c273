"""Promotion attacks on a trained recommender (METHODS.md A.4-A.6).

  python -m experiments.attack_recsys \\
    --config=experiments/configs/attack.py:targets=100,seeds=3,epsilon=0.05,attack=pgd_aligned \\
    --workdir=<dir of a model trained by experiments.train_recsys>

Writes ``attack_results.json``, ``attack_results.md`` and ``attack_cosines.png`` into the
workdir (process 0 only); the keys are described in ``uatmc_jax.recsys.attack_eval``.

Multi-host: add ``--coordinator_address=<host:port of process 0> --num_processes=N
--process_id=i`` (or ``--coordinator_address=auto`` on a TPU pod / SLURM) on every host.
Each chunk of targets is split over the ``mesh_data`` devices of all processes
(``chunk_size`` targets per device); each process attacks only its targets and the
per-target results are gathered, so the numbers equal a one-process run. The model,
anchors' clean scores and groups are replicated (each process holds the model).
"""
from __future__ import annotations

from experiments import launch
from uatmc_jax.recsys import attack_eval
from uatmc_jax.recsys.attacks import protocol

_CONFIG = launch.define_config_flag("Attack config file.")


def main(argv):
  del argv
  cfg, workdir = launch.start(_CONFIG, "experiments/configs/attack.py:runlocal=True",
                              "the directory of a model trained by experiments.train_recsys")
  model, data = attack_eval.load_trained(workdir)
  model = protocol.local_copy(model)
  results, _, _ = attack_eval.run_attacks(cfg, model, data,
                                          attack_eval.attack_mesh(cfg.mesh_data))
  attack_eval.write_outputs(workdir, results, cfg, data.name, type(model).__name__)


if __name__ == "__main__":
  launch.run(main)
