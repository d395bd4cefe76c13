#!/usr/bin/env bash
# PACED-RL against its baselines on the bundled testbed: the methods of experiments/methods.py's `comparison` group
# (GRPO, GRPO + dynamic sampling, FlowRL, PACED-RL with selection only, with replay only, in full),
# 3 seeds each, 2 processes per run; then the table and plots (experiments/compare.py).
#   bash experiments/compare.sh                 # about 20 min on 2 CPU cores; writes runs/compare/{table.md, *.png}
#   OUT=runs/cmp SEEDS="0" bash experiments/compare.sh --max_steps=100    # extra arguments go to every run
#   OUT=runs/ablations ONLY="$(python -m experiments.methods investigation)" bash experiments/compare.sh   # any names of experiments/methods.py
# A finished run (heldout_final.json present) is skipped and an interrupted one resumed, so the script
# can be re-run after a stop. Every run shares the defaults except its method's fields.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/compare}
SEEDS=${SEEDS:-"0 1 2"}
NPROC=${NPROC:-2}
PY=${PYTHON:-python}
ORDER=${ONLY:-$($PY -m experiments.methods comparison)}
mkdir -p "$OUT"
for m in $ORDER; do
  for s in $SEEDS; do
    dir="$OUT/${m}_s$s"
    if [ -f "$dir/heldout_final.json" ]; then echo "== $dir: done, skipped"; continue; fi
    if ls -d "$dir"/ckpt_* >/dev/null 2>&1; then args="--resume=$dir"; else args="--method=$m --seed=$s --out_dir=$dir --eval_every=10"; fi
    echo "== $dir $args"
    # shellcheck disable=SC2086
    $PY -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m experiments.run $args "$@" 2>&1 | grep -v "^train:" | tail -n 3
  done
done
if [ -n "${ONLY:-}" ]; then exit 0; fi  # a part: compare it with `python -m experiments.compare --runs=runs/compare,$OUT`
$PY -m experiments.compare --runs="$OUT" --out="$OUT"
