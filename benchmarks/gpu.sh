#!/usr/bin/env bash
# The GPU figures of issue 13 goal 5, in order of value, each step under its own time limit so one slow
# compile cannot starve the rest; a failed step is reported and the next one runs. Needs no bundled GGUF:
# every model is a random one with a real model's shapes (benchmarks/shapes.py). The limits were set from
# one H200 run (eager steps there are host-bound, ~25 ms each): 27 minutes at most in all.
#
#     bash benchmarks/gpu.sh            # PY=.venv/bin/python by default; results in benchmarks/results/
#
# Writes results/{rollout,decode_vs_generate,modes-shaped}-cuda-bfloat16*.json.
set -u
PY=${PY:-.venv/bin/python}
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/recursivemas-inductor}
GPU=(--device cuda --dtype bfloat16)

step() {  # step SECONDS ARGS...: run "$PY ARGS" for at most SECONDS
    local limit=$1
    shift
    echo "## $(date +%T) $*"
    timeout "$limit" "$PY" "$@" || echo "## FAILED (exit $?): $*"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
step 150 -m pytest -q -p no:cacheprovider tests/test_compile.py -k "cuda or step_config"
step 60 benchmarks/rollout.py "${GPU[@]}" --steps 16 48 --repeats 5
step 120 benchmarks/rollout.py "${GPU[@]}" --steps 16 48 --repeats 5 --static-cache
step 150 benchmarks/rollout.py "${GPU[@]}" --steps 16 48 --repeats 5 --compile
step 90 benchmarks/decode_vs_generate.py --models smollm2-shape gemma3-shape "${GPU[@]}"
step 240 benchmarks/modes.py "${GPU[@]}"
step 60 benchmarks/rollout.py "${GPU[@]}" --steps 16 48 --repeats 5 --batch 16
step 150 benchmarks/rollout.py "${GPU[@]}" --steps 16 48 --repeats 5 --batch 16 --compile
step 200 benchmarks/decode_vs_generate.py --models smollm2-shape gemma3-shape "${GPU[@]}" --compile
step 400 benchmarks/modes.py "${GPU[@]}" --compile
