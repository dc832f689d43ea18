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
the next start. A write that fails (a full disk) removes its ``.tmp-*`` directory and raises
``CheckpointError``; ``latest`` still names the previous checkpoint.

``state.json`` is checked before use: anything but an object with a non-negative integer ``step``,
objects ``scheduler`` and ``config`` and the digests of both files is a ``CheckpointError``.

``OutputLock`` keeps a second training run out of an output folder while one is using it.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import safetensors.torch
import torch

from recursivemas.errors import CheckpointError, ConfigError
from recursivemas.fileio import WRITE_ERRORS, atomic_write, sha256_file, write_failure

TENSORS = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"
LATEST = "latest"
LOCK = "train.lock"
STEP_NAME = re.compile(r"step-\d{6,}")


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
    """Write ``root/step-NNNNNN`` atomically, point ``latest`` at it, keep the newest ``keep``.

    ``CheckpointError`` if the files cannot be written (e.g. the disk is full); the partial directory is
    removed and ``latest`` still names the previous checkpoint.
    """
    name = f"step-{state.step:06d}"
    tmp, final = root / f".tmp-{name}", root / name
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.tensors.items()}
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _write_files(tmp, tensors, state)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(root)
        atomic_write(root / LATEST, lambda p: p.write_text(name + "\n"))
    except WRITE_ERRORS as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"cannot write checkpoint {root / name} ({write_failure(err, root)}); free some space (or choose "
            f"another --output) and rerun with --resume, which continues from {_pointed(root)}"
        ) from None
    others = sorted((_step_of(p), p) for p in root.glob("step-*") if p.is_dir() and p != final)
    orphans = [p for step, p in others if step > state.step]  # left by a killed run with other settings
    older = [p for step, p in others if step < state.step]
    for old in orphans + older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_files(tmp: Path, tensors: dict[str, torch.Tensor], state: TrainState) -> None:
    """The checkpoint's three files (``tensors`` on the CPU) in ``tmp``, each and the directory fsynced."""
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


def _pointed(root: Path) -> str:
    """What ``latest`` names, for messages: a checkpoint name or ``the start``."""
    try:
        return (root / LATEST).read_text().strip() or "the start"
    except (OSError, UnicodeDecodeError):
        return "the start"


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
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"{pointer} cannot be read ({err}); write the name of a step-* folder of {root} into it"
        ) from None
    if not STEP_NAME.fullmatch(name):
        raise CheckpointError(
            f"{pointer} holds {name[:40]!r}, not a checkpoint name like step-000050; "
            f"write the name of a step-* folder of {root} into it"
        )
    path = root / name
    if not path.is_dir():
        raise CheckpointError(
            f"{pointer} names {path.name}, which does not exist; delete {pointer} to restart"
        )
    return path


def load_state(path: Path) -> TrainState:
    """Read and verify one checkpoint directory (``CheckpointError`` if anything is off)."""
    record = _read_record(path)
    for file in (TENSORS, OPTIMIZER):
        if not (path / file).is_file() or sha256_file(path / file) != record["sha256"][file]:
            raise CheckpointError(f"{path / file} is missing or does not match {STATE}: corrupt checkpoint")
    tensors = safetensors.torch.load_file(path / TENSORS)
    optimizer = torch.load(path / OPTIMIZER, map_location="cpu", weights_only=True)
    return TrainState(record["step"], tensors, optimizer, record["scheduler"], record["config"])


def _read_record(path: Path) -> dict:
    """``state.json`` of checkpoint ``path``, checked to have every field with its type."""
    file = path / STATE
    remedy = (
        f"corrupt checkpoint: delete {path} and write the name of an earlier step-* folder into "
        f"{path.parent / LATEST}, or start again with another --output"
    )
    try:
        record = json.loads(file.read_bytes().decode("utf-8"))
    except OSError as err:
        raise CheckpointError(f"{file} cannot be read ({err.strerror or err}); {remedy}") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{file} is not UTF-8 text; {remedy}") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file} is not valid JSON ({err}); {remedy}") from None
    problem = _record_problem(record)
    if problem:
        raise CheckpointError(f"{file} is not a training state: {problem}; {remedy}")
    return record


def _record_problem(record: object) -> str | None:
    """What is wrong with a parsed ``state.json``, or ``None``."""
    if not isinstance(record, dict):
        return f"it holds a JSON {type(record).__name__}, not an object"
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return f"'step' must be a non-negative integer, not {step!r}"
    for key in ("scheduler", "config", "sha256"):
        if not isinstance(record.get(key), dict):
            return f"{key!r} must be an object, not {record.get(key)!r}"
    digests = record["sha256"]
    if not all(isinstance(digests.get(file), str) for file in (TENSORS, OPTIMIZER)):
        return f"'sha256' must give the digests of {TENSORS} and {OPTIMIZER}"
    return None


class OutputLock:
    """An exclusive ``flock`` on ``<output>/train.lock``: one training run per output folder.

    ``acquire`` writes the holder (pid, host, start time) into the file, so a second run can name it
    in its error. The kernel drops the lock when the holder exits, however it ends (SIGKILL included),
    so a stale file never blocks; the file itself stays. Locks are per open file, so a second
    ``OutputLock`` on the same folder conflicts even within one process.
    """

    def __init__(self, output: Path) -> None:
        self.path = output / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock and record this process as its holder; ``ConfigError`` if another holds it."""
        fd = self._take()
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd

    def check_free(self) -> None:
        """Fail now (``ConfigError``) if another run holds the lock, without keeping it."""
        os.close(self._take())

    def release(self) -> None:
        """Drop the lock (a no-op when not held)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _take(self) -> int:
        """An open descriptor of the lock file with the lock held."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ConfigError(
                f"cannot create the lock file {self.path} ({err.strerror or err}); "
                f"choose an output folder you can write to"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"{self.path.parent} is in use by another training run ({self.holder()}); wait for it "
                f"to finish, or choose another --output"
            ) from None
        return fd

    def holder(self) -> str:
        """The recorded holder, in words."""
        try:
            info = json.loads(self.path.read_text(encoding="utf-8"))
            return f"pid {info['pid']} on host {info['host']} since {info['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return f"holder not recorded yet in {self.path}"
