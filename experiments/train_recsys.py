"""Train and evaluate a multimodal recommender (METHODS.md A.2-A.3).

  python -m experiments.train_recsys \\
    --config=experiments/configs/recsys.py:model=vbpr_mlp,dataset=synthetic,runlocal=True \\
    --workdir=runs/recsys

Writes ``<workdir>/results.json`` and prints a Markdown table (test metrics of the
model and of the most-popular baseline). Restarting the same command resumes from the
newest checkpoint. Library entry points (flag-free, for other experiments):
``uatmc_jax.recsys.train_job.train_and_evaluate`` and
``load_trained_recommender``.
"""
from __future__ import annotations

from absl import flags

from experiments import launch
from uatmc_jax.core.reporting import markdown_table

_CONFIG = launch.define_config_flag("experiments/configs/recsys.py:...")
FLAGS = flags.FLAGS


def results_table(results: dict, ks=(10, 20, 50)) -> str:
  """Markdown table: Recall/NDCG/Precision/MAP/HR at ``ks`` for the model and popularity."""
  header = ["", *[f"{m}@{k}" for k in ks for m in ("recall", "ndcg")], "map@20", "hr@20"]
  rows = []
  for name, block in ((f"{results['model']} (test)", results["test"]),
                      ("most popular (test)", results["popularity_test"]),
                      (f"{results['model']} (valid)", results["valid"])):
    rows.append([name, *[block[f"{m}@{k}"] for k in ks for m in ("recall", "ndcg")],
                 block["map@20"], block["hr@20"]])
  return markdown_table(header, rows)


def main(argv):
  del argv
  cfg, workdir = launch.start(
      _CONFIG, "experiments/configs/recsys.py:model=vbpr_mlp,dataset=synthetic")
  from uatmc_jax.recsys.train_job import train_and_evaluate
  results = train_and_evaluate(cfg, workdir)
  print(f"\n{results['dataset']}: {results['n_users']} users, {results['n_items']} items, "
        f"{results['n_train']} train; {results['epochs_run']} epochs, best epoch "
        f"{results['best_epoch']}, {results['train_seconds']:.1f} s\n")
  print(results_table(results))
  verdict = results.get("below_popularity")
  if verdict:
    print(f"\nWARNING: {results['model']} is at or below the most-popular baseline on "
          f"valid {verdict['metric']} ({verdict['model']:.4f} vs "
          f"{verdict['most_popular']:.4f}): {verdict['advice']}")
  print(f"\nresults: {FLAGS.workdir}/results.json")


if __name__ == "__main__":
  launch.run(main)
