#!/usr/bin/env bash
# Does difficulty scheduling pay on a real pretrained model? (RESULTS.md, "The SmolLM2 study")
# methods.py's `smollm2_study` group (GRPO, GRPO + history, GRPO + dynamic sampling, the TB loss with uniform
# selection, PACED-RL) × 3 seeds on --preset=smollm2_arith, one process each, one run after the other; then
# the table and plots in results/smollm2_study. About 15 minutes a run on 2 CPU cores, so the whole study takes
# several sittings. Runs go seed by seed; a finished run is skipped and an interrupted one resumed from its last
# checkpoint (compare.sh), so re-run it after a stop.
#   bash experiments/smollm2_study.sh
#   SEEDS="0" ONLY="grpo paced" bash experiments/smollm2_study.sh     # a part
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/smollm2_study}
PY=${PYTHON:-python}
ONLY="${ONLY:-$($PY methods.py smollm2_study)}"
# seed by seed, so that a stopped study has whole seeds of every method to compare; a checkpoint every 4 steps
for s in ${SEEDS:-0 1 2}; do
  ONLY="$ONLY" OUT="$OUT" NPROC=1 SEEDS="$s" bash experiments/compare.sh --preset=smollm2_arith --eval_every=8 \
    --eval_samples=4 --eval_greedy=true --ckpt_every=4 "$@"
done
$PY -m experiments.compare --runs="$OUT" --out="${RESULTS:-results/smollm2_study}"
