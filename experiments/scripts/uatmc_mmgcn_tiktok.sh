#!/usr/bin/env bash
# The MMGCN UAT-MC tables on TikTok of docs/results/recsys.md.
#
#   bash experiments/scripts/uatmc_mmgcn_tiktok.sh          # ε 0.2, 3 seeds, paired comparisons
#   EXTRA_BUDGETS=1 bash experiments/scripts/uatmc_mmgcn_tiktok.sh   # + ε 0.05 / 0.5 on seed 1
#
# 1. One experiments.uatmc run per seed (own workdir): backbone, the five defences, the
#    five attackers (attackers=all: FGSM, PGD, aligned PGD, PGD-PCGrad groups, PGD-shared
#    groups) on 100 random targets at ε 0.2. Training shortened for a 2-core CPU
#    (backbone ≤ 60 epochs, patience 10; fine-tuning ≤ 10, patience 5), no λ_adv sweep.
#    Cost: about 78 min per seed on one core (docs/results/performance.md; the runs
#    were pinned one per core, two at a time, each with one XLA thread as below).
# 2. The 3-seed table: the same command with seeds=1+2+3 on a workdir whose seed_<s>
#    entries link to the three seed directories; every stage is reused (seconds).
# 3. Paired per-target comparisons (300 targets) with experiments.uatmc_paired: for defence
#    pairs a hierarchical interval (seeds, then targets) beside the within-seed one.
# 4. (EXTRA_BUDGETS=1) ε 0.05 and 0.5 on seed 1 with the default attackers; its
#    results.md has a table per budget, uatmc_paired the paired intervals.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data/tiktok}
RUNS=${RUNS:-runs/uatmc_mmgcn_tiktok}
export XLA_FLAGS=${XLA_FLAGS:---xla_cpu_multi_thread_eigen=false}
COMMON="experiments/configs/uatmc.py:dataset=${DATA},model=mmgcn,epochs=60,patience=10,finetune_epochs=10,finetune_patience=5,targets=100,sweep="

for seed in 1 2 3; do
  python -m experiments.uatmc "--config=${COMMON},seeds=${seed}+,attack_epsilon=0.2,attackers=all" \
    --workdir="${RUNS}/s${seed}"
done

mkdir -p "${RUNS}/all"
for seed in 1 2 3; do
  ln -sfn "../s${seed}/seed_${seed}" "${RUNS}/all/seed_${seed}"
done
python -m experiments.uatmc "--config=${COMMON},seeds=1+2+3,attack_epsilon=0.2,attackers=all" \
  --workdir="${RUNS}/all"
python -m experiments.uatmc_paired --workdir="${RUNS}/all" --epsilon=0.2 \
  --out="${RUNS}/all/paired_eps0.2.json"

if [[ "${EXTRA_BUDGETS:-0}" == 1 ]]; then
  python -m experiments.uatmc "--config=${COMMON},seeds=1+,attack_epsilon=0.2+0.05+0.5" \
    --workdir="${RUNS}/s1"
  for eps in 0.05 0.5; do
    python -m experiments.uatmc_paired --workdir="${RUNS}/s1" --epsilon="${eps}" \
      --out="${RUNS}/s1/paired_eps${eps}.json"
  done
fi
