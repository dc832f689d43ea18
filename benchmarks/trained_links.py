"""Trained links vs the training-free initialisation on held-out generated questions (latent mode).

The held-out rows are the validation split of the training config (never trained on: questions and
relay facts seen there are removed from training). Both systems use the same agents, prompts, greedy
decoding and (r, m); we report exact-match accuracy of the boxed answer (per source: relay /
arithmetic), the answer cross-entropy of the final round (teacher-forced target ``\\boxed{answer}``),
and an information test on the relay rows: the answer CE when the planner's private context holds
another row's fact minus the CE with the true fact. Only the planner sees the fact, so a positive gap
(in nats per answer token) means the latent messages carried it to the solver.

    python benchmarks/trained_links.py [--links runs/default-outer/final]
        [--config configs/default-outer.yaml] [--settings 2x8,3x16] [--max-new-tokens 32]

Without ``--links`` the preset's shipped links are the trained ones. Writes
benchmarks/results/trained_links.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from recursivemas import build_preset
from recursivemas.agent import GenerationConfig
from recursivemas.checkpoint import from_pretrained
from recursivemas.eval.harness import with_training_free_links
from recursivemas.train.config import TrainConfig
from recursivemas.train.data import TrainRow, build_splits
from recursivemas.train.objectives import InnerObjective, UnrolledObjective, loss_totals

RESULTS = Path(__file__).parent / "results"


def same_answer(predicted: str | None, gold: str) -> bool:
    if predicted is None:
        return False
    predicted, gold = predicted.strip(), gold.strip()
    try:
        return float(predicted) == float(gold)
    except ValueError:
        return predicted == gold


def answer_ce(objective: UnrolledObjective, rows: list[TrainRow]) -> float:
    """Token-weighted mean answer cross-entropy of the last round."""
    total, count = loss_totals(objective, rows, 8)
    return total / count


def rotated_contexts(rows: list[TrainRow]) -> list[TrainRow]:
    """The same relay questions with each planner context taken from the next row (another fact)."""
    return [dataclasses.replace(r, context=rows[(i + 1) % len(rows)].context) for i, r in enumerate(rows)]


def inner_loss(system, config_path: str, rows: list[TrainRow]) -> float:
    """The inner stage's validation loss (sum over agents of mean 1 - cos) on ``rows``."""
    total, count = loss_totals(InnerObjective(system, TrainConfig.load(config_path)), rows, 16)
    return total / count


def measure(system, config: TrainConfig, rows: list[TrainRow], rounds: int, steps: int, max_new: int) -> dict:
    raw = config.model_dump()
    raw["system"].update(rounds=rounds, latent_steps=steps)
    objective = UnrolledObjective(system, TrainConfig.from_dict(raw))
    relay = [r for r in rows if r.context]
    relay_true = answer_ce(objective, relay)
    relay_rotated = answer_ce(objective, rotated_contexts(relay))
    start = time.perf_counter()
    results = system.run(
        [{"question": r.question, "context": r.context} for r in rows],
        mode="latent",
        generation=GenerationConfig(max_new_tokens=max_new),
        rounds=rounds,
        latent_steps=steps,
        batch_size=8,
    )
    correct = [same_answer(res.answer, r.answer) for res, r in zip(results, rows, strict=True)]
    groups = {
        "relay": [c for c, r in zip(correct, rows, strict=True) if r.context],
        "arithmetic": [c for c, r in zip(correct, rows, strict=True) if not r.context],
    }
    return {
        "answer_ce": answer_ce(objective, rows),
        "relay_ce": relay_true,
        "relay_ce_wrong_context": relay_rotated,
        "relay_information_nats": relay_rotated - relay_true,
        "accuracy": sum(correct) / len(correct),
        "accuracy_by_source": {k: (sum(v) / len(v) if v else None) for k, v in groups.items()},
        "answered": sum(res.answer is not None for res in results) / len(results),
        "seconds": time.perf_counter() - start,
        "examples": [
            {"gold": r.answer, "text": res.text[:120]} for res, r in list(zip(results, rows, strict=True))[:4]
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="smollm2-gemma3")
    parser.add_argument("--links", help="trained link checkpoint (default: the preset's shipped links)")
    parser.add_argument("--config", default="configs/default-outer.yaml")
    parser.add_argument("--inner-config", default="configs/default-inner.yaml")
    parser.add_argument("--settings", default="2x8,3x16", help="comma-separated ROUNDSxLATENT_STEPS")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--output", default=str(RESULTS / "trained_links.json"))
    args = parser.parse_args()
    config = TrainConfig.load(args.config)
    rows = build_splits(config.data).validation
    base = build_preset(args.preset, init="training-free" if args.links else None)
    trained = from_pretrained(args.links, agents=list(base.agents.values())) if args.links else base
    systems = {"trained": trained, "training-free": with_training_free_links(trained)}
    record: dict = {"preset": args.preset, "links": args.links or "shipped", "rows": len(rows), "results": {}}
    inner_rows = build_splits(TrainConfig.load(args.inner_config).data).validation
    record["inner_validation_loss"] = {
        n: inner_loss(s, args.inner_config, inner_rows) for n, s in systems.items()
    }
    print("inner validation loss", record["inner_validation_loss"], flush=True)
    for setting in args.settings.split(","):
        rounds, steps = (int(x) for x in setting.split("x"))
        for name, system in systems.items():
            key = f"{name} r={rounds} m={steps}"
            record["results"][key] = measure(system, config, rows, rounds, steps, args.max_new_tokens)
            print(key, {k: v for k, v in record["results"][key].items() if k != "examples"}, flush=True)
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    print("| links | r | m | accuracy | relay | arithmetic | answer CE | relay CE: wrong fact - true fact |")
    print("|---|---|---|---|---|---|---|---|")
    for key, r in record["results"].items():
        name, rr, mm = key.split(" ")
        by = r["accuracy_by_source"]
        print(
            f"| {name} | {rr[2:]} | {mm[2:]} | {r['accuracy']:.1%} | {by['relay']:.1%} | "
            f"{by['arithmetic']:.1%} | {r['answer_ce']:.3f} |"
        )


if __name__ == "__main__":
    main()
