"""The default preset (bundled SmolLM2-135M + Gemma-3-270M) on real questions:

1. latent vs text mode, r = 1, 2, 3: decoded tokens and wall time (greedy, reasoning-gym arithmetic);
2. KV-cached vs re-encode latent rollout at m = 48 on the real planner;
3. time to first answer from the command line: warm cache, and cold (empty cache: GGUF conversion).

    python benchmarks/default_preset.py [--questions 20] [--task basic_arithmetic] [--max-new-tokens 128]
                                        [--latent-steps 16] [--batch-size 10] [--skip-cold]

Writes benchmarks/results/default_preset.json and default_preset.png, prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib
import reasoning_gym
import torch
from compare import compare_modes, modes_markdown

from recursivemas import build_preset
from recursivemas.presets import DEFAULT_PRESET

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).parent / "results"
CLI_QUESTION = "Calculate 17 + 25."


def rollout_ratio(system, question: str, steps: int = 48) -> dict:
    agent = system.agents["planner"]
    batch = agent.encode([agent.fill(agent.render(question, None, set()), {})])
    link = system.inner("planner")
    timings = {}
    with torch.inference_mode():
        for name, fn in (("kv_cached_s", agent.think), ("reencode_s", agent.think_reference)):
            fn(batch, 4, link)  # warm-up
            start = time.perf_counter()
            fn(batch, steps, link)
            timings[name] = time.perf_counter() - start
    return {
        "latent_steps": steps,
        "prompt_tokens": batch.lengths[0],
        **timings,
        "speedup": timings["reencode_s"] / timings["kv_cached_s"],
    }


def cli_seconds(cache: str | None, max_new_tokens: int) -> float:
    env = dict(os.environ)
    if cache is not None:
        env["RECURSIVEMAS_CACHE"] = cache
    # float32, as the rest of this benchmark and its committed figures (the CLI's CPU default is int8)
    command = ["run", CLI_QUESTION, "--max-new-tokens", str(max_new_tokens), "--dtype", "float32"]
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "recursivemas", *command],
        check=True,
        env=env,
        capture_output=True,
    )
    return time.perf_counter() - start


def plot(rows: list[dict], path: Path) -> None:
    rounds = [r["rounds"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for mode, style in (("latent", "o-"), ("text", "s--")):
        ax1.plot(rounds, [r[f"{mode}_tokens"] for r in rows], style, label=mode)
        ax2.plot(rounds, [r[f"{mode}_s"] for r in rows], style, label=mode)
    ax1.set(xlabel="rounds r", ylabel="decoded tokens / question", xticks=rounds)
    ax2.set(xlabel="rounds r", ylabel="wall time (s)", xticks=rounds)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{DEFAULT_PRESET}: RecursiveMAS (latent) vs Recursive-TextMAS (text)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--task", default="basic_arithmetic")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--latent-steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--skip-cold", action="store_true", help="skip the cold-cache CLI run (~1.5 min)")
    args = parser.parse_args()
    torch.manual_seed(0)
    questions = [
        x["question"] for x in reasoning_gym.create_dataset(args.task, size=args.questions, seed=args.seed)
    ]
    start = time.perf_counter()
    system = build_preset(DEFAULT_PRESET)
    build_s = time.perf_counter() - start
    result = {
        "command": "python benchmarks/default_preset.py "
        + " ".join(
            f"--{k.replace('_', '-')}" + ("" if isinstance(v, bool) else f" {v}")
            for k, v in vars(args).items()
            if v is not False
        ),
        "preset": DEFAULT_PRESET,
        "task": args.task,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "build_s": build_s,
        "modes": compare_modes(system, questions, args.max_new_tokens, args.latent_steps, args.batch_size),
        "rollout": rollout_ratio(system, questions[0]),
        "cli_warm_s": cli_seconds(None, 64),
    }
    if not args.skip_cold:
        with tempfile.TemporaryDirectory() as cold:
            result["cli_cold_s"] = cli_seconds(cold, 64)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "default_preset.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result["modes"], RESULTS / "default_preset.png")
    print(
        f"# {DEFAULT_PRESET}: {args.questions} x reasoning-gym {args.task}, greedy, m={args.latent_steps}, "
        f"max {args.max_new_tokens} new tokens per decode, batch {args.batch_size}\n"
    )
    print(modes_markdown(result["modes"]))
    ro = result["rollout"]
    print(
        f"\nRollout m={ro['latent_steps']} (prompt {ro['prompt_tokens']} tokens): "
        f"KV-cached {ro['kv_cached_s']:.2f}s, "
        f"re-encode {ro['reencode_s']:.2f}s, x{ro['speedup']:.1f}"
    )
    print(f"Build preset (warm cache, in-process): {build_s:.1f}s")
    print(f"CLI time to first answer, warm cache: {result['cli_warm_s']:.1f}s")
    if "cli_cold_s" in result:
        print(f"CLI first run, cold cache (GGUF conversion): {result['cli_cold_s']:.1f}s")


if __name__ == "__main__":
    main()
