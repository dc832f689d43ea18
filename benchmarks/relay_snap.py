"""Relay diagnostic: the answerer reads the message snapped onto its own token embeddings.

Every vector the answerer's incoming outer link delivers (e.g. ``critic -> solver`` in the default preset)
is replaced by the answerer's input embedding of its nearest token in cosine (the lens token), rescaled to
the vector's norm, and mixed with the link's output:

    y' = (1 - a)·y + a·e(argmax_v cos(y, e_v))·|y| / |e(...)|

With ``a = 1`` the answerer reads the sender's lens as if it had been written as text: the score then
shows what the answerer makes of exact pieces (does it merge a name split into two tokens, does it keep the
answer format), separately from how precise the trained link's vectors are. Latent mode, one round,
m = 16, greedy, strict scoring (and the lenient "fact mentioned" count).

    python benchmarks/relay_snap.py [--preset smollm2-gemma3] [--level 2] [--alpha 1.0] [--limit 100]

Writes benchmarks/results/relay_snap.json (one row per run appended) and prints the row.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from recursivemas import build_preset
from recursivemas.eval.harness import EvalSettings, run_mode
from recursivemas.eval.tasks import load_task
from recursivemas.links import OuterLink

RESULTS = Path(__file__).parent / "results"


class SnappedLink(OuterLink):
    """An outer link whose outputs are pulled onto the receiver's token embeddings (see module doc)."""

    def __init__(self, link: OuterLink, table: torch.Tensor, alpha: float) -> None:
        super().__init__(link.config)
        self.load_state_dict(link.state_dict())
        self.table = table  # (V, d_j) the receiver's input embeddings as its model scales them
        self.unit = torch.nn.functional.normalize(table, dim=-1)  # (V, d_j)
        self.alpha = alpha

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = super().forward(h)  # (..., m, d_j)
        nearest = self.table[(torch.nn.functional.normalize(y, dim=-1) @ self.unit.T).argmax(-1)]
        nearest = nearest * (y.norm(dim=-1, keepdim=True) / nearest.norm(dim=-1, keepdim=True))
        return (1 - self.alpha) * y + self.alpha * nearest


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="smollm2-gemma3")
    parser.add_argument("--level", type=int, default=2)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    system = build_preset(args.preset, rounds=1)
    answerer = system.agents[system.config.answerer]
    table = answerer.input_embedding_matrix().detach()  # (V, d_j)
    with torch.no_grad():
        for edge in system.config.incoming(system.config.answerer):
            system.set_link(SnappedLink(system.outer(edge), table, args.alpha))
    task = load_task(f"relay:{args.level}", args.limit, relay_sender=system.config.order[0])
    settings = EvalSettings(
        seeds=(0,), rounds=1, latent_steps=16, batch_size=args.batch_size, max_new_tokens=32, temperature=0.0
    )
    run = run_mode(system, task, task.examples, "latent", settings)
    predictions = run.predictions
    lenient = [task.score(e, p.text, lenient=True) for e, p in zip(task.examples, predictions, strict=True)]
    row = {
        "preset": args.preset,
        "level": args.level,
        "alpha": args.alpha,
        "accuracy": sum(p.correct for p in predictions) / len(predictions),
        "mentioned": sum(s.correct for s in lenient) / len(lenient),
        "distinct": len({p.extracted for p in predictions}),
        "examples": [[p.gold, p.text[:60]] for p in predictions[:6]],
    }
    out = RESULTS / "relay_snap.json"
    rows = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps([*rows, row], indent=1, ensure_ascii=False))
    print(json.dumps(row, ensure_ascii=False))


if __name__ == "__main__":
    main()
