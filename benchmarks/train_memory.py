"""Peak memory of links-only training vs ``--trainable full`` (Full-SFT) on the same agents, batch and
sequence lengths (SPEC §8: 15.29 GB vs 41.40 GB per agent in the paper, ratio 0.37; our goal <= 0.3).

Each run is a fresh ``recursivemas train`` process of a few steps; the trainer reports the peak
(the CUDA allocator's peak on GPU, the kernel's peak resident set size on CPU) over the training loop,
model weights included. The inner stage runs without precomputed hidden states here, so links-only and
full do exactly the same forward passes.

    python benchmarks/train_memory.py [--steps 2] [--batch-size 2] [--stages outer,inner]

Writes benchmarks/results/train_memory.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

RESULTS = Path(__file__).parent / "results"
CONFIGS = Path(__file__).parent.parent / "configs"


def run(stage: str, trainable: str, steps: int, batch_size: int, workdir: Path) -> dict:
    raw = yaml.safe_load((CONFIGS / f"default-{stage}.yaml").read_text())
    raw["system"].pop("links", None)  # self-contained: start from training-free links
    raw["data"]["validation"] = 0
    raw["optim"].update(max_steps=steps, batch_size=batch_size, warmup_steps=1)
    raw.setdefault("objective", {}).update(precompute=False, gradient_checkpointing=True)
    if stage == "inner":
        raw["objective"].pop("gradient_checkpointing")
    out = workdir / f"{stage}-{trainable}"
    raw["run"] = {"output": str(out), "checkpoint_every": 10_000}
    config = workdir / f"{stage}-{trainable}.yaml"
    config.write_text(yaml.safe_dump(raw))
    subprocess.run(
        [sys.executable, "-m", "recursivemas", "train", "-c", str(config), "--trainable", trainable],
        check=True,
    )
    report = json.loads((out / "report.json").read_text())
    return {k: report[k] for k in ("peak_memory_bytes", "memory_kind", "trainable_parameters", "seconds")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--stages", default="outer,inner")
    args = parser.parse_args()
    record: dict = {"steps": args.steps, "batch_size": args.batch_size, "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages.split(","):
            runs = {t: run(stage, t, args.steps, args.batch_size, Path(tmp)) for t in ("links", "full")}
            runs["ratio"] = runs["links"]["peak_memory_bytes"] / runs["full"]["peak_memory_bytes"]
            record["results"][stage] = runs
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_memory.json").write_text(json.dumps(record, indent=2) + "\n")
    print("| stage | links-only peak | full peak | ratio | trainable (links / full) |")
    print("|---|---|---|---|---|")
    for stage, r in record["results"].items():
        print(
            f"| {stage} | {r['links']['peak_memory_bytes'] / 2**30:.2f} GiB | "
            f"{r['full']['peak_memory_bytes'] / 2**30:.2f} GiB | {r['ratio']:.2f} | "
            f"{r['links']['trainable_parameters']:,} / {r['full']['trainable_parameters']:,} |"
        )


if __name__ == "__main__":
    main()
