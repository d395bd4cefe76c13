#!/usr/bin/env bash
# The scheduling study's `mid` regime again on today's testbed (results/log/estimator_memory.md, "No regression where scheduling paid"):
# grpo, the TB oracle, PACED-RL with the paper's greedy rule and with the registered memory estimator (paced_memory),
# 3 seeds each, the study's settings; then results/study_memory/study_table.md. Resumable (compare.sh).
#   bash experiments/study_memory.sh          # about 20 minutes on 2 idle CPU cores
set -euo pipefail
cd "$(dirname "$0")/.."
ONLY="grpo tb_oracle paced_greedy paced_memory" OUT=runs/study_memory/mid bash experiments/compare.sh --regime=mid \
  --pool_size=128 --exact_metrics=on --quality_every=5 --eval_every=25 --eval_samples=8 "$@"
${PYTHON:-python} -m experiments.study --root=runs/study_memory --out=results/study_memory > /dev/null
echo "results/study_memory/study_table.md"
