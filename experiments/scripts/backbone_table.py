"""Backbone accuracy table from ``experiments.train_recsys`` results (docs/results/recsys.md).

  python experiments/scripts/backbone_table.py runs/backbones/*/results.json

Groups the runs by model (VBPR with ``item_bias=True`` is its own row) and prints, per
group, the test Recall@20 and NDCG@20 of every seed, their mean ± sample std (ddof 1)
over seeds, the gain over the most-popular baseline, best epoch and train seconds; the
last row is the most-popular baseline of the first run's dataset. Reads only the
``results.json`` files the launcher writes (keys: model, test, popularity_test,
best_epoch, epochs_run, train_seconds, config).
"""
from __future__ import annotations

import argparse
import collections

from uatmc_jax.core.reporting import mean_std, read_json, std_header


def row_name(results: dict) -> str:
  model = str(results["model"])
  item_bias = bool((results.get("config") or {}).get("model_config", {}).get("item_bias"))
  return f"{model} + item bias" if item_bias else model


def seed_of(results: dict) -> int | None:
  seed = (results.get("config") or {}).get("train", {}).get("seed")
  return int(seed) if seed is not None else None


def fmt(stats: dict, n: int) -> str:
  return f"{stats['mean']:.4f} ± {stats['std']:.4f}" if n > 1 else f"{stats['mean']:.4f}"


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("results", nargs="+", help="results.json files of train_recsys runs")
  args = p.parse_args()
  runs = [read_json(path) for path in args.results]
  groups: dict[str, list[dict]] = collections.defaultdict(list)
  for r in runs:
    groups[row_name(r)].append(r)
  popularity = runs[0]["popularity_test"]
  pop_r, pop_n = popularity["recall@20"], popularity["ndcg@20"]
  print(f"{runs[0]['dataset']}, test split; {std_header('n')} (n = the seeds column)\n")
  print("| model | seeds | Recall@20 per seed | NDCG@20 per seed | Recall@20 | NDCG@20 "
        "| vs most popular | best epoch (epochs run) | train s |")
  print("|---|---|---|---|---|---|---|---|---|")
  for name, group in groups.items():
    group.sort(key=lambda r: (seed_of(r) is None, seed_of(r)))
    recall = [r["test"]["recall@20"] for r in group]
    ndcg = [r["test"]["ndcg@20"] for r in group]
    r_ms, n_ms = mean_std(recall), mean_std(ndcg)
    epochs = " / ".join(f"{r['best_epoch']} ({r['epochs_run']})" for r in group)
    seconds = " / ".join(f"{r['train_seconds']:.0f}" for r in group)
    print(f"| {name} | {'/'.join(str(seed_of(r)) for r in group)} "
          f"| {' / '.join(f'{v:.4f}' for v in recall)} "
          f"| {' / '.join(f'{v:.4f}' for v in ndcg)} | {fmt(r_ms, len(group))} | {fmt(n_ms, len(group))} "
          f"| {100 * (r_ms['mean'] / pop_r - 1):+.0f}% / {100 * (n_ms['mean'] / pop_n - 1):+.0f}% "
          f"| {epochs} | {seconds} |")
  print(f"| most popular | – | – | – | {pop_r:.4f} | {pop_n:.4f} | – | – | – |")


if __name__ == "__main__":
  main()
