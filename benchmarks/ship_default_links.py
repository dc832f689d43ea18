"""Copy the trained default-preset links into the package (bfloat16) with a model card.

Run after the two training stages (and, for the card's held-out table, benchmarks/trained_links.py):

    recursivemas train -c configs/default-inner.yaml
    recursivemas train -c configs/default-outer.yaml
    python benchmarks/trained_links.py --links runs/default-outer/final
    python benchmarks/ship_default_links.py

Writes src/recursivemas/weights/smollm2-gemma3/ (link_config.json, link_model.safetensors, README.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml

from recursivemas import build_preset
from recursivemas.checkpoint import from_pretrained
from recursivemas.presets import WEIGHTS_DIR

ROOT = Path(__file__).parent.parent
RESULTS = Path(__file__).parent / "results"


def stage_summary(stage: str, run: Path, config: Path) -> list[str]:
    report = json.loads((run / "report.json").read_text())
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines() if x]
    val = [(r["step"], r["validation_loss"]) for r in log if r["kind"] == "validation"]
    raw = yaml.safe_load(config.read_text())
    sources = ", ".join(
        f"{s.get('name') or s['kind']}"
        + (f" level {s.get('level', 1)}" if s["kind"] == "relay" else "")
        + f" ({s.get('n')} rows)"
        for s in raw["data"]["sources"]
    )
    what = "sum over agents of mean 1 - cos" if stage == "inner" else "answer cross-entropy"
    return [
        f"### {stage} stage",
        "",
        f"- Command: `recursivemas train -c {config.relative_to(ROOT)}`",
        f"- Data: {sources}; {raw['data']['validation']} held-out validation rows "
        f"(seed {raw['data']['seed']}).",
        f"- Steps: {report['steps']} x batch {raw['optim']['batch_size']}, lr {raw['optim']['lr']}, "
        f"{report['seconds'] / 60:.1f} min on {report['processes']} CPU process(es) (2 cores), "
        f"peak memory {report['peak_memory_bytes'] / 2**30:.1f} GiB.",
        f"- Trainable parameters: {report['trainable_parameters']:,}.",
        f"- Validation loss ({what}): {val[0][1]:.4f} at step {val[0][0]} -> {val[-1][1]:.4f} at step "
        f"{val[-1][0]}.",
        "",
    ]


def held_out_table() -> list[str]:
    path = RESULTS / "trained_links.json"
    if not path.is_file():
        return []
    record = json.loads(path.read_text())
    lines = [
        "### Held-out validation rows, latent mode, greedy (`benchmarks/trained_links.py`)",
        "",
        "| links | r | m | accuracy | relay | arithmetic | answer CE | relay CE: wrong fact - true fact |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, r in record["results"].items():
        name, rr, mm = key.split(" ")
        by = r["accuracy_by_source"]
        lines.append(
            f"| {name} | {rr[2:]} | {mm[2:]} | {r['accuracy']:.1%} | {by['relay']:.1%} | "
            f"{by['arithmetic']:.1%} | {r['answer_ce']:.3f} | {r['relay_information_nats']:+.3f} |"
        )
    lines += [
        "",
        "The last column is the relay answer's cross-entropy (nats per token) when the planner's private",
        "context holds another row's fact, minus the same with the true fact: only the planner sees the",
        "fact, so a positive gap means the latent messages carry it to the solver.",
    ]
    gaps = [abs(r["relay_information_nats"]) for r in record["results"].values()]
    if max(gaps) < 0.01:
        lines += [
            "",
            f"**Limitation:** every gap is within {max(gaps):.3f} nats of zero, so these links do *not*",
            "carry the relay fact from the planner to the solver. What they learned is the answer format",
            "and some arithmetic (answer CE and accuracy above). With these bundled models the text",
            "hand-off does not carry it either (0% relay accuracy in every mode in",
            "`benchmarks/results/eval/relay`).",
        ]
    inner = record.get("inner_validation_loss")
    if inner:
        lines += [
            "",
            f"Inner-stage validation loss on the same rows: trained {inner['trained']:.3f}, "
            f"training-free {inner['training-free']:.3f}.",
        ]
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--inner", default="runs/default-inner")
    parser.add_argument("--outer", default="runs/default-outer")
    args = parser.parse_args()
    base = build_preset("smollm2-gemma3", init="training-free")
    system = from_pretrained(Path(args.outer) / "final", agents=list(base.agents.values()))
    system.config.rounds, system.config.latent_steps = 3, 16  # the preset's defaults
    card = [
        "## Training (RecursiveMAS, SPEC §6)",
        "",
        "Inner links first (teacher-forced cosine loss, frozen hidden states precomputed), then all outer",
        "links on top of them (paper-faithful unrolled objective: real latent rollouts, answer",
        "cross-entropy of the last round). Backbones frozen throughout. Weights stored in bfloat16;",
        "they load into float32.",
        "",
        *stage_summary("inner", Path(args.inner), ROOT / "configs" / "default-inner.yaml"),
        *stage_summary("outer", Path(args.outer), ROOT / "configs" / "default-outer.yaml"),
        *held_out_table(),
    ]
    target = WEIGHTS_DIR / "smollm2-gemma3"
    system.save_pretrained(
        str(target),
        "recursivemas train -c configs/default-inner.yaml && "
        "recursivemas train -c configs/default-outer.yaml",
        dtype=torch.bfloat16,
        card="\n".join(card),
    )
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
