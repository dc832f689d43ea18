"""Latent vs text mode on one system: the measurement both mode benchmarks share."""

from __future__ import annotations

import sys
import time

from recursivemas import GenerationConfig, RecursiveMAS
from recursivemas.eval.scoring import score_math


def compare_modes(
    system: RecursiveMAS,
    questions: list[str],
    max_new_tokens: int,
    latent_steps: int,
    batch_size: int,
    golds: list[str] | None = None,
) -> list[dict]:
    """Per r in 1..3: mean decoded tokens per question and wall time, latent and text mode (greedy);
    with ``golds``, also the strict accuracy and the number of distinct answers of each mode."""
    gen = GenerationConfig(max_new_tokens=max_new_tokens)
    rows = []
    for rounds in (1, 2, 3):
        row: dict = {"rounds": rounds}
        for mode in ("latent", "text"):
            start = time.perf_counter()
            results = system.run(
                questions,
                mode=mode,
                generation=gen,
                rounds=rounds,
                latent_steps=latent_steps,
                batch_size=batch_size,
            )
            row[f"{mode}_s"] = time.perf_counter() - start
            row[f"{mode}_tokens"] = sum(r.usage["decoded_tokens"] for r in results) / len(results)
            if golds is not None:
                scores = [score_math(r.text, g).correct for r, g in zip(results, golds, strict=True)]
                row[f"{mode}_accuracy"] = sum(scores) / len(scores)
                row[f"{mode}_distinct"] = len({r.answer for r in results})
            print(f"r={rounds} {mode}: {row[f'{mode}_s']:.1f}s", file=sys.stderr, flush=True)
        row["token_reduction"] = 1 - row["latent_tokens"] / row["text_tokens"]
        row["speedup"] = row["text_s"] / row["latent_s"]
        rows.append(row)
    return rows


def modes_markdown(rows: list[dict]) -> str:
    scored = "latent_accuracy" in rows[0]
    head = "| r | latent tokens/q | text tokens/q | fewer tokens | latent (s) | text (s) | speed-up |"
    rule = "|---|---|---|---|---|---|---|"
    if scored:
        head += " latent acc (distinct) | text acc (distinct) |"
        rule += "---|---|"
    lines = [head, rule]
    for r in rows:
        line = (
            f"| {r['rounds']} | {r['latent_tokens']:.1f} | {r['text_tokens']:.1f} | "
            f"{100 * r['token_reduction']:.1f}% | {r['latent_s']:.2f} | {r['text_s']:.2f} | "
            f"x{r['speedup']:.2f} |"
        )
        if scored:
            line += (
                f" {100 * r['latent_accuracy']:.0f}% ({r['latent_distinct']}) |"
                f" {100 * r['text_accuracy']:.0f}% ({r['text_distinct']}) |"
            )
        lines.append(line)
    return "\n".join(lines)
