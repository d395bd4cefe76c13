#!/usr/bin/env bash
# Does difficulty scheduling pay on a real pretrained model? (results/log/smollm2.md, "The SmolLM2 study")
# experiments/methods.py's `smollm2_study` group (GRPO, GRPO + history, GRPO + dynamic sampling, the TB loss with uniform
# selection, PACED-RL) × 3 seeds on --preset=smollm2_arith, one process each, one run after the other; then
# the table and plots in results/smollm2_study. 15 to 25 minutes a run on 2 CPU cores, dynamic sampling longer, so
# the whole study takes several sittings, and it is built to be stopped. Run nothing CPU-heavy beside it: with the
# test suite running too, dynamic sampling's steps take about 10 times as long.
# - a run trains in runs/smollm2_study/<method>_s<seed> (checkpoints every 4 steps: an interrupted run resumes);
# - a finished run's record (config.json, lab.json, metrics.jsonl, heldout_final.json, and levels.json with the data
#   rows' levels: all the table reads, about 30 kB) is copied at once to results/smollm2_study/runs/, which is
#   committed; a run with a record is skipped.
# So a fresh clone holding the records rebuilds the committed table without training; to train every run
# again and compare, point RECORDS somewhere empty (the runs are deterministic on one machine's CPU):
#   bash experiments/smollm2_study.sh
#   SEEDS="0" ONLY="grpo paced" bash experiments/smollm2_study.sh     # a part
#   RECORDS=runs/smollm2_again bash experiments/smollm2_study.sh     # everything from scratch, into another table
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/smollm2_study}
RESULTS=${RESULTS:-results/smollm2_study}
RECORDS=${RECORDS:-$RESULTS/runs}
PY=${PYTHON:-python}
ONLY="${ONLY:-$($PY -m experiments.methods smollm2_study)}"
mkdir -p "$RECORDS"
# seed by seed, so that a stopped study has whole seeds of every method to compare
for s in ${SEEDS:-0 1 2}; do
  for m in $ONLY; do
    name="${m}_s$s"
    if [ -f "$RECORDS/$name/heldout_final.json" ]; then echo "== $name: recorded in $RECORDS, skipped"; continue; fi
    ONLY="$m" OUT="$OUT" NPROC=1 SEEDS="$s" bash experiments/compare.sh --preset=smollm2_arith --eval_every=8 \
      --eval_samples=4 --eval_greedy=true --ckpt_every=4 "$@"
    mkdir -p "$RECORDS/$name.tmp"
    cp "$OUT/$name/config.json" "$OUT/$name/lab.json" "$OUT/$name/metrics.jsonl" "$OUT/$name/heldout_final.json" "$RECORDS/$name.tmp/"
    $PY -m experiments.compare --write_levels="$RECORDS/$name.tmp" >/dev/null  # the data's levels: testbed/ is not committed
    rm -rf "$RECORDS/$name" && mv "$RECORDS/$name.tmp" "$RECORDS/$name"
    echo "== $name: recorded in $RECORDS/$name"
  done
done
$PY -m experiments.compare --runs="$RECORDS" --out="$RESULTS"
