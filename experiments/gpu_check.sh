#!/usr/bin/env bash
# The first thing to run on a GPU machine: does this project work here, and how fast? Offline; about 8 minutes
# on one GPU. One report, OUT_DIR/report.md, with the device, the versions and every figure:
#   1. the device checks (experiments/gpu_check.py agree): static sampler against lm.generate, compiled on CUDA;
#      the sampler's, the chunked head's and the shared-prefix pass's log-probs against the plain pass's
#   2. the default testbed run (train.py, 250 steps) on the device, and on the CPU beside it
#   3. torchrun --nproc_per_node=1 (NCCL on a GPU), plain and with --fsdp=true, 12 steps each
#   4. the bench at the paper preset's 1.5 B shape, reduced to 16 prompts (experiments/bench.py, modes all and
#      static): rollout tokens/s and its share of the bandwidth bound, update MFU, peak memory per phase
# Usage:
#   bash experiments/gpu_check.sh OUT_DIR                 # on the GPU
#   bash experiments/gpu_check.sh OUT_DIR --device=cpu    # everything at a small shape on the CPU (the tests run it)
# A failed step is recorded (its exit status in the report, its output in OUT_DIR/<step>.log) and the rest still
# run; the script exits non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash experiments/gpu_check.sh OUT_DIR [--device=cpu]}
DEVICE=$(python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo cpu)
for a in "${@:2}"; do
  case $a in --device=*) DEVICE=${a#--device=} ;; *) echo "gpu_check: unknown argument $a" >&2; exit 2 ;; esac
done
PY=${PYTHON:-python}
mkdir -p "$OUT"
: > "$OUT/steps.tsv"
if [ "$DEVICE" = cpu ]; then  # a small shape: the shipped small testbed, a few steps, a testbed-shaped bench
  TB=testbed/small; RUN=(--max_steps=4 --eval_every=4 --eval_samples=2 --prompts_per_step=4 --group_size=4 --pool_size=16)
  DIST=(--max_steps=2); BENCH=(--prompts=4 --group_size=2 --steps=1)
else
  TB=testbed; RUN=(); DIST=(--max_steps=12)
  BENCH=(--shape=qwen2.5-1.5b --prompts=16 --prompt_len=256 --response_len=512 --response_min=256 --micro_batch=32
         --logit_chunk=256 --steps=1)
fi
DATA=(--model=$TB/model --train_data=$TB/train.jsonl --eval_data=$TB/heldout.jsonl --testbed_dir=$TB)
failed=0
step() {  # step NAME COMMAND...: run it, its output to OUT/NAME.log, its exit status and seconds to steps.tsv
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name: $*"
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$OUT/steps.tsv"
  [ $rc -eq 0 ] || { failed=1; echo "   failed (exit $rc): see $OUT/$name.log"; tail -3 "$OUT/$name.log"; }
}
rm -rf "$OUT"/run_device "$OUT"/run_cpu "$OUT"/torchrun_plain "$OUT"/torchrun_fsdp
step agree $PY -m experiments.gpu_check agree --device="$DEVICE" --out="$OUT"
step run_device $PY train.py "${DATA[@]}" "${RUN[@]}" --device="$DEVICE" --out_dir="$OUT/run_device"
step run_cpu $PY train.py "${DATA[@]}" "${RUN[@]}" --device=cpu --out_dir="$OUT/run_cpu"
step torchrun_plain torchrun --standalone --nproc_per_node=1 train.py "${DATA[@]}" "${RUN[@]}" "${DIST[@]}" \
  --device="$DEVICE" --out_dir="$OUT/torchrun_plain"
step torchrun_fsdp torchrun --standalone --nproc_per_node=1 train.py "${DATA[@]}" "${RUN[@]}" "${DIST[@]}" \
  --device="$DEVICE" --fsdp=true --out_dir="$OUT/torchrun_fsdp"
step bench $PY -m experiments.bench "${BENCH[@]}" --modes=all,static
grep '^|\|^device' "$OUT/bench.log" > "$OUT/bench.txt" || true
$PY -m experiments.gpu_check report --out="$OUT"
exit $failed
