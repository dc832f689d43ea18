"""Training rows from an agent's own correct replies (rejection-sampled self-distillation targets).

Reads the ``predictions.jsonl`` of ``recursivemas eval --modes single`` runs (the answering agent alone,
on questions of a *training* data seed) and writes the correct ones as ``{question, answer}`` rows whose
answer is the whole reply, for a training source with ``answer_format: "{answer}"``. An outer link trained
on them learns to steer the answerer toward its own successful working instead of toward an immediate
boxed answer (which, trained on the bare ``\\boxed{answer}`` of arithmetic rows, collapsed to a few
answers: see RESULTS.md, task ladder).

    SPEC="reasoning-gym:chain_sum:min_terms=2,max_terms=2,min_digits=1,max_digits=2"
    recursivemas eval --preset smollm2-pair --task "$SPEC" --limit 480 --modes single --seeds 0 \\
        --temperature 0 --max-new-tokens 64 --data-seed 4242 --output runs/sd/chain_sum
    # the same for "reasoning-gym:products:min_terms=2,max_terms=2,min_digits=1,max_digits=2"
    python benchmarks/worked_replies.py runs/sd/chain_sum runs/sd/products \\
        --out configs/data/pair-worked.jsonl

Evaluation questions are removed later by the training config's ``data.holdout``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def worked_rows(run: Path) -> list[dict]:
    """The correct single-mode replies of one eval output directory, as training rows."""
    rows = []
    for line in (run / "predictions.jsonl").read_text().splitlines():
        pred = json.loads(line)
        if pred["mode"] == "single" and pred["correct"]:
            rows.append({"question": pred["question"], "answer": pred["text"].strip()})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+", type=Path, help="eval output directories (single mode)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = [row for run in args.runs for row in worked_rows(run)]
    unique = list({row["question"]: row for row in rows}.values())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(row) + "\n" for row in unique))
    print(f"wrote {len(unique)} rows ({len(rows)} correct replies) to {args.out}")


if __name__ == "__main__":
    main()
