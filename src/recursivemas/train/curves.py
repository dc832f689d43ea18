"""Training curves from ``train_log.jsonl``: training loss (raw and smoothed) and validation loss."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def iter_log(path: Path) -> Iterator[dict]:
    """The records of a ``train_log.jsonl`` file, in order."""
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` values."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_curves(log: Path, png: Path, title: str) -> None:
    """Write a PNG of the training loss and validation loss against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = list(iter_log(log)) if log.is_file() else []
    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    val = [(r["step"], r["validation_loss"]) for r in records if r["kind"] == "validation"]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    if train:
        steps, losses = zip(*train, strict=True)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, label="train (per step)")
        ax.plot(
            steps, smooth(list(losses), max(1, len(losses) // 20)), color="tab:blue", label="train (smoothed)"
        )
    if val:
        steps, losses = zip(*val, strict=True)
        ax.plot(steps, losses, "o-", color="tab:orange", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
