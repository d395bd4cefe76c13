#!/usr/bin/env bash
# The real-model question asked again (RESULTS.md, "The real-model question again"): on --preset=smollm2_arith,
#   A. paced and paced_replay_only under today's defaults at the study's budget (16 steps × 8 prompts), 3 seeds,
#      beside the study's GRPO arms, reused only if a rerun of grpo seed 0 reproduces its record exactly;
#   B. the static oracle: the initial policy's accuracy on every training prompt (16 samples), and the TB loss
#      selecting nearest τ by it, 3 seeds;
#   C. a budget where prompts recur: 16 prompts a step, pool 64, 32 steps; grpo, paced and the static oracle,
#      seed 0 of each first, then seeds 1 and 2.
# Every part is experiments/smollm2_study.sh (records committed to results/, finished runs skipped, interrupted runs
# resumed), so this script can be stopped at any point and run again. 15 to 25 minutes a run at budget A on 2 CPU
# cores, about twice that at budget C: several sittings in all.
#   bash experiments/smollm2_again.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
STUDY=results/smollm2_study
AGAIN=results/smollm2_again
BUDGET=results/smollm2_budget
ORACLE=$STUDY/initial_accuracy.json
again() { OUT=runs/smollm2_again RESULTS=$AGAIN RECORDS=$AGAIN/runs bash experiments/smollm2_study.sh "$@"; }
budget() { OUT=runs/smollm2_budget RESULTS=$BUDGET RECORDS=$BUDGET/runs bash experiments/smollm2_study.sh \
  --prompts_per_step=16 --pool_size=64 --max_steps=32 "$@"; }

# A, seed 0
SEEDS=0 ONLY="paced paced_replay_only" again
# the study's GRPO records: reused if grpo seed 0 reproduces its record, else rerun
if [ ! -f $AGAIN/grpo_reuse.txt ]; then
  OUT=runs/smollm2_again_check RESULTS=$AGAIN/grpo_check RECORDS=$AGAIN/grpo_check/runs SEEDS=0 ONLY=grpo \
    bash experiments/smollm2_study.sh
  $PY -m experiments.compare --same_rows=$STUDY/runs/grpo_s0,$AGAIN/grpo_check/runs/grpo_s0 > $AGAIN/grpo_reuse.txt || true
fi
cat $AGAIN/grpo_reuse.txt
if grep -q "^the same rows" $AGAIN/grpo_reuse.txt; then
  for m in grpo grpo_history grpo_dynamic; do for s in 0 1 2; do
    [ -d $AGAIN/runs/${m}_s$s ] || cp -r $STUDY/runs/${m}_s$s $AGAIN/runs/
  done; done
  GRPO=""
else
  GRPO="grpo grpo_history grpo_dynamic"
fi
# A, seeds 1 and 2
SEEDS="1 2" ONLY="paced paced_replay_only" again
# B: the oracle's file, then its runs
[ -f $ORACLE ] || $PY -m experiments.static_oracle --preset=smollm2_arith --samples=16 --out=$ORACLE
ONLY=tb_static_oracle again
[ -z "$GRPO" ] || ONLY="$GRPO" again
# C: seed 0 of each arm, then the rest
SEEDS=0 ONLY="grpo paced tb_static_oracle" budget
SEEDS="1 2" ONLY="grpo paced tb_static_oracle" budget
