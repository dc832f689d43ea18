"""Oracle controls of the relay task: what the answerer does with a perfect message in its slot.

The answerer's slot (the edge that feeds it, e.g. ``critic -> solver``) receives, instead of latent
thoughts, the fact sentence a faithful sender would think ("The secret number is 76."):

* ``oracle-text``: the sentence embedded with the answerer's own table (the same as a text message);
* ``oracle-link``: the sentence embedded with the sender's table and mapped by the edge's trained outer
  link (what a perfect sender's thoughts would deliver through this link);
* ``oracle-link-free``: the same through the training-free outer link.

These bound what any trained link can reach on relay: a link whose ``oracle-link`` score is low cannot
deliver even a perfect thought. Greedy, strict scoring (and the lenient "fact mentioned" score).

    python benchmarks/relay_oracle.py [--presets smollm2-pair,smollm2-gemma3] [--levels 1,2] [--limit 100]

Writes benchmarks/results/relay_oracle.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from recursivemas import GenerationConfig, RecursiveMAS, build_preset
from recursivemas.eval.tasks import Example, load_task
from recursivemas.executor import render_rows
from recursivemas.system import MASInput

RESULTS = Path(__file__).parent / "results"


def fact_sentence(example: Example) -> str:
    """The first sentence of the sender's notes: "The secret number is 76."."""
    notes = next(iter(example.context.values()))
    return notes.split(". ")[0].rstrip(".") + "."


@torch.no_grad()
def oracle_run(system: RecursiveMAS, examples: list[Example], variant: str, batch_size: int) -> list[str]:
    """Answers of the answerer with the oracle message of ``variant`` in the slot of its first incoming
    edge; one round, greedy, 32 new tokens."""
    cfg = system.config
    answerer = system.agents[cfg.answerer]
    edge = cfg.incoming(cfg.answerer)[0]
    sender = system.agents[edge.src]
    texts = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        pieces: list = []
        for example in chunk:
            sentence = fact_sentence(example)
            if variant == "oracle-text":
                pieces.append(sentence)
                continue
            ids = sender.tokenizer(sentence, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
            pieces.append(system.outer(edge)(sender.embed(ids.to(sender.device))))  # (T, d_dst)
        items = [MASInput(e.question) for e in chunk]
        rows = render_rows(answerer, items, {edge.slot: pieces})
        decoded = answerer.decode(answerer.encode(rows), GenerationConfig(max_new_tokens=32))
        texts.extend(decoded.texts)
    return texts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", default="smollm2-pair,smollm2-gemma3")
    parser.add_argument("--levels", default="1,2")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    rows = []
    for preset in args.presets.split(","):
        trained = build_preset(preset, rounds=1)
        free = build_preset(preset, rounds=1, init="training-free")
        systems = {"oracle-text": trained, "oracle-link": trained, "oracle-link-free": free}
        for level in map(int, args.levels.split(",")):
            task = load_task(f"relay:{level}", args.limit, relay_sender=trained.config.order[0])
            for variant, variant_system in systems.items():
                texts = oracle_run(variant_system, task.examples, variant, args.batch_size)
                strict = [task.score(e, t) for e, t in zip(task.examples, texts, strict=True)]
                lenient = [task.score(e, t, lenient=True) for e, t in zip(task.examples, texts, strict=True)]
                row = {
                    "preset": preset,
                    "level": level,
                    "variant": variant,
                    "accuracy": sum(s.correct for s in strict) / len(strict),
                    "mentioned": sum(s.correct for s in lenient) / len(lenient),
                    "distinct": len({s.extracted for s in strict}),
                    "example": texts[0][:80],
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    (RESULTS / "relay_oracle.json").write_text(json.dumps(rows, indent=1))
    print("| preset | level | slot holds | accuracy (strict) | fact mentioned | distinct |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['preset']} | {r['level']} | {r['variant']} | {100 * r['accuracy']:.0f}% | "
            f"{100 * r['mentioned']:.0f}% | {r['distinct']} |"
        )


if __name__ == "__main__":
    main()
