"""Gradient stability across rounds (SPEC §6): RecursiveLinks vs a text-like softmax bridge.

On the same system and held-out rows, backpropagate the final-round answer cross-entropy through the
unrolled latent recursion and record ``||dL/dM_k||`` for the messages ``M_k`` each round produces; the
ratio round 1 / round r says how much gradient survives the trip back through r - 1 rounds. Systems:
the preset's trained links, its training-free links, and ``softmax_bridges`` (every link replaced by
``T^T softmax(W_out x)``).

    python benchmarks/gradient_stability.py [--preset smollm2-gemma3] [--config configs/default-outer.yaml]
        [--rows 8] [--batch-size 2] [--rounds 3] [--latent-steps 16]

Writes benchmarks/results/gradient_stability.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from recursivemas import build_preset
from recursivemas.eval.harness import with_training_free_links
from recursivemas.train.bridge import softmax_bridges
from recursivemas.train.config import TrainConfig
from recursivemas.train.data import build_splits
from recursivemas.train.objectives import UnrolledObjective

RESULTS = Path(__file__).parent / "results"


def round_norms(system, config: TrainConfig, rows, batch_size: int) -> list[dict[int, float]]:
    """Per batch: round -> ||dL/dM_round|| (messages that depend on nothing trainable are leaves
    requiring grad, so every round is measured, bridges included)."""
    objective = UnrolledObjective(system, config)
    out = []
    for i in range(0, len(rows), batch_size):
        result = objective.loss(rows[i : i + batch_size])
        result.loss.backward()
        out.append(result.round_grad_norms())
        system.links.zero_grad(set_to_none=True)
    return out


def summarise(per_batch: list[dict[int, float]], rounds: int) -> dict:
    ratios = [b[1] / b[rounds] for b in per_batch if b.get(rounds)]
    return {
        "round_grad_norm_mean": {k: statistics.mean(b[k] for b in per_batch) for k in range(1, rounds + 1)},
        "ratio_round1_over_last": statistics.mean(ratios),
        "ratio_round1_over_last_median": statistics.median(ratios),
        "ratio_per_batch": ratios,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="smollm2-gemma3")
    parser.add_argument("--config", default="configs/default-outer.yaml", help="data and answer format")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latent-steps", type=int, default=16)
    args = parser.parse_args()
    raw = TrainConfig.load(args.config).model_dump()
    raw["system"].update(rounds=args.rounds, latent_steps=args.latent_steps)
    raw["objective"]["gradient_checkpointing"] = True
    config = TrainConfig.from_dict(raw)
    rows = build_splits(config.data).validation[: args.rows]
    trained = build_preset(args.preset, rounds=args.rounds, latent_steps=args.latent_steps)
    systems = {
        "RecursiveLinks (trained)": trained,
        "RecursiveLinks (training-free)": with_training_free_links(trained),
        "softmax bridge W_in·softmax(W_out·h)": softmax_bridges(trained),
    }
    results = {
        name: summarise(round_norms(s, config, rows, args.batch_size), args.rounds)
        for name, s in systems.items()
    }
    record = {
        "preset": args.preset,
        "rows": len(rows),
        "rounds": args.rounds,
        "latent_steps": args.latent_steps,
        "results": results,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gradient_stability.json").write_text(json.dumps(record, indent=2) + "\n")
    header = " | ".join(f"round {k}" for k in range(1, args.rounds + 1))
    print(f"| links | {header} | round 1 / round {args.rounds} (mean) | (median) |")
    print("|---|" + "---|" * (args.rounds + 2))
    for name, r in results.items():
        norms = " | ".join(f"{r['round_grad_norm_mean'][k]:.3g}" for k in range(1, args.rounds + 1))
        mean, median = r["ratio_round1_over_last"], r["ratio_round1_over_last_median"]
        print(f"| {name} | {norms} | {mean:.3g} | {median:.3g} |")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
