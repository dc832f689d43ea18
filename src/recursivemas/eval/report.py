"""Evaluation outputs: ``summary.json``, ``report.md``, ``predictions.jsonl`` and two PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from recursivemas.eval.harness import Prediction
from recursivemas.fileio import atomic_write


def write_outputs(
    out: Path, task: str, summary: dict, settings: dict, predictions: list[Prediction], command: str
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    document = {"task": task, "modes": summary, "settings": settings}
    atomic_write(out / "summary.json", lambda p: p.write_text(json.dumps(document, indent=2) + "\n"))
    lines = "".join(json.dumps(p.to_dict()) + "\n" for p in predictions)
    atomic_write(out / "predictions.jsonl", lambda p: p.write_text(lines))
    atomic_write(out / "report.md", lambda p: p.write_text(render_report(task, summary, settings, command)))
    plot(summary, task, out)


def render_report(task: str, summary: dict, settings: dict, command: str) -> str:
    rows = [
        "| mode | accuracy | 95% interval | distinct answers | n | decoded tokens / q | latent steps / q "
        "| seconds | peak memory (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, m in summary.items():
        low, high = m["accuracy_ci95"]
        rows.append(
            f"| {mode} | {100 * m['accuracy']:.1f}% ± {100 * m['accuracy_std']:.1f} | "
            f"{100 * low:.1f}-{100 * high:.1f}% | {m['distinct_answers']} | {m['n']} | "
            f"{m['decoded_tokens_mean']:.1f} | {m['latent_steps_mean']:.1f} | {m['seconds_total']:.1f} | "
            f"{m['peak_memory_bytes'] / 2**20:.0f} |"
        )
    rows += _diagnostics_table(summary)
    scoring = "lenient (release-style rules)" if settings["lenient"] else "strict"
    notes = [
        f"Scoring: {scoring}. Accuracy is the mean over seeds {settings['seeds']} (± sample std); with "
        f"temperature {settings['temperature']} "
        + (
            "every seed decodes greedily, so the std is 0."
            if settings["temperature"] == 0
            else "each seed samples."
        ),
        "Seconds exclude model loading; peak memory is the resident set size on CPU (the whole process, "
        "models included) or the CUDA allocator peak.",
    ]
    if settings.get("latent_steps_sweep"):
        sweep = settings["latent_steps_sweep"]
        notes.append(
            f"Latent steps were chosen on a validation split of {settings['val_size']} questions "
            f"(accuracy by m: {sweep}); the test split was scored once with m = {settings['latent_steps']}."
        )
    settings_lines = [f"- {k}: {v}" for k, v in settings.items()]
    return "\n".join(
        [
            f"# Evaluation: {task}",
            "",
            *rows,
            "",
            *notes,
            "",
            "## Settings",
            "",
            *settings_lines,
            "",
            "## Command",
            "",
            "```",
            command,
            "```",
            "",
        ]
    )


def plot(summary: dict, task: str, out: Path) -> None:
    modes = list(summary)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(
        modes,
        [100 * summary[m]["accuracy"] for m in modes],
        yerr=[100 * summary[m]["accuracy_std"] for m in modes],
        capsize=4,
        color="#4c72b0",
    )
    ax.set(ylabel="accuracy (%)", title=f"{task}: accuracy by mode", ylim=(0, 100))
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.bar(modes, [summary[m]["decoded_tokens_mean"] for m in modes], color="#dd8452")
    ax1.set(ylabel="decoded tokens / question", title="tokens")
    ax2.bar(modes, [summary[m]["seconds_total"] for m in modes], color="#55a868")
    ax2.set(ylabel="seconds (all seeds)", title="wall time")
    fig.suptitle(task)
    fig.tight_layout()
    fig.savefig(out / "cost.png", dpi=110)
    plt.close(fig)


def _diagnostics_table(summary: dict) -> list[str]:
    """A table of the task's per-prediction diagnostics (e.g. relay lens recovery per hop), if any."""
    keys = sorted({k for m in summary.values() for k in m.get("diagnostics", {})})
    if not keys:
        return []
    lines = ["", "| mode | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for mode, m in summary.items():
        if m.get("diagnostics"):
            cells = " | ".join(f"{100 * m['diagnostics'].get(k, 0.0):.0f}%" for k in keys)
            lines.append(f"| {mode} | {cells} |")
    return lines
