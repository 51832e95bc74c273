#!/usr/bin/env bash
# The TikTok backbone table of docs/results/recsys.md ("Backbones").
#
# VBPR and VBPR-MLP with their default protocol on three training seeds (999 = MMRec's,
# 1, 2), MMGCN and VBPR with the optional item bias on seed 999, then the table
# (mean ± sample std over seeds of the test Recall@20 / NDCG@20, per-seed values and
# the most-popular baseline).
#
#   bash experiments/scripts/backbones_tiktok.sh            # DATA / RUNS may be overridden
#
# About 25 min on an idle 2-core CPU (train seconds per run: docs/results/recsys.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data/tiktok}
RUNS=${RUNS:-runs/backbones}

train() {  # train <workdir name> <config arguments>
  python -m experiments.train_recsys \
    "--config=experiments/configs/recsys.py:dataset=${DATA},$2" --workdir="${RUNS}/$1"
}

for model in vbpr vbpr_mlp; do
  for seed in 999 1 2; do
    train "${model}_s${seed}" "model=${model},seed=${seed}"
  done
done
train mmgcn_s999 "model=mmgcn,seed=999"
train vbpr_item_bias_s999 "model=vbpr,item_bias=True,seed=999"

python experiments/scripts/backbone_table.py "${RUNS}"/*/results.json | tee "${RUNS}/table.md"
