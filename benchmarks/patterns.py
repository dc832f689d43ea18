"""The four collaboration patterns on their bundled presets: latent vs text at r = 1, 2, 3, and how often
the deliberation preset's tool-caller writes a tool call that runs.

    python benchmarks/patterns.py [--presets P1,P2,...] [--questions 20] [--max-new-tokens 64]
                                  [--latent-steps 16] [--skip-modes] [--skip-tools]

Questions: held-out reasoning-gym chain_sum rows with two 1-digit terms (data seed 0), the rung where
the bundled single agent is neither at the floor nor the ceiling (RESULTS.md, task ladder); strict
scoring, greedy. Tool calls: the deliberation preset in ``single`` mode (the tool-caller alone) and in
``latent`` mode (r = 1), with the tool-caller's reply as it writes it and forced to start with
``<python>``. Writes benchmarks/results/patterns.json and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from compare import compare_modes, modes_markdown

from recursivemas import GenerationConfig, build_preset
from recursivemas.eval.scoring import score_math
from recursivemas.eval.tasks import load_task

RESULTS = Path(__file__).parent / "results"
PRESETS = "smollm2-gemma3,smollm2-gemma3-mixture,smollm2-gemma3-distillation,smollm2-gemma3-deliberation"
TASK = "reasoning-gym:chain_sum:min_terms=2,max_terms=2,min_digits=1,max_digits=1"
TOOL_TASK = "reasoning-gym:basic_arithmetic"


def tool_calls(questions: list[str], golds: list[str], max_new_tokens: int) -> list[dict]:
    """Per (mode, prefix): share of questions with a call that ran without error, calls per question,
    accuracy and distinct answers."""
    system = build_preset("smollm2-gemma3-deliberation", rounds=1, latent_steps=16)
    caller = system.agents["toolcaller"]
    rows = []
    for prefix in ("", "<python>\n"):
        system.agents["toolcaller"] = dataclasses.replace(
            caller, template=dataclasses.replace(caller.template, response_prefix=prefix)
        )
        for mode in ("single", "latent"):
            start = time.perf_counter()
            results = system.run(
                questions, mode=mode, generation=GenerationConfig(max_new_tokens=max_new_tokens)
            )
            calls = [[s.tool_call for s in r.trace if s.kind == "tool"] for r in results]
            rows.append(
                {
                    "mode": mode,
                    "prefix": prefix,
                    "ran_ok": sum(any(c.error is None for c in cs) for cs in calls) / len(results),
                    "calls_per_question": sum(map(len, calls)) / len(results),
                    "errors": sorted({c.error for cs in calls for c in cs if c.error}),
                    "accuracy": sum(
                        score_math(r.text, g).correct for r, g in zip(results, golds, strict=True)
                    )
                    / len(results),
                    "distinct_answers": len({r.answer for r in results}),
                    "seconds": time.perf_counter() - start,
                    "example": results[0].text[:300],
                }
            )
            print(f"tools {mode} prefix={prefix!r}: {rows[-1]['ran_ok']:.2f}", file=sys.stderr, flush=True)
    return rows


def tools_markdown(rows: list[dict]) -> str:
    lines = [
        "| mode | reply starts with | calls that ran | calls/q | accuracy (distinct answers) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        start = repr(r["prefix"].strip()) if r["prefix"] else "(free)"
        lines.append(
            f"| {r['mode']} | {start} | {100 * r['ran_ok']:.0f}% | {r['calls_per_question']:.2f} | "
            f"{100 * r['accuracy']:.0f}% ({r['distinct_answers']}) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=PRESETS)
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--latent-steps", type=int, default=16)
    parser.add_argument("--skip-modes", action="store_true")
    parser.add_argument("--skip-tools", action="store_true")
    args = parser.parse_args()
    out = RESULTS / "patterns.json"
    result = json.loads(out.read_text()) if out.exists() else {}
    result.update(
        command="python benchmarks/patterns.py " + " ".join(sys.argv[1:]),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        task=TASK,
    )
    if not args.skip_modes:
        task = load_task(TASK, limit=args.questions)
        questions, golds = [e.question for e in task.examples], [e.gold for e in task.examples]
        for name in args.presets.split(","):
            system = build_preset(name)
            rows = compare_modes(system, questions, args.max_new_tokens, args.latent_steps, 8, golds)
            result.setdefault("modes", {})[name] = rows
            print(f"\n## {name} ({system.config.pattern})\n\n{modes_markdown(rows)}")
    if not args.skip_tools:
        task = load_task(TOOL_TASK, limit=args.questions)
        rows = tool_calls(
            [e.question for e in task.examples], [e.gold for e in task.examples], args.max_new_tokens
        )
        result["tools"] = {"task": TOOL_TASK, "rows": rows}
        print(f"\n## Tool calls (smollm2-gemma3-deliberation, {TOOL_TASK})\n\n{tools_markdown(rows)}")
    RESULTS.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
