#!/usr/bin/env bash
# What MCAT's two weights do on CIFAR-10-LT at preset=cpu_small (docs/results/longtail.md,
# "What the MCAT terms do"; METHODS.md B.4).
#
# One weight varied at a time from MCAT's defaults (λ_man 0.1, λ_geom 0.01):
#   λ_man  ∈ {0.1, 1, 10}   (λ_geom 0.01)
#   λ_geom ∈ {0.01, 0.1, 1} (λ_man 0.1)
# (the defaults are one run, shared by both sweeps); AT-BSL against AT-BSL with both MCAT
# terms (method=at_bsl+etf+manifold) at the default weights and at weights where both
# terms act (λ_man 1, λ_geom 1: "active"); RoBal with and without the terms. 10 settings
# x IR 10 and 100 x seeds 1-3 = 60 runs, data_seed 0 (every run sees the same
# long-tailed subset). Every
# run writes its per-epoch mechanism diagnostics (<workdir>/diagnostics.json, the
# TensorBoard tags diag/*; uatmc_jax.longtail.diagnostics) beside the clean / PGD-20
# results of train_longtail. The settings in EVAL_TAGS (AT-BSL with and without the MCAT
# terms) are also evaluated with CW on the 1,000 test images and standard AutoAttack on a
# seeded 200 (20 per class); add a sweep setting's tag to EVAL_TAGS to evaluate it too.
#
#   bash experiments/scripts/mcat_weights_cpu_small.sh
#   SEEDS=1 IRS=10 bash experiments/scripts/mcat_weights_cpu_small.sh   # a subset
#   TAGS="at_bsl at_bsl_mcat_terms" bash experiments/scripts/mcat_weights_cpu_small.sh
#
# Cost: see docs/results/longtail.md ("What the MCAT terms do"). Finished runs (a
# results.json) are skipped when the script is rerun. On a multi-core CPU:
#   export XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_cpu_multi_thread_eigen=false"
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data/cifar10}
RUNS=${RUNS:-runs/mcat_weights_cpu_small}
CACHE=${CACHE:-${RUNS}/cache}
SEEDS=${SEEDS:-1 2 3}
IRS=${IRS:-10 100}
TAGS=${TAGS:-}   # empty: every setting below
EVAL_TAGS=${EVAL_TAGS:-at_bsl at_bsl_mcat_terms at_bsl_mcat_terms_active}
# <workdir tag>:<config arguments>
SETTINGS=(
  "mcat:method=mcat"
  "mcat_man1:method=mcat,manifold_weight=1"
  "mcat_man10:method=mcat,manifold_weight=10"
  "mcat_geom0.1:method=mcat,etf_weight=0.1"
  "mcat_geom1:method=mcat,etf_weight=1"
  "at_bsl:method=at_bsl"
  "at_bsl_mcat_terms:method=at_bsl+etf+manifold"
  "at_bsl_mcat_terms_active:method=at_bsl+etf+manifold,manifold_weight=1,etf_weight=1"
  "robal:method=robal"
  "robal_mcat_terms:method=robal+etf+manifold"
)

for ir in ${IRS}; do
  for entry in "${SETTINGS[@]}"; do
    tag=${entry%%:*}
    args=${entry#*:}
    if [[ -n "${TAGS}" && " ${TAGS} " != *" ${tag} "* ]]; then
      continue
    fi
    for seed in ${SEEDS}; do
      wd="${RUNS}/ir${ir}_${tag}_s${seed}"
      if [[ ! -f "${wd}/results.json" ]]; then
        python -m experiments.train_longtail \
          "--config=experiments/configs/longtail.py:preset=cpu_small,dataset=folder,data_dir=${DATA},cache_dir=${CACHE},imbalance_ratio=${ir},${args},seed=${seed}" \
          --workdir="${wd}"
      fi
      if [[ " ${EVAL_TAGS} " == *" ${tag} "* ]]; then
        if ! grep -qs '"cw"' "${wd}/eval_results.json"; then
          python -m experiments.eval_robust --workdir="${wd}" --attacks=cw
        fi
        if ! grep -qs '"autoattack"' "${wd}/eval_results.json"; then
          python -m experiments.eval_robust --workdir="${wd}" --attacks=autoattack \
            --autoattack_per_class=20 --keep_existing
        fi
      fi
    done
  done
done

python -m experiments.longtail_table --workdirs="${RUNS}/ir*_s*" --out="${RUNS}/table.md"
