"""Latent vs text mode on the same graph, prompts and agents: decoded tokens and wall time at r = 1, 2, 3.

    python benchmarks/modes.py [--system shaped|tiny-random] [--questions 8] [--max-new-tokens 64]
                               [--latent-steps 16] [--batch-size 8] [--device cpu] [--dtype float32]
                               [--compile]

``shaped``: random agents with SmolLM2-135M / Gemma-3-270M shapes (see shapes.py); random weights
rarely emit EOS, so every text stage decodes ``--max-new-tokens`` tokens. ``--device``/``--dtype`` place
the shaped agents (links stay float32); ``--compile`` runs every latent and decode step over a static
cache, compiled (``StepConfig(compile=True)``; CUDA graphs on CUDA). With ``--compile`` the whole
measurement runs once untimed first (compiling every graph it needs); on CUDA without it, one short
question per mode (initialising CUDA's libraries). Writes benchmarks/results/modes-SYSTEM.json, with
``-<device>-<dtype>`` appended unless on the CPU in float32 and ``-compile`` with ``--compile``, and prints
a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch
from compare import compare_modes, modes_markdown
from shapes import shaped_system

from recursivemas import GenerationConfig, StepConfig, build_preset

RESULTS = Path(__file__).parent / "results"
QUESTIONS = [
    "What is 12 plus 30?",
    "A train travels 60 miles in 2 hours. What is its speed?",
    "If x + 7 = 19, what is x?",
    "Alice has 5 apples and gives 2 to Bob. How many does she keep?",
    "Divide 100 by 4.",
    "How many days are in 3 weeks?",
    "What is the square of 9?",
    "Sum 1, 2, 3 and 4.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", choices=["shaped", "tiny-random"], default="shaped")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--latent-steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--compile", action="store_true", help="static caches and compiled steps")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.system == "shaped":
        system = shaped_system(dtype=dtype, device=args.device)
    else:
        system = build_preset("tiny-random", dtype=dtype, device=args.device)
    system.set_step_config(StepConfig(compile=args.compile))
    questions = (QUESTIONS * (1 + args.questions // len(QUESTIONS)))[: args.questions]
    measure = partial(
        compare_modes, system, questions, args.max_new_tokens, args.latent_steps, args.batch_size
    )
    if args.compile:
        measure()  # warm-up outside the timings: compiles every graph the measured shapes need
    elif torch.device(args.device).type == "cuda":  # initialise CUDA's libraries outside the timings
        for mode in ("latent", "text"):
            system.run(questions[:1], mode=mode, rounds=1, generation=GenerationConfig(max_new_tokens=2))
    rows = measure()
    result = {
        "command": " ".join(["python benchmarks/modes.py", *sys.argv[1:]]),
        "settings": vars(args),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    suffix = "" if (args.device, args.dtype) == ("cpu", "float32") else f"-{args.device}-{args.dtype}"
    suffix += "-compile" if args.compile else ""
    (RESULTS / f"modes-{args.system}{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"# Latent vs text mode ({args.system}, {len(questions)} questions, m={args.latent_steps}, "
        f"max {args.max_new_tokens} new tokens per decode, {args.dtype} on {args.device}"
        f"{', compiled steps' if args.compile else ''})\n"
    )
    print(modes_markdown(rows))


if __name__ == "__main__":
    main()
