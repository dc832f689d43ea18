"""Start-up time to a loaded preset (issue 13 goal 4): cold (empty model cache, so both GGUFs are
converted) and warm (cache filled), each in a fresh Python process, as a user's first and later runs.

    python benchmarks/cold_start.py [--preset smollm2-gemma3] [--dtype auto] [--warm-runs 3] [--output PATH]

A child process imports ``recursivemas.loading`` and loads the preset as ``recursivemas run`` does
(``load_system``: CPU, ``--dtype``, default ``auto``, i.e. int8, whose first load also quantises and caches
the int8 weights), before any generation, in a temporary ``RECURSIVEMAS_CACHE``; "loaded" is the time
from starting the process to the loaded system, interpreter start-up included. Warm figures are the
median of ``--warm-runs`` runs after one warm-up run. Each run records the 1-minute load average before
it: a cold start converts in several processes only when it leaves a CPU free, and other work on the
machine slows every figure.
Writes benchmarks/results/cold_start.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rollout import wall_times

from recursivemas.loading import AUTO, DTYPE_CHOICES, resolve_dtype
from recursivemas.presets import DEFAULT_PRESET

RESULTS = Path(__file__).parent / "results"
# The child reports wall-clock instants, so the parent can count from before the interpreter starts.
CHILD = """
import json, sys, time
begin = time.perf_counter()
from recursivemas.loading import load_system
start = time.perf_counter()
load_system(sys.argv[1], None, sys.argv[2], "cpu")
built = time.perf_counter()
print(json.dumps({"import_s": start - begin, "build_s": built - start, "loaded_at": time.time()}))
"""


def start_up(preset: str, dtype: str, cache: str) -> dict:
    """One child process loading ``preset`` in ``dtype`` with the model cache ``cache``: its timings, in
    seconds."""
    env = {**os.environ, "RECURSIVEMAS_CACHE": cache}
    load = os.getloadavg()[0]  # the conversion runs side by side only with a CPU free (see models.bundled)
    started = time.time()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, preset, dtype], env=env, capture_output=True, text=True, check=True
    )
    report = json.loads(done.stdout.splitlines()[-1])
    return {
        "loaded_s": report.pop("loaded_at") - started,
        **report,
        "converted": "first use of" in done.stderr,
        "load_average_1min_before": load,
    }


def summary(runs: list[dict]) -> dict:
    """The median of each timing over ``runs``, with the runs themselves."""
    keys = ("loaded_s", "import_s", "build_s")
    return {**{k: statistics.median(r[k] for r in runs) for k in keys}, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=DEFAULT_PRESET)
    parser.add_argument("--dtype", default=AUTO, choices=DTYPE_CHOICES)
    parser.add_argument("--warm-runs", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS / "cold_start.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="recursivemas-cold-") as cache:
        cold = start_up(args.preset, args.dtype, cache)
        warm: list[dict] = []
        wall_times(lambda: warm.append(start_up(args.preset, args.dtype, cache)), args.warm_runs)
    if not cold["converted"] or any(r["converted"] for r in warm):
        raise SystemExit("the cold run did not convert, or a warm run converted again: check the cache")
    result = {
        "command": (
            f"python benchmarks/cold_start.py --preset {args.preset} --dtype {args.dtype} "
            f"--warm-runs {args.warm_runs}"
        ),
        "preset": args.preset,
        "dtype": resolve_dtype(args.dtype, "cpu"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "cold": cold,
        "warm": summary(warm[1:]),  # the first is the warm-up
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"# Start-up to a loaded `{args.preset}` ({result['dtype']}), fresh process each\n")
    print("| start | to loaded system (s) | import recursivemas (s) | load preset (s) |")
    print("|---|---|---|---|")
    w = result["warm"]
    print(f"| cold (empty cache) | {cold['loaded_s']:.1f} | {cold['import_s']:.1f} | {cold['build_s']:.1f} |")
    print(
        f"| warm (median of {len(w['runs'])}) | {w['loaded_s']:.1f} | {w['import_s']:.1f} | "
        f"{w['build_s']:.1f} |"
    )


if __name__ == "__main__":
    main()
