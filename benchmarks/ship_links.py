"""Copy a preset's trained links into the package (bfloat16) with a model card.

Run after the preset's training stages and its relay evaluation, e.g. for the default preset:

    recursivemas train -c configs/default-inner.yaml
    recursivemas train -c configs/default-align.yaml
    recursivemas train -c configs/default-outer.yaml
    python benchmarks/ship_links.py --preset smollm2-gemma3 --stages default-inner default-align default-outer

and for the pair preset ``--preset smollm2-pair --stages pair-inner pair-outer pair-ladder``. Each stage is
a config in ``configs/`` whose run directory (``run.output``) holds ``final/``; the last stage's links are
shipped. A stage whose run directory is gone (an earlier session's) keeps its section of the card already
shipped. Relay and task-ladder summaries under ``benchmarks/results/{relay,ladder}/<preset>/`` go into the
card. Writes ``src/recursivemas/weights/<preset>/`` (link_config.json, link_model.safetensors, README.md).

``--tables-only`` rewrites only the card's evaluation tables of the links already shipped (after a new
``benchmarks/relay.sh`` or ``benchmarks/ladder.sh`` run), weights untouched.
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


TABLES_START = "### Relay, held-out rows"
LADDER_START = "### Task ladder, held-out questions"


def shipped_section(preset: str, stage: str) -> list[str]:
    """The ``### <stage>`` section of the shipped card, for a stage whose run directory is gone."""
    card = (WEIGHTS_DIR / preset / "README.md").read_text().splitlines()
    head = f"### {stage}"
    if head not in card:
        raise SystemExit(f"no run directory and no shipped card section for stage {stage!r}: train it first")
    start = card.index(head)
    end = next((i for i in range(start + 1, len(card)) if card[i].startswith("### ")), len(card))
    return [*card[start:end]]


def stage_summary(config: Path, preset: str) -> list[str]:
    raw = yaml.safe_load(config.read_text())
    run = ROOT / raw["run"]["output"]
    if not (run / "report.json").is_file():
        return shipped_section(preset, config.stem)
    report = json.loads((run / "report.json").read_text())
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines() if x]
    val = [(r["step"], r["validation_loss"]) for r in log if r["kind"] == "validation"]
    sources = ", ".join(
        (f"`{s['path']}`" if s["kind"] in ("file", "hub") else f"{s.get('name') or s['kind']}")
        + (f" level {s.get('level', 1)}" if s["kind"] == "relay" else "")
        + (f" ({s['n']} rows)" if s.get("n") else "")
        + (f" x{s['weight']}" if s.get("weight", 1) > 1 else "")
        + (f" (target {s['answer_format']!r})" if s.get("answer_format") else "")
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
        f"(seed {raw['data']['seed']})"
        + "".join(
            f"; the {h['limit']} test questions of `{h['task']}` held out of training"
            for h in raw["data"].get("holdout", [])
        )
        + ".",
        f"- Steps: {report['steps']} x batch {raw['optim']['batch_size']}, lr {raw['optim']['lr']}, "
        f"{report['seconds'] / 60:.1f} min on {report['processes']} CPU process(es) (2 cores), "
        f"peak memory {report['peak_memory_bytes'] / 2**30:.2f} GiB.",
        f"- Trainable parameters: {report['trainable_parameters']:,}.",
        f"- Validation loss ({LOSS_NAMES.get(kind, 'answer cross-entropy')}): {val[0][1]:.4f} at step "
        f"{val[0][0]} -> {val[-1][1]:.4f} at step {val[-1][0]}.",
        "",
    ]


STARTS = {"relay": TABLES_START, "ladder": LADDER_START}  # kind -> its table's title; made by <kind>.sh


def kind_tables(preset: str) -> dict[str, list[str]]:
    """Kind (relay, ladder) -> its table's lines (title, blank, header, rows, blank), one row per (task,
    mode), from the float32 runs' ``results/<kind>/<preset>/<task>/summary.json``; kinds without results
    are left out."""
    tables = {
        kind: _table(preset, kind, f"{start}, greedy, strict scoring (`benchmarks/{kind}.sh`)")
        for kind, start in STARTS.items()
    }
    return {kind: lines for kind, lines in tables.items() if lines}


def eval_tables(preset: str) -> list[str]:
    """Every kind's table, one after the other (see ``kind_tables``)."""
    return [line for lines in kind_tables(preset).values() for line in lines]


def _table(preset: str, kind: str, title: str) -> list[str]:
    summaries = sorted((RESULTS / kind / preset).glob("*/summary.json"))
    if not summaries:
        return []
    lines = [
        title,
        "",
        "| task | mode | accuracy | 95% interval | distinct answers | n | decoded tokens / q |",
        "|---|---|---|---|---|---|---|",
    ]
    for path in summaries:
        doc = json.loads(path.read_text())
        if doc["settings"].get("dtype", "float32") != "float32":
            continue  # the card describes the links as shipped, in float32 (e.g. sum-1d-int8 is not)
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
    parser.add_argument("--tables-only", action="store_true", help="refresh the shipped card's tables only")
    args = parser.parse_args()
    preset = get_preset(args.preset)
    if args.tables_only:
        refresh_tables(preset.name)
        return
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
        *[line for config in configs for line in stage_summary(config, preset.name)],
        *([args.note, ""] if args.note else []),
        *eval_tables(preset.name),
    ]
    target = WEIGHTS_DIR / preset.name
    system.save_pretrained(
        str(target),
        " && ".join(f"recursivemas train -c configs/{c.name}" for c in configs),
        dtype=torch.bfloat16,
        card="\n".join(card),
    )
    print(f"wrote {target}")


def refresh_tables(preset: str) -> None:
    """Replace each evaluation table of the shipped card (its title line, then the table) by a fresh one,
    keeping every other line, hand-written paragraphs after a table included; a kind the card has no table
    for yet is added at the end."""
    path = WEIGHTS_DIR / preset / "README.md"
    lines, fresh = path.read_text().splitlines(), kind_tables(preset)
    out: list[str] = []
    i = 0
    while i < len(lines):
        kind = next((k for k, start in STARTS.items() if lines[i].startswith(start)), None)
        if kind is None:
            out.append(lines[i])
            i += 1
            continue
        i += 1  # the title
        while i < len(lines) and (not lines[i].strip() or lines[i].startswith("|")):
            i += 1  # the blank lines and table rows below it
        out.extend(fresh.pop(kind, []))
    for table in fresh.values():
        out.extend(["", *table])
    path.write_text("\n".join(out).rstrip() + "\n")
    print(f"refreshed the tables of {path}")


if __name__ == "__main__":
    main()
