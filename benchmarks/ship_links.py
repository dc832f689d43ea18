"""Copy a preset's trained links into the package (bfloat16) with a model card.

Run after the preset's training stages and its relay evaluation, e.g. for the default preset:

    recursivemas train -c configs/default-inner.yaml
    recursivemas train -c configs/default-align.yaml
    recursivemas train -c configs/default-outer.yaml
    python benchmarks/ship_links.py --preset smollm2-gemma3 --stages default-inner default-align default-outer

and for the pair preset ``--preset smollm2-pair --stages pair-inner pair-outer``. Each stage is a config
in ``configs/`` whose run directory (``run.output``) holds ``final/``; the last stage's links are
shipped. Relay evaluation summaries under ``benchmarks/results/relay/<preset>/`` go into the card.
Writes ``src/recursivemas/weights/<preset>/`` (link_config.json, link_model.safetensors, README.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml

from recursivemas import build_preset
from recursivemas.checkpoint import from_pretrained
from recursivemas.presets import WEIGHTS_DIR, get_preset

ROOT = Path(__file__).parent.parent
RESULTS = Path(__file__).parent / "results"
LOSS_NAMES = {"inner": "sum over agents of mean 1 - cos", "align": "token read-out cross-entropy"}


def stage_summary(config: Path) -> list[str]:
    raw = yaml.safe_load(config.read_text())
    run = ROOT / raw["run"]["output"]
    report = json.loads((run / "report.json").read_text())
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines() if x]
    val = [(r["step"], r["validation_loss"]) for r in log if r["kind"] == "validation"]
    sources = ", ".join(
        f"{s.get('name') or s['kind']}"
        + (f" level {s.get('level', 1)}" if s["kind"] == "relay" else "")
        + f" ({s.get('n')} rows)"
        for s in raw["data"]["sources"]
    )
    objective = raw.get("objective", {})
    kind = "inner" if raw["stage"] == "inner" else objective.get("outer", "unrolled")
    what = "teacher-forced cosine" if kind == "inner" else kind
    links = raw["optim"].get("links")
    return [
        f"### {config.stem}",
        "",
        f"- Command: `recursivemas train -c configs/{config.name}`",
        f"- Objective: {raw['stage']} stage, {what}"
        + (f", inner targets {objective['inner_targets']}" if "inner_targets" in objective else "")
        + (f"; links trained: {', '.join(links)}" if links else "; every link of the stage trained")
        + ".",
        f"- Data: {sources}; {raw['data']['validation']} held-out validation rows "
        f"(seed {raw['data']['seed']}).",
        f"- Steps: {report['steps']} x batch {raw['optim']['batch_size']}, lr {raw['optim']['lr']}, "
        f"{report['seconds'] / 60:.1f} min on {report['processes']} CPU process(es) (2 cores), "
        f"peak memory {report['peak_memory_bytes'] / 2**30:.2f} GiB.",
        f"- Trainable parameters: {report['trainable_parameters']:,}.",
        f"- Validation loss ({LOSS_NAMES.get(kind, 'answer cross-entropy')}): {val[0][1]:.4f} at step "
        f"{val[0][0]} -> {val[-1][1]:.4f} at step {val[-1][0]}.",
        "",
    ]


def relay_table(preset: str) -> list[str]:
    """One row per (relay level, mode) from ``results/relay/<preset>/<level>/summary.json``."""
    summaries = sorted((RESULTS / "relay" / preset).glob("*/summary.json"))
    if not summaries:
        return []
    lines = [
        "### Relay, held-out rows, greedy, strict scoring (`benchmarks/relay.sh`)",
        "",
        "| task | mode | accuracy | 95% interval | distinct answers | n | decoded tokens / q |",
        "|---|---|---|---|---|---|---|",
    ]
    for path in summaries:
        doc = json.loads(path.read_text())
        for mode, m in doc["modes"].items():
            low, high = m["accuracy_ci95"]
            lines.append(
                f"| {doc['task']} | {mode} | {100 * m['accuracy']:.1f}% | "
                f"{100 * low:.0f}-{100 * high:.0f}% | "
                f"{m['distinct_answers']} | {m['n']} | {m['decoded_tokens_mean']:.1f} |"
            )
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="smollm2-gemma3")
    parser.add_argument("--stages", nargs="+", default=["default-inner", "default-align", "default-outer"])
    parser.add_argument("--note", default="", help="a paragraph for the card (e.g. how a run was resumed)")
    args = parser.parse_args()
    preset = get_preset(args.preset)
    configs = [ROOT / "configs" / f"{stage}.yaml" for stage in args.stages]
    last_run = ROOT / yaml.safe_load(configs[-1].read_text())["run"]["output"] / "final"
    base = build_preset(args.preset, init="training-free")
    system = from_pretrained(last_run, agents=list(base.agents.values()))
    system.config.rounds, system.config.latent_steps = base.config.rounds, base.config.latent_steps
    card = [
        "## Training (RecursiveMAS, SPEC §6)",
        "",
        "Stages in order, backbones frozen throughout; each stage starts from the previous one's links.",
        "Weights stored in bfloat16; they load into float32.",
        "",
        *[line for config in configs for line in stage_summary(config)],
        *([args.note, ""] if args.note else []),
        *relay_table(preset.name),
    ]
    target = WEIGHTS_DIR / preset.name
    system.save_pretrained(
        str(target),
        " && ".join(f"recursivemas train -c configs/{c.name}" for c in configs),
        dtype=torch.bfloat16,
        card="\n".join(card),
    )
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
