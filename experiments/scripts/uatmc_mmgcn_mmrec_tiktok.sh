#!/usr/bin/env bash
# The UAT-MC MMGCN table's Vanilla and UAT-MC rows on MMRec's MMGCN architecture
# (model=mmgcn_mmrec) on TikTok, docs/results/recsys.md §3e.
#
#   bash experiments/scripts/uatmc_mmgcn_mmrec_tiktok.sh
#
# Same protocol as uatmc_mmgcn_tiktok.sh (ε 0.2, 100 random targets per seed, backbone
# ≤ 60 epochs with patience 10, fine-tuning ≤ 10 with patience 5, UAT-MC preset
# mmgcn_baby, no sweep). mmgcn_mmrec has no shared projected space (image at 256, audio
# raw), so its UAT-MC row is UAT-MC without alignment and the attackers are FGSM and
# PGD (the aligned attacker's cosine reward does not apply). Its attacks take the exact
# full re-encode path. One XLA thread per run, as the mmgcn table's runs. SEEDS picks the
# seeds to run (default all three; 1.4–1.8 core-hours each, max RSS 16 GB).
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data/tiktok}
RUNS=${RUNS:-runs/uatmc_mmgcn_mmrec_tiktok}
SEEDS=${SEEDS:-1 2 3}
export XLA_FLAGS=${XLA_FLAGS:---xla_cpu_multi_thread_eigen=false}
COMMON="experiments/configs/uatmc.py:dataset=${DATA},model=mmgcn_mmrec,defences=vanilla+uat_mc_no_align,epochs=60,patience=10,finetune_epochs=10,finetune_patience=5,targets=100,sweep=,attack_epsilon=0.2,attackers=fgsm+pgd"

for seed in ${SEEDS}; do
  python -m experiments.uatmc "--config=${COMMON},seeds=${seed}+" --workdir="${RUNS}/s${seed}"
done

# The table over the seeds run so far (with SEEDS=2 after an earlier SEEDS=1: seeds 1+2);
# every stage is reused, none is trained here.
mkdir -p "${RUNS}/all"
DONE=()
for seed in 1 2 3; do
  if [[ -d "${RUNS}/s${seed}/seed_${seed}" ]]; then
    ln -sfn "../s${seed}/seed_${seed}" "${RUNS}/all/seed_${seed}"
    DONE+=("${seed}")
  fi
done
ALL=$(IFS=+; echo "${DONE[*]}")
python -m experiments.uatmc "--config=${COMMON},seeds=${ALL}+" --workdir="${RUNS}/all"
python -m experiments.uatmc_paired --workdir="${RUNS}/all" --epsilon=0.2 \
  --out="${RUNS}/all/paired_eps0.2.json"
