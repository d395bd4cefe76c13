#!/usr/bin/env bash
# Where difficulty scheduling pays (README: "When does difficulty scheduling pay?"): every difficulty
# regime × {GRPO uniform, GRPO + dynamic sampling, GRPO + history, GRPO + oracle, PACED-RL, TB + history,
# TB + regress, TB + hybrid, TB + oracle} × 3 seeds, on the bundled testbed; then results/study_table.md
# and results/study_savings.png.
#   bash study.sh                                   # the whole study
#   REGIMES="high" SEEDS="0" NO_ZPHI=1 bash study.sh --max_steps=50   # a part of it; extra arguments go to every run
# Runs go through compare.sh (its METHOD table), so a finished run is skipped and an interrupted one
# resumed: the script can be re-run after a stop.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=${ROOT:-runs/study}
PY=${PYTHON:-python}
METHODS="grpo grpo_dynamic grpo_history grpo_oracle paced tb_history tb_regress tb_hybrid tb_oracle"
declare -A POOL=([base]=64 [mid]=128 [high]=256)  # candidates per step: a few × the informative prompts B needs
for r in ${REGIMES:-base mid high}; do
  ONLY="$METHODS" OUT="$ROOT/$r" bash compare.sh --regime="$r" --pool_size="${POOL[$r]}" --exact_metrics=on --quality_every=5 --eval_every=25 --eval_samples=8 "$@"
done
# the effect of the pool: the high regime with 4 × its pool, for the oracle and PACED-RL
ONLY="tb_oracle paced" OUT="$ROOT/high_pool1024" bash compare.sh --regime=high --pool_size=1024 --exact_metrics=on --quality_every=5 --eval_every=25 --eval_samples=8 "$@"
# can Z_φ be fixed within the method's spirit? the paper's greedy rule (no exploration
# slots), the hybrid prior without exploration, and the last prompt token's state among the features;
# in the two regimes where scheduling has something to gain
if [ -z "${NO_ZPHI:-}" ]; then
  for r in mid high; do
    ONLY="paced_greedy tb_hybrid_greedy paced_mean_last" OUT="$ROOT/${r}_zphi" bash compare.sh --regime="$r" --pool_size="${POOL[$r]}" --exact_metrics=on --quality_every=5 --eval_every=25 --eval_samples=8 "$@"
  done
fi
$PY study.py --root="$ROOT" --out="${OUT:-results}"
