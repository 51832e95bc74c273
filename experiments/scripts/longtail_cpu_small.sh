#!/usr/bin/env bash
# The CIFAR-10-LT comparison of docs/results/longtail.md (preset=cpu_small).
#
# 7 methods (PGD-AT, TRADES, AT-BSL, RoBal, MCAT, MCAT without the ETF term, MCAT
# without the manifold term) x IR 10 and 100 x seeds 1-3 (data_seed 0: every run sees
# the same long-tailed subset). Per run: train_longtail (clean and PGD-20 on 1,000
# balanced test images), CW on the same 1,000, standard AutoAttack on a seeded 50
# (5 per class). Then one table (mean ± sample std over seeds) and the per-class plot.
#
#   bash experiments/scripts/longtail_cpu_small.sh
#   SEEDS="1 2" IRS=10 bash experiments/scripts/longtail_cpu_small.sh   # a subset
#
# Recorded cost: 190-910 s of training per run on one thread, CW about a minute,
# AutoAttack on 50 images 1-1.5 min; the 42 runs took about 3.7 h on two cores (two
# single-thread workers). Finished steps are skipped when the script is rerun. On a
# multi-core CPU the image trainer is fastest as one XLA device per core:
#   export XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_cpu_multi_thread_eigen=false"
# (docs/results/performance.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data/cifar10}
RUNS=${RUNS:-runs/longtail_cpu_small}
CACHE=${CACHE:-${RUNS}/cache}
SEEDS=${SEEDS:-1 2 3}
IRS=${IRS:-10 100}
# <workdir tag>:<config arguments>
METHODS=(
  "pgd_at:method=pgd_at"
  "trades:method=trades"
  "at_bsl:method=at_bsl"
  "robal:method=robal"
  "mcat:method=mcat"
  "mcat_no_etf:method=mcat,etf_weight=0"
  "mcat_no_manifold:method=mcat,manifold_weight=0"
)

for ir in ${IRS}; do
  for entry in "${METHODS[@]}"; do
    tag=${entry%%:*}
    args=${entry#*:}
    for seed in ${SEEDS}; do
      wd="${RUNS}/ir${ir}_${tag}_s${seed}"
      if [[ ! -f "${wd}/results.json" ]]; then
        python -m experiments.train_longtail \
          "--config=experiments/configs/longtail.py:preset=cpu_small,dataset=folder,data_dir=${DATA},cache_dir=${CACHE},imbalance_ratio=${ir},${args},seed=${seed}" \
          --workdir="${wd}"
      fi
      if ! grep -qs '"cw"' "${wd}/eval_results.json"; then
        python -m experiments.eval_robust --workdir="${wd}" --attacks=cw
      fi
      if ! grep -qs '"autoattack"' "${wd}/eval_results.json"; then
        python -m experiments.eval_robust --workdir="${wd}" --attacks=autoattack \
          --autoattack_per_class=5 --batch_size=16 --keep_existing
      fi
    done
  done
done

python -m experiments.longtail_table --workdirs="${RUNS}/ir*_s*" \
  --out="${RUNS}/table.md" --plot="${RUNS}/per_class.png"
