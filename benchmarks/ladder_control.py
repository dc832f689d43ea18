"""Does the latent message carry the question, or does the trained link act as a fixed soft prompt?

For each task-ladder rung, latent mode runs twice on the same held-out questions with the same links:
once as usual, and once with every latent message handed to the receiver of *another* question (the
messages of a batch rolled by one row before any receiver reads them). If the link only steered the
answerer toward a format, both runs score alike; if the message carries the question's content, the
mismatched run falls.

    python benchmarks/ladder_control.py [--preset smollm2-pair] [--limit 200] [--rungs sum-1d,prod-1d]

Writes benchmarks/results/ladder_control-<preset>.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from unittest import mock

import torch

import recursivemas.system as system_module
from recursivemas import GenerationConfig, RecursiveMAS, build_preset
from recursivemas.agent import Agent, Piece, PromptBatch
from recursivemas.eval.tasks import Task, load_task
from recursivemas.executor import Message, Stage

RESULTS = Path(__file__).parent / "results"
RUNGS = {
    "sum-1d": "reasoning-gym:chain_sum:min_terms=2,max_terms=2,min_digits=1,max_digits=1",
    "sum-2d": "reasoning-gym:chain_sum:min_terms=2,max_terms=2,min_digits=1,max_digits=2",
    "prod-1d": "reasoning-gym:products:min_terms=2,max_terms=2,min_digits=1,max_digits=1",
}


class _Mismatched(system_module._BatchRun):
    """A batch run whose latent messages go to the receiver of the next row's question."""

    def think(self, stage: Stage, agent: Agent, batch: PromptBatch, rows: list[list[Piece]]) -> Message:
        message = super().think(stage, agent, batch, rows)
        assert isinstance(message.latent, torch.Tensor)
        return Message(latent=message.latent.roll(1, dims=0))  # (B, m, d): row i gets row i-1's thoughts


def accuracy(system: RecursiveMAS, task: Task, batch_size: int, mismatched: bool) -> tuple[float, int]:
    """(accuracy, distinct extracted answers) of latent mode on ``task``'s questions, greedy, 64 tokens."""
    runner = _Mismatched if mismatched else system_module._BatchRun
    with mock.patch.object(system_module, "_BatchRun", runner):
        results = system.run(
            [e.question for e in task.examples],
            mode="latent",
            generation=GenerationConfig(max_new_tokens=64),
            batch_size=batch_size,
        )
    scores = [task.score(e, r.text) for e, r in zip(task.examples, results, strict=True)]
    return sum(s.correct for s in scores) / len(scores), len({r.answer for r in results})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="smollm2-pair")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--rungs", default=",".join(RUNGS))
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    system = build_preset(args.preset, rounds=1, latent_steps=16)
    rows = []
    for rung in args.rungs.split(","):
        task = load_task(RUNGS[rung], args.limit)
        own = accuracy(system, task, args.batch_size, mismatched=False)
        other = accuracy(system, task, args.batch_size, mismatched=True)
        rows.append({"rung": rung, "task": task.name, "own": own, "mismatched": other})
        print(f"{rung}: own message {own}, another question's message {other}", flush=True)
    report = {"preset": args.preset, "rows": rows}
    (RESULTS / f"ladder_control-{args.preset}.json").write_text(json.dumps(report, indent=1))
    print("| rung | latent, own message | latent, another question's message |")
    print("|---|---|---|")
    for r in rows:
        print(
            f"| {r['rung']} | {100 * r['own'][0]:.1f}% ({r['own'][1]} distinct) | "
            f"{100 * r['mismatched'][0]:.1f}% ({r['mismatched'][1]} distinct) |"
        )


if __name__ == "__main__":
    main()
