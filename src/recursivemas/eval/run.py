"""``recursivemas eval``: one task, several modes, one report; shards across processes with accelerate.

Launched plainly it runs in one process. Under ``accelerate launch --multi_gpu --num_processes N`` (or
``torchrun --nproc_per_node N``; both also work on CPU, over gloo) every process
loads the system, answers every N-th question, and writes its scored predictions to
``DIR/.shards/``; the main process then merges them, in the same order a single process would produce,
into one report. Apart from timings and memory, the merged report equals a single-process run.

The report's files are written into a hidden folder inside ``DIR`` and moved into place at the end; a
write that fails (a full disk) is a ``ConfigError`` that leaves ``DIR`` as it was: no ``.shards``, no
half-written report.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from accelerate import PartialState
from tqdm import tqdm

from recursivemas.budget import MAX_LENGTH, check_context_budget
from recursivemas.errors import ConfigError
from recursivemas.eval.harness import (
    EVAL_MODES,
    EvalSettings,
    ModeRun,
    Prediction,
    choose_latent_steps,
    run_mode,
    summarize,
)
from recursivemas.eval.report import write_outputs
from recursivemas.eval.tasks import Task, load_task
from recursivemas.fileio import atomic_write, check_writable_dir, write_failure
from recursivemas.loading import load_system, resolve_dtype
from recursivemas.models import dtype_name


@dataclass
class EvalOptions:
    """Parsed ``recursivemas eval`` options."""

    task: str
    preset: str | None
    checkpoint: str | None
    modes: str
    limit: int | None
    seeds: str
    rounds: int | None
    latent_steps: int | None
    sweep_latent_steps: str | None
    val_size: int
    data_seed: int
    batch_size: int
    max_new_tokens: int
    temperature: float
    top_p: float
    output: str
    lenient: bool
    device: str
    dtype: str
    relay_sender: str | None = None
    merge: bool = False
    allow_hub: bool = False
    compile: bool = False


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values:
        raise ConfigError(f"{flag} needs at least one value")
    return values


def settings_from(opts: EvalOptions) -> EvalSettings:
    modes = tuple(m.strip() for m in opts.modes.split(",") if m.strip())
    return EvalSettings(
        modes,
        _int_list(opts.seeds, "--seeds"),
        opts.rounds,
        opts.latent_steps,
        opts.batch_size,
        opts.max_new_tokens,
        opts.temperature,
        opts.top_p,
        opts.lenient,
    )


def evaluate_command(opts: EvalOptions) -> int:
    """Run the evaluation and write the report (on the main process)."""
    settings = settings_from(opts)
    sweep = _int_list(opts.sweep_latent_steps, "--sweep-latent-steps") if opts.sweep_latent_steps else ()
    if sweep and opts.latent_steps is not None:
        raise ConfigError("give either --latent-steps or --sweep-latent-steps, not both")
    if any(not 1 <= m <= MAX_LENGTH for m in sweep):
        raise ConfigError(f"--sweep-latent-steps values must be between 1 and {MAX_LENGTH}, got {sweep}")
    out = Path(opts.output)
    check_writable_dir(out, "--output")
    state = PartialState(cpu=opts.device == "cpu")  # gloo on CPU, NCCL on GPUs
    device = str(state.device) if opts.device == "cuda" and state.num_processes > 1 else opts.device
    dtype = resolve_dtype(opts.dtype, device)  # the report names the dtype that ran, never "auto"
    system = load_system(
        opts.preset, opts.checkpoint, dtype, device, allow_hub=opts.allow_hub, compile=opts.compile
    )
    sender = opts.relay_sender or system.config.order[0]
    if sender not in system.agents:
        raise ConfigError(
            f"--relay-sender {sender!r} is not an agent of this system; "
            f"choose one of {', '.join(system.agents)}"
        )
    # checked before any mode runs; a sweep runs latent mode whatever --modes says
    budget_modes = {"latent" if m == "latent-free" else m for m in settings.modes}
    steps, flag = opts.latent_steps, "--latent-steps"
    if sweep:
        budget_modes.add("latent")
        steps, flag = max(sweep), "--sweep-latent-steps values"
    check_context_budget(system, sorted(budget_modes), steps, opts.max_new_tokens, flag)
    task = load_task(opts.task, opts.limit, opts.data_seed, opts.val_size, relay_sender=sender)
    report_settings = {
        **asdict(settings),
        "task": opts.task,
        "limit": opts.limit,
        "data_seed": opts.data_seed,
        "val_size": opts.val_size,
        "preset": opts.preset,
        "checkpoint": opts.checkpoint,
        "rounds": settings.rounds or system.config.rounds,
        "latent_steps": settings.latent_steps or system.config.latent_steps,
        "processes": state.num_processes,
        "device": opts.device,
        "dtype": dtype,
        # int8/int4 agents are bfloat16 or float32 by the CPU (quantize.low_bit_agent_dtype): numerics differ
        "agent_dtype": dtype_name(next(iter(system.agents.values())).dtype),
        "compile": opts.compile,
    }
    if sweep:
        best, accuracy = choose_latent_steps(system, task, list(sweep), settings)
        settings = EvalSettings(**{**asdict(settings), "latent_steps": best})
        report_settings.update(latent_steps=best, latent_steps_sweep=accuracy)
    earlier = _earlier_report(out, report_settings) if opts.merge else None
    shard = task.examples[state.process_index :: state.num_processes]
    runs = {}
    with tqdm(
        total=len(shard) * len(settings.seeds) * len(settings.modes),
        desc=f"eval {task.name}",
        unit="q",
        file=sys.stderr,
        disable=not state.is_local_main_process,
    ) as bar:
        for mode in settings.modes:
            runs[mode] = run_mode(system, task, shard, mode, settings, on_batch=bar.update)
    shards = out / ".shards"
    try:
        _write_shard(shards / f"rank-{state.process_index}.json", runs)
        state.wait_for_everyone()
        if state.is_main_process:
            _report(out, shards, task, settings, report_settings, earlier, state.num_processes)
    except OSError as err:
        raise ConfigError(
            f"cannot write the results to --output {out} ({write_failure(err, out)}); nothing was written "
            f"there: free some space (or choose another --output) and run again"
        ) from None
    finally:
        if state.is_main_process:
            shutil.rmtree(shards, ignore_errors=True)
    state.wait_for_everyone()
    return 0


def _report(
    out: Path,
    shards: Path,
    task: Task,
    settings: EvalSettings,
    report_settings: dict,
    earlier: tuple[dict, list[Prediction]] | None,
    processes: int,
) -> None:
    """Merge every process's shard (and, for ``--merge``, the earlier report), write the report, print
    the summary (main process)."""
    merged = {
        mode: [_read_shard(shards / f"rank-{r}.json", mode) for r in range(processes)]
        for mode in settings.modes
    }
    command = "recursivemas " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if earlier is not None:
        merged, command = _merge_earlier(out, earlier, merged, command)
        report_settings["modes"] = list(merged)
    modes, order = list(merged), {ex.id: i for i, ex in enumerate(task.examples)}
    predictions = sorted(
        (p for parts in merged.values() for part in parts for p in part.predictions),
        key=lambda p: (modes.index(p.mode), p.seed, order[p.id]),
    )
    summary = summarize(merged, settings.seeds)
    _publish(out, lambda to: write_outputs(to, task.name, summary, report_settings, predictions, command))
    for mode, m in summary.items():
        print(
            f"{mode:12} accuracy {100 * m['accuracy']:5.1f}% ± {100 * m['accuracy_std']:.1f}  "
            f"distinct answers {m['distinct_answers']:4}  "
            f"tokens/q {m['decoded_tokens_mean']:7.1f}  {m['seconds_total']:7.1f}s"
        )
    print(f"report: {out / 'report.md'}")


def _publish(out: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(staging)`` on a hidden folder inside ``out``, then move its files into ``out``; the
    folder is removed whatever happens, so a failed write leaves ``out`` unchanged."""
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".report-"))
    try:
        write(staging)
        for file in sorted(staging.iterdir()):
            os.replace(file, out / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# Settings that may differ between the runs a merged report combines (the rest must be equal).
_MERGE_FREE = frozenset({"modes", "processes", "batch_size", "latent_steps_sweep"})


def _earlier_report(out: Path, settings: dict) -> tuple[dict, list[Prediction]] | None:
    """The report already in ``out`` (summary, predictions) for ``--merge``, or None if there is none.

    It must come from the same task and settings; batch size and process count aside (answers do not
    depend on them). Checked before any question runs.
    """
    summary_path, predictions_path = out / "summary.json", out / "predictions.jsonl"
    if not summary_path.is_file() or not predictions_path.is_file():
        return None
    try:
        earlier = json.loads(summary_path.read_text())
        rows = [json.loads(line) for line in predictions_path.read_text().splitlines() if line]
        predictions = [Prediction(**row) for row in rows]
        old = {"compile": False, **earlier["settings"]}  # reports from before the key ran eager steps
    except (json.JSONDecodeError, TypeError, KeyError, OSError) as err:
        raise ConfigError(f"--merge: cannot read the report in {out} ({err}); use another --output") from None
    new = json.loads(json.dumps(settings))  # tuples as lists, as the file has them
    if "agent_dtype" not in old:  # reports from before the key: their agents' dtype was not recorded
        new.pop("agent_dtype", None)
    differ = sorted(k for k in {*new, *old} - _MERGE_FREE if new.get(k) != old.get(k))
    if differ:
        raise ConfigError(
            f"--merge: the report in {out} was made with other settings ({', '.join(differ)}); "
            "rerun with the same settings or use another --output"
        )
    return earlier, predictions


def _merge_earlier(
    out: Path, earlier: tuple[dict, list[Prediction]], runs: dict[str, list[ModeRun]], command: str
) -> tuple[dict[str, list[ModeRun]], str]:
    """``runs`` plus the earlier report's modes that this run did not rerun, ordered as ``EVAL_MODES``,
    and a command block naming both runs."""
    summary, old_predictions = earlier
    kept = [mode for mode in summary["modes"] if mode not in runs]
    for mode in kept:
        old = summary["modes"][mode]
        mode_predictions = [p for p in old_predictions if p.mode == mode]
        runs = {**runs, mode: [ModeRun(mode_predictions, old["seconds_total"], old["peak_memory_bytes"])]}
    merged = {mode: runs[mode] for mode in EVAL_MODES if mode in runs}
    return merged, f"{command}\n# merged with the modes {', '.join(kept)} of: {_earlier_command(out)}"


def _earlier_command(out: Path) -> str:
    """The command block of an earlier ``report.md``, or a placeholder."""
    report = out / "report.md"
    lines = report.read_text().splitlines() if report.is_file() else []
    if "## Command" not in lines:
        return "(unrecorded)"
    block = lines[lines.index("## Command") + 1 :]
    fences = [i for i, line in enumerate(block) if line.startswith("```")]
    return "\n".join(block[fences[0] + 1 : fences[1]]) if len(fences) > 1 else "(unrecorded)"


def _write_shard(path: Path, runs: dict[str, ModeRun]) -> None:
    """This process's scored predictions, written atomically into ``DIR/.shards``."""
    data = {
        mode: {
            "seconds": run.seconds,
            "peak_memory_bytes": run.peak_memory_bytes,
            "predictions": [p.to_dict() for p in run.predictions],
        }
        for mode, run in runs.items()
    }
    path.parent.mkdir(exist_ok=True)
    text = json.dumps(data)
    atomic_write(path, lambda p: p.write_text(text))


def _read_shard(path: Path, mode: str) -> ModeRun:
    data = json.loads(path.read_text())[mode]
    return ModeRun([Prediction(**p) for p in data["predictions"]], data["seconds"], data["peak_memory_bytes"])
