"""Do the first agent's latent thoughts keep the fact of its notes? Relay level-1 rows (2-digit facts).

For a preset (its shipped links, or a link checkpoint with --links) and, side by side, its
training-free links, the planner thinks m latent steps on held-out relay rows and we measure:

* lens hit: the share of rows whose fact's tokens are among the top-5 nearest vocabulary tokens of
  some thought (the relay eval's ``lens:planner`` diagnostic);
* distinct: the number of distinct top-1 lens sequences over the rows (1 = input-independent);
* differ: over pairs of rows with different facts, the share of thought positions whose top-1 token
  differs;
* probe: a linear probe (multinomial logistic regression on the concatenated thoughts) that reads the
  fact's tens digit, trained on ``--train`` rows and scored on ``--test`` other rows (chance 1/9).

    python benchmarks/faithfulness.py --preset smollm2-pair
    python benchmarks/faithfulness.py --preset smollm2-gemma3 --links runs/default-outer/final

Writes results/faithfulness-<preset>.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from recursivemas import build_preset
from recursivemas.checkpoint import load_links
from recursivemas.eval.relay import LENS_TOP_K, lens_recovery, relay_rows
from recursivemas.system import RecursiveMAS
from recursivemas.trace import StageTrace

RESULTS = Path(__file__).parent / "results"


@torch.no_grad()
def thoughts(system: RecursiveMAS, rows: list[dict], steps: int) -> torch.Tensor:
    """(N, m, d) planner thoughts R_in(H) for each row, in batches of 16."""
    agent = system.agents["planner"]
    out = []
    for i in range(0, len(rows), 16):
        chunk = rows[i : i + 16]
        batch = agent.encode(
            [agent.fill(agent.render(r["question"], r["context"]["planner"], set()), {}) for r in chunk]
        )
        out.append(agent.think(batch, steps, system.inner("planner")).embeds.float())
    return torch.cat(out)


def probe_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor
) -> float:
    """Multinomial logistic regression (standardised inputs, L2 1e-3, 300 L-BFGS steps) -> test accuracy."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    x, xt = (train_x - mean) / std, (test_x - mean) / std
    w = torch.zeros(x.shape[1], 10, requires_grad=True)
    b = torch.zeros(10, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, train_y) + 1e-3 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((xt @ w + b).argmax(-1) == test_y).float().mean())


def measure(system: RecursiveMAS, train: list[dict], test: list[dict], steps: int) -> dict:
    agent = system.agents["planner"]
    train_t, test_t = thoughts(system, train, steps), thoughts(system, test, steps)
    top1 = [[toks[0] for toks in agent.nearest_tokens(t, 1)] for t in test_t]
    hits = []
    for row, t in zip(test, test_t, strict=True):
        lens = [list(toks) for toks in agent.nearest_tokens(t, LENS_TOP_K)]
        trace = [StageTrace("planner", 1, "latent", steps, 0, 0, 0, 0.0, False, {"planner": lens})]
        hits.append(lens_recovery(system, row["answer"], trace)["lens:planner"])
    pairs = [
        (i, j)
        for i in range(len(test))
        for j in range(i + 1, len(test))
        if test[i]["answer"] != test[j]["answer"]
    ]
    differ = sum(sum(a != b for a, b in zip(top1[i], top1[j], strict=True)) for i, j in pairs) / (
        len(pairs) * steps
    )
    tens = lambda rows: torch.tensor([int(r["answer"][0]) for r in rows])  # noqa: E731
    return {
        "lens_hit": sum(hits) / len(hits),
        "distinct_lens_sequences": len({"".join(x) for x in top1}),
        "thoughts_differing_between_facts": differ,
        "probe_tens_digit_accuracy": probe_accuracy(
            train_t.flatten(1), tens(train), test_t.flatten(1), tens(test)
        ),
        "example_lens": "".join(top1[0]),
        "example_fact": test[0]["answer"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="smollm2-pair")
    parser.add_argument("--links", default=None, help="a link checkpoint instead of the shipped links")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--train", type=int, default=160)
    parser.add_argument("--test", type=int, default=64)
    args = parser.parse_args()
    train, test = relay_rows(args.train, seed=900, level=1), relay_rows(args.test, seed=0, level=1)
    trained = build_preset(args.preset, init="training-free" if args.links else None, rounds=1)
    if args.links:
        load_links(trained, args.links)
    free = RecursiveMAS(list(trained.agents.values()), trained.config).init_links("training-free")
    record = {
        "command": "python benchmarks/faithfulness.py "
        + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v is not None),
        "trained": measure(trained, train, test, args.steps),
        "training-free": measure(free, train, test, args.steps),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"faithfulness-{args.preset}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
