#!/usr/bin/env bash
# The relay diagnostic of a preset (default: both bundled presets): held-out relay rows (data seed 0;
# training used other seeds) at levels 1 and 2, all four modes, greedy, strict scoring, one round,
# m = 16 latent steps. The summaries carry the lens recovery per hop (latent modes).
# MODES=latent MERGE=1 benchmarks/relay.sh PRESET reruns only latent mode into the reports (new links).
# CHECKPOINT=runs/<stage>/final benchmarks/relay.sh PRESET evaluates links not shipped yet (results under PRESET).
# Usage: benchmarks/relay.sh [PRESET ...]     Results: benchmarks/results/relay/<preset>/level<L>/.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
DTYPE=${DTYPE:-float32}  # the committed reports ran in float32; DTYPE=int8 (the CPU default) runs int8
LIMIT=${LIMIT:-100}
PRESETS=("$@")
[ ${#PRESETS[@]} -gt 0 ] || PRESETS=(smollm2-pair smollm2-gemma3)
for preset in "${PRESETS[@]}"; do
  SYSTEM=(--preset "$preset")
  [ -z "${CHECKPOINT:-}" ] || SYSTEM=(--checkpoint "$CHECKPOINT")
  for level in ${LEVELS:-1 2}; do
    "$BIN/recursivemas" eval "${SYSTEM[@]}" --task "relay:$level" --limit "$LIMIT" \
        --modes "${MODES:-single,text,latent,latent-free}" ${MERGE:+--merge} --seeds 0 --temperature 0 --rounds 1 --latent-steps 16 \
        --max-new-tokens 32 --batch-size 16 --dtype "$DTYPE" --output "benchmarks/results/relay/$preset/level$level"
  done
done
