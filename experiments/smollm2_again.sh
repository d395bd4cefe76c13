#!/usr/bin/env bash
# The real-model question asked again (results/log/smollm2_again.md): on --preset=smollm2_arith,
#   A. paced and paced_replay_only under today's defaults at the study's budget (16 steps × 8 prompts), 3 seeds,
#      beside the study's GRPO arms, reused only if a rerun of grpo seed 0 reproduces its record exactly;
#   B. the static oracle: the initial policy's accuracy on every training prompt (16 samples), and the TB loss
#      selecting nearest τ by it, 3 seeds;
#   C. a budget where prompts recur: 16 prompts a step, pool 64, 32 steps; grpo, paced and the static oracle,
#      seed 0 of each first, then seeds 1 and 2.
# Every run pins --dtype=float32 (the preset's dtype=auto means bf16 on a CPU with native bf16 instructions, and
# the study's records were made on one), so that the records reproduce on any CPU. Where the GRPO records are
# not reused, grpo runs beside the A arms (it is their reference) and grpo_history and grpo_dynamic after C's
# seed 0.
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
again() { OUT=runs/smollm2_again RESULTS=$AGAIN RECORDS=$AGAIN/runs bash experiments/smollm2_study.sh --dtype=float32 "$@"; }
budget() { OUT=runs/smollm2_budget RESULTS=$BUDGET RECORDS=$BUDGET/runs bash experiments/smollm2_study.sh \
  --dtype=float32 --prompts_per_step=16 --pool_size=64 --max_steps=32 "$@"; }

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
  GRPO="" OTHERS=""
else  # the check's run is grpo seed 0 under today's code
  [ -d $AGAIN/runs/grpo_s0 ] || cp -r $AGAIN/grpo_check/runs/grpo_s0 $AGAIN/runs/
  GRPO="grpo" OTHERS="grpo_history grpo_dynamic"
fi
# A, seeds 1 and 2
SEEDS="1 2" ONLY="paced paced_replay_only $GRPO" again
# B: the oracle's file, then its runs
[ -f $ORACLE ] || $PY -m experiments.static_oracle --preset=smollm2_arith --dtype=float32 --samples=16 --out=$ORACLE
ONLY=tb_static_oracle again
# C: seed 0 of each arm; the other GRPO arms at budget A; then C's seeds 1 and 2
SEEDS=0 ONLY="grpo paced tb_static_oracle" budget
[ -z "$OTHERS" ] || ONLY="$OTHERS" again
SEEDS="1 2" ONLY="grpo paced tb_static_oracle" budget
