#!/usr/bin/env bash
# The evaluation report of the default preset: four tasks, all four modes, 3 seeds, paper decoding
# settings (temperature 0.6, top-p 0.95), r = 2, m = 16. Question counts are sized so the whole run
# fits in about 35 minutes on 2 CPU cores. Results: benchmarks/results/eval/<task>/.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
DTYPE=${DTYPE:-float32}  # the committed reports ran in float32; DTYPE=int8 (the CPU default) runs int8
OUT=benchmarks/results/eval
COMMON=(--modes single,text,latent,latent-free --seeds 0,1,2 --rounds 2 --latent-steps 16 --batch-size 10 --dtype "$DTYPE")
"$BIN/recursivemas" eval --task relay:1 --limit 12 --max-new-tokens 32 "${COMMON[@]}" --output "$OUT/relay"
"$BIN/recursivemas" eval --task reasoning-gym:basic_arithmetic --limit 10 --max-new-tokens 128 "${COMMON[@]}" \
    --output "$OUT/basic_arithmetic"
"$BIN/recursivemas" eval --task reasoning-gym:gsm_symbolic --limit 8 --max-new-tokens 192 "${COMMON[@]}" \
    --output "$OUT/gsm_symbolic"
"$BIN/recursivemas" eval --task humaneval --limit 6 --max-new-tokens 256 "${COMMON[@]}" --output "$OUT/humaneval"
