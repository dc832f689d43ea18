#!/usr/bin/env bash
# The task ladder of a preset (default: smollm2-pair): three reasoning-gym rungs on which the bundled
# single agent is between the floor and the ceiling (single-agent calibration in results/RESULTS.md),
# 200 held-out questions each (data seed 0; configs/pair-ladder.yaml holds these questions out of its
# training rows), all four modes, greedy, strict scoring, one round, m = 16 latent steps.
# Usage: benchmarks/ladder.sh [PRESET]     Results: benchmarks/results/ladder/<preset>/<rung>/.
# One thread per process runs faster on 2 cores than two processes sharing both (OMP_NUM_THREADS=1),
# so RUNGS="sum-1d" benchmarks/ladder.sh & RUNGS="sum-2d prod-1d" benchmarks/ladder.sh runs in parallel.
# After retraining links, MODES=latent MERGE=1 benchmarks/ladder.sh reruns only latent mode into the reports.
# CHECKPOINT=runs/<stage>/final benchmarks/ladder.sh PRESET evaluates links not shipped yet (results still go
# under PRESET), e.g. before benchmarks/ship_links.py.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
DTYPE=${DTYPE:-float32}  # the committed reports ran in float32; DTYPE=int8 (the CPU default) runs int8
LIMIT=${LIMIT:-200}
PRESET=${1:-smollm2-pair}
declare -A SPECS=(
  [sum-1d]="chain_sum:min_terms=2,max_terms=2,min_digits=1,max_digits=1"
  [sum-2d]="chain_sum:min_terms=2,max_terms=2,min_digits=1,max_digits=2"
  [prod-1d]="products:min_terms=2,max_terms=2,min_digits=1,max_digits=1"
)
SYSTEM=(--preset "$PRESET")
[ -z "${CHECKPOINT:-}" ] || SYSTEM=(--checkpoint "$CHECKPOINT")
for rung in ${RUNGS:-sum-1d sum-2d prod-1d}; do
  "$BIN/recursivemas" eval "${SYSTEM[@]}" --task "reasoning-gym:${SPECS[$rung]}" --limit "$LIMIT" \
      --modes "${MODES:-single,text,latent,latent-free}" ${MERGE:+--merge} --seeds 0 --temperature 0 --rounds 1 --latent-steps 16 \
      --max-new-tokens 64 --batch-size 16 --dtype "$DTYPE" --output "benchmarks/results/ladder/$PRESET/$rung"
done
