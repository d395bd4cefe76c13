#!/usr/bin/env bash
# The SmolLM2 studies' tables and plots rebuilt from their committed records alone, in seconds (no run starts):
# the first study (results/smollm2_study), its sequel at the same budget with the static oracle
# (results/smollm2_again), and the larger budget (results/smollm2_budget). Arms or seeds not yet recorded are absent.
#   bash experiments/smollm2_tables.sh
set -euo pipefail
cd "$(dirname "$0")/.."
for d in results/smollm2_study results/smollm2_again results/smollm2_budget; do
  ${PYTHON:-python} -m experiments.compare --runs="$d/runs" --out="$d" > /dev/null
  echo "$d/table.md rebuilt from $(ls "$d/runs" | wc -l) records"
done
