"""Resumable training state: periodic checkpoints written atomically, and finding the last good one.

Layout under ``<output>/checkpoints``::

    step-000050/                  a complete checkpoint
        trainable.safetensors     every trainable tensor, by name
        optimizer.pt              AdamW state (tensors and numbers only; loaded with weights_only)
        state.json                step, scheduler state, config, sha256 of both files
    latest                        the name of the newest complete checkpoint

A checkpoint is written into a hidden ``.tmp-*`` directory, every file fsynced, then renamed into
place, and only then is ``latest`` replaced (atomically). A kill at any moment leaves ``latest``
naming a complete checkpoint (or no ``latest`` at all); stray ``.tmp-*`` directories are removed at
the next start.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from recursivemas.errors import CheckpointError
from recursivemas.fileio import atomic_write, sha256_file

TENSORS = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"
LATEST = "latest"


@dataclass
class TrainState:
    """What a checkpoint restores: the step reached, tensors, optimizer and scheduler states."""

    step: int
    tensors: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    config: dict


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with path.open("rb+") as f:
        os.fsync(f.fileno())


def save_state(root: Path, state: TrainState, keep: int) -> Path:
    """Write ``root/step-NNNNNN`` atomically, point ``latest`` at it, keep the newest ``keep``."""
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state.step:06d}"
    tmp = root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.tensors.items()}
    safetensors.torch.save_file(tensors, tmp / TENSORS, metadata={"format": "pt"})
    torch.save(state.optimizer, tmp / OPTIMIZER)
    record = {
        "step": state.step,
        "scheduler": state.scheduler,
        "config": state.config,
        "sha256": {TENSORS: sha256_file(tmp / TENSORS), OPTIMIZER: sha256_file(tmp / OPTIMIZER)},
    }
    (tmp / STATE).write_text(json.dumps(record, indent=2) + "\n")
    for file in (TENSORS, OPTIMIZER, STATE):
        _fsync_file(tmp / file)
    _fsync_dir(tmp)
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write(root / LATEST, lambda p: p.write_text(name + "\n"))
    others = sorted((_step_of(p), p) for p in root.glob("step-*") if p.is_dir() and p != final)
    orphans = [p for step, p in others if step > state.step]  # left by a killed run with other settings
    older = [p for step, p in others if step < state.step]
    for old in orphans + older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _step_of(path: Path) -> int:
    try:
        return int(path.name.split("-", 1)[1])
    except ValueError:
        return -1


def clean_partial(root: Path) -> None:
    """Remove checkpoint directories left half-written by a killed run."""
    for tmp in root.glob(".tmp-step-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    """The directory ``latest`` names, or ``None`` if there is no checkpoint yet."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(
            f"{pointer} names {path.name}, which does not exist; delete {pointer} to restart"
        )
    return path


def load_state(path: Path) -> TrainState:
    """Read and verify one checkpoint directory."""
    try:
        record = json.loads((path / STATE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path / STATE} cannot be read ({err})") from None
    for file, digest in record.get("sha256", {}).items():
        if not (path / file).is_file() or sha256_file(path / file) != digest:
            raise CheckpointError(f"{path / file} is missing or does not match {STATE}: corrupt checkpoint")
    tensors = safetensors.torch.load_file(path / TENSORS)
    optimizer = torch.load(path / OPTIMIZER, map_location="cpu", weights_only=True)
    return TrainState(record["step"], tensors, optimizer, record["scheduler"], record["config"])
