#!/usr/bin/env bash
# The estimator registered offline (results/log/estimator_memory.md), in full runs on
# --preset=smollm2_arith: `paced_memory` (Z_φ refitted on every observed group, the highest p̂ chosen) at budget A
# (16 steps × 8 prompts, pool 32) and C (32 steps × 16 prompts, pool 64), 3 seeds each, beside the records of
# experiments/smollm2_again.sh (whose budget-C seed 2 arms run after A here). Resumable and skipping finished runs,
# as experiments/smollm2_study.sh is; 15 to 25 minutes a run at A on 2 idle CPU cores, about twice that at C.
#   bash experiments/smollm2_memory.sh
set -euo pipefail
cd "$(dirname "$0")/.."
again() { OUT=runs/smollm2_again RESULTS=results/smollm2_again RECORDS=results/smollm2_again/runs \
  bash experiments/smollm2_study.sh --dtype=float32 "$@"; }
budget() { OUT=runs/smollm2_budget RESULTS=results/smollm2_budget RECORDS=results/smollm2_budget/runs bash experiments/smollm2_study.sh \
  --dtype=float32 --prompts_per_step=16 --pool_size=64 --max_steps=32 "$@"; }
ONLY=paced_memory again
bash experiments/smollm2_again.sh  # budget C's seed 2 of grpo, paced and the static oracle
ONLY=paced_memory budget
