"""``recursivemas train`` and ``recursivemas gen-data``."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from recursivemas.errors import ConfigError
from recursivemas.fileio import check_writable_dir, write_failure
from recursivemas.train.config import DataSection, SourceSpec, TrainConfig
from recursivemas.train.data import build_splits, write_jsonl
from recursivemas.train.trainer import Trainer


def train_command(
    config: str,
    argv: Sequence[str],
    stage: str | None = None,
    trainable: str | None = None,
    max_steps: int | None = None,
    resume: bool = False,
    output: str | None = None,
) -> int:
    """Train one stage from a YAML config; returns 0 when the run's outputs are written.

    Fails with one line (a ``RecursiveMASError``, exit 2) before loading any model when the output folder
    cannot be written or another run holds it. ``--resume`` of a finished run is such an error too
    (exit 2: nothing left to do, every output kept as it was): raise ``--max-steps`` to train further.
    ``--resume`` after a failed final save (e.g. a full disk) writes the missing outputs and exits 0.
    """
    cfg = TrainConfig.load(config, stage=stage, trainable=trainable, max_steps=max_steps, output=output)
    trainer = Trainer(cfg, command="recursivemas " + shlex.join(argv))
    report = trainer.run(resume=resume)
    if trainer.main:
        val = report.final_validation_loss
        print(
            f"recursivemas: trained {report.stage} ({report.trainable}) for {report.steps} steps in "
            f"{report.seconds:.1f}s on {report.processes} process(es); "
            f"{report.trainable_parameters:,} trainable / {report.frozen_parameters:,} frozen parameters; "
            f"peak memory {report.peak_memory_bytes / 2**20:.0f} MiB ({report.memory_kind}); "
            + (
                f"final loss {report.final_train_loss:.4f}"
                if report.final_train_loss is not None
                else "final loss not in train_log.jsonl"
            )
            + (f", validation {val:.4f}" if val is not None else "")
            + f"; outputs in {report.output}",
            file=sys.stderr,
        )
    return 0


def parse_source(spec: str) -> SourceSpec:
    """``reasoning-gym:NAME:N``, ``relay:LEVEL:N`` or ``file:PATH`` -> ``SourceSpec``."""
    kind, _, rest = spec.partition(":")
    try:
        if kind == "reasoning-gym":
            name, n = rest.rsplit(":", 1)
            return SourceSpec(kind="reasoning-gym", name=name, n=int(n))
        if kind == "relay":
            level, n = rest.split(":")
            return SourceSpec(kind="relay", level=int(level), n=int(n))
        if kind == "file":
            return SourceSpec(kind="file", path=rest)
    except ValueError as err:
        raise ConfigError(
            f"bad --source {spec!r} ({err}); use reasoning-gym:NAME:N, relay:LEVEL:N or file:PATH"
        ) from None
    raise ConfigError(f"bad --source {spec!r}; use reasoning-gym:NAME:N, relay:LEVEL:N or file:PATH")


def gen_data_command(source: list[str], validation: int, seed: int, output: str) -> int:
    """Write ``train.jsonl`` and ``validation.jsonl`` to ``output``.

    ``ConfigError`` before generating anything when ``output`` cannot be written, and when a write fails
    (a full disk): each file is written whole or not at all.
    """
    data = DataSection(sources=[parse_source(s) for s in source], validation=validation, seed=seed)
    out = Path(output)
    check_writable_dir(out, "--output")
    splits = build_splits(data)
    try:
        write_jsonl(splits.train, out / "train.jsonl")
        write_jsonl(splits.validation, out / "validation.jsonl")
    except OSError as err:
        raise ConfigError(
            f"cannot write the rows to --output {out} ({write_failure(err, out)}); free some space or "
            f"choose another folder"
        ) from None
    print(
        f"recursivemas: wrote {len(splits.train)} training and {len(splits.validation)} validation rows "
        f"(disjoint questions) to {out}",
        file=sys.stderr,
    )
    return 0
