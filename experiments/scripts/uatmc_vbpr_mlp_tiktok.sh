#!/usr/bin/env bash
# The VBPR-MLP UAT-MC table on TikTok of docs/results/recsys.md.
#
# 3 training seeds, every defence, FGSM / PGD / aligned PGD on 100 random targets per
# seed at ε 0.05 (A.4's budget, the main one), 0.2 and 0.5; λ_adv sweep on seed 1.
# Training is shortened for a 2-core CPU (backbone ≤ 60 epochs, patience 10; UAT-MC
# fine-tuning ≤ 10 epochs, patience 5). The models are trained once; each budget adds a
# stage file (attack_results_eps<ε>.json) per model, and results.md has one table per
# budget. Rerunning the command resumes (finished stages are skipped).
#
# The published table was made at commit 6932fe8, when attack_epsilon took one value, as
# three runs: the command below with attack_epsilon=0.05, then the attack stage rerun
# with attack_epsilon=0.2 and =0.5 on copies of its workdir. About 11 min (ε 0.05) plus
# ~3.5 min per further budget on an idle 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data/tiktok}
WORKDIR=${WORKDIR:-runs/uatmc_vbpr_mlp_tiktok}

python -m experiments.uatmc \
  "--config=experiments/configs/uatmc.py:dataset=${DATA},model=vbpr_mlp,seeds=1+2+3,epochs=60,patience=10,finetune_epochs=10,finetune_patience=5,targets=100,sweep_seeds=1,attack_epsilon=0.05+0.2+0.5" \
  --workdir="${WORKDIR}"
