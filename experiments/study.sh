#!/usr/bin/env bash
# Where difficulty scheduling pays (results/log/study.md): every difficulty regime × the methods
# of experiments/methods.py's `study` group × 3 seeds on the bundled testbed, the larger pool in `high`, and the Z_φ
# variants (group `study_zphi`) in `mid` and `high`; then results/study_table.md and results/study_savings.png.
#   bash experiments/study.sh                                                  # the whole study
#   REGIMES="high" SEEDS="0" NO_ZPHI=1 bash experiments/study.sh --max_steps=50   # a part; extra arguments go to every run
# Runs go through compare.sh, so a finished run is skipped and an interrupted one resumed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${ROOT:-runs/study}
PY=${PYTHON:-python}
declare -A POOL=([base]=64 [mid]=128 [high]=256)  # candidates per step: a few × the informative prompts B needs
COMMON="--exact_metrics=on --quality_every=5 --eval_every=25 --eval_samples=8"
for r in ${REGIMES:-base mid high}; do
  # shellcheck disable=SC2086
  ONLY="$($PY -m experiments.methods study)" OUT="$ROOT/$r" bash experiments/compare.sh --regime="$r" --pool_size="${POOL[$r]}" $COMMON "$@"
done
# the effect of the pool: the high regime with 4 × its pool, for the oracle and PACED-RL
# shellcheck disable=SC2086
ONLY="tb_oracle paced" OUT="$ROOT/high_pool1024" bash experiments/compare.sh --regime=high --pool_size=1024 $COMMON "$@"
# can Z_φ be fixed within the method? in the two regimes where scheduling has something to gain
if [ -z "${NO_ZPHI:-}" ]; then
  for r in mid high; do
    # shellcheck disable=SC2086
    ONLY="$($PY -m experiments.methods study_zphi)" OUT="$ROOT/${r}_zphi" bash experiments/compare.sh --regime="$r" --pool_size="${POOL[$r]}" $COMMON "$@"
  done
fi
$PY -m experiments.study --root="$ROOT" --out="${OUT:-results}"
