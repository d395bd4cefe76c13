#!/usr/bin/env bash
# The paper's claims in miniature (issue 3): GRPO, GRPO + dynamic sampling, FlowRL, PACED-RL with
# selection only, with replay only, and in full; 3 seeds each, on the bundled testbed, 2 processes.
#   bash compare.sh                 # about 30 min on 2 CPU cores; writes runs/compare/{table.md, *.png}
#   OUT=runs/cmp SEEDS="0" bash compare.sh --max_steps=100   # extra arguments go to every run
#   OUT=runs/ablations ONLY="paced_pool256 paced_greedy" bash compare.sh   # the README's investigation
# A finished run (heldout_final.json present) is skipped and an interrupted one resumed, so the script
# can be re-run after a stop. Every run shares the defaults of train.py except the method's switches.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-runs/compare}
SEEDS=${SEEDS:-"0 1 2"}
NPROC=${NPROC:-2}
PY=${PYTHON:-python}
declare -A METHOD=(
  [grpo]="--algo=grpo"
  [grpo_dynamic]="--algo=grpo --dynamic_sampling=true"
  [flowrl]="--algo=flowrl"
  [paced_select_only]="--algo=paced --replay=off"
  [paced_replay_only]="--algo=paced --select=uniform"
  [paced]="--algo=paced"
  # the investigation of why PACED-RL does not win here (README): one switch each
  [paced_pool256]="--algo=paced --pool_size=256 --explore_frac=0.25"
  [paced_greedy]="--algo=paced --explore_frac=0"
  [paced_replay_trains_logz]="--algo=paced --replay_trains_logz=true"
  [paced_logz_lr3e-3]="--algo=paced --logz_lr=3e-3"
  [paced_logz_lr3e-2]="--algo=paced --logz_lr=3e-2"
  [paced_mean_last]="--algo=paced --logz_features=mean_last"
  # fairness checks: the shared lr 2e-4 was tuned for PACED-RL; FlowRL's authors step several times per batch
  [grpo_lr1e-4]="--algo=grpo --lr=1e-4"
  [grpo_lr4e-4]="--algo=grpo --lr=4e-4"
  [paced_lr4e-4]="--algo=paced --lr=4e-4"
  [flowrl_4_updates]="--algo=flowrl --updates_per_batch=4"
  # the scheduling study (study.sh): the competing selectors, with the GRPO loss and with the TB loss
  [grpo_history]="--algo=grpo --select=history"
  [grpo_oracle]="--algo=grpo --select=oracle"
  [tb_history]="--algo=paced --select=history"
  [tb_regress]="--algo=paced --select=regress"
  [tb_hybrid]="--algo=paced --select=hybrid"
  [tb_oracle]="--algo=paced --select=oracle"
  [tb_hybrid_greedy]="--algo=paced --select=hybrid --explore_frac=0"
)
ORDER=${ONLY:-"grpo grpo_dynamic flowrl paced_select_only paced_replay_only paced"}
mkdir -p "$OUT"
for m in $ORDER; do
  for s in $SEEDS; do
    dir="$OUT/${m}_s$s"
    if [ -f "$dir/heldout_final.json" ]; then echo "== $dir: done, skipped"; continue; fi
    resume=""
    if ls -d "$dir"/ckpt_* >/dev/null 2>&1; then resume="--resume=$dir"; fi
    echo "== $dir ${METHOD[$m]} $resume"
    if [ -n "$resume" ]; then args="$resume"; else args="${METHOD[$m]} --seed=$s --out_dir=$dir --eval_every=10"; fi
    # shellcheck disable=SC2086
    $PY -m torch.distributed.run --standalone --nproc_per_node="$NPROC" train.py $args "$@" 2>&1 | grep -v "^train:" | tail -n 3
  done
done
if [ -n "${ONLY:-}" ]; then exit 0; fi  # an investigation: compare it with `python eval.py --compare=runs/compare,$OUT`
$PY eval.py --compare="$OUT" --out="$OUT"
