"""Training outputs under stress (issue 11, items 7-10): two writers on one folder, resuming a finished
run or one whose final save hit a full disk, data edited between a run and its resume, corrupt
``state.json`` and unwritable output folders. All on the tiny-random preset."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
import safetensors.torch
import yaml
from safetensors import SafetensorError

from recursivemas.checkpoint import from_pretrained
from recursivemas.cli import main
from recursivemas.errors import CheckpointError, ConfigError
from recursivemas.system import RecursiveMAS
from recursivemas.train import trainer as trainer_module
from recursivemas.train.data import Splits
from recursivemas.train.state import OutputLock, latest_checkpoint
from recursivemas.train.trainer import Trainer
from tests.train.conftest import TINY, tiny_config

SHORT = {"max_steps": 2}
DISK_FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
# what safetensors raises on a full disk (torch.save raises RuntimeError("... unexpected pos ..."))
TENSORS_DISK_FULL = SafetensorError(
    "Error while serializing: I/O error: No space left on device (os error 28)"
)


def _disk_full(*args: object, **kwargs: object) -> None:
    raise DISK_FULL


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (the lock file aside) by relative path, with its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "train.lock"
    }


def _config_file(tmp_path: Path, **optim: int) -> Path:
    raw = json.loads(json.dumps(TINY))
    raw["optim"].update(optim)
    raw["run"]["output"] = str(tmp_path / "run")
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# --- item 7: one run per output folder --------------------------------------------------------------


def _hold(output: Path, ready: Connection) -> None:
    """Child process: take the output folder's lock, say so, and keep it until killed."""
    OutputLock(output).acquire()
    ready.send("held")
    time.sleep(120)


@pytest.fixture
def hold() -> Iterator[Callable[[Path], int]]:
    """``hold(output)``: another process takes ``output``'s lock; returns its pid (killed at teardown)."""
    holders: list[multiprocessing.Process] = []

    def start(output: Path) -> int:
        receive, send = multiprocessing.get_context("fork").Pipe(duplex=False)
        proc = multiprocessing.get_context("fork").Process(target=_hold, args=(output, send), daemon=True)
        proc.start()
        holders.append(proc)
        assert receive.poll(30) and receive.recv() == "held"
        return proc.pid

    yield start
    for proc in holders:
        proc.kill()
        proc.join()


@pytest.mark.probe("train-two-writers")
def test_a_second_trainer_fails_at_once_naming_the_holder(make_config, hold, monkeypatch):
    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("built the system although the output folder is taken")

    cfg = make_config()
    Path(cfg.run.output).mkdir()
    pid = hold(Path(cfg.run.output))
    monkeypatch.setattr(trainer_module, "build_system", no_build)
    with pytest.raises(ConfigError, match=f"in use by another training run \\(pid {pid} on host") as err:
        Trainer(cfg)
    assert socket.gethostname() in str(err.value) and "another --output" in str(err.value)


@pytest.mark.probe("train-two-writers")
def test_a_trainer_started_while_free_refuses_to_run_once_taken(make_config, hold):
    cfg = make_config(optim=SHORT)
    trainer = Trainer(cfg)
    pid = hold(Path(cfg.run.output))
    with pytest.raises(ConfigError, match=f"pid {pid} on host"):
        trainer.run()
    assert not (Path(cfg.run.output) / "checkpoints").exists()  # it wrote nothing


@pytest.mark.probe("train-two-writers")
def test_the_lock_is_held_through_resume_and_every_save_then_released(make_config, monkeypatch):
    cfg = make_config(optim=SHORT)
    output = Path(cfg.run.output)
    probes: list[str] = []

    def probing(method):
        def wrapped(self, *args, **kwargs):
            with pytest.raises(ConfigError, match=f"pid {os.getpid()} on host"):
                OutputLock(output).check_free()
            probes.append(method.__name__)
            return method(self, *args, **kwargs)

        return wrapped

    Trainer(cfg).run()
    for name in ("resume", "save", "_write_outputs"):
        monkeypatch.setattr(Trainer, name, probing(getattr(Trainer, name)))
    Trainer(make_config(optim={"max_steps": 4})).run(resume=True)
    assert probes == ["resume", "save", "_write_outputs"]
    OutputLock(output).check_free()  # released at the end


# --- item 8: resuming a finished run, and a final save that hit a full disk --------------------------


@pytest.mark.probe("train-resume-finished")
def test_resume_of_a_finished_run_says_nothing_is_left_and_keeps_every_output(tmp_path, capsys):
    config = _config_file(tmp_path, max_steps=2)
    assert main(["train", "-c", str(config)]) == 0
    before = _snapshot(tmp_path / "run")
    capsys.readouterr()
    assert main(["train", "-c", str(config), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "nothing left to do" in err and "--max-steps" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert _snapshot(tmp_path / "run") == before  # report.json, final/, log and checkpoints untouched


@pytest.mark.probe("train-resume-finished")
@pytest.mark.parametrize("where", ["links", "report"])
def test_a_final_save_on_a_full_disk_is_clear_and_resume_completes_it(make_config, monkeypatch, where):
    def half_links(self: RecursiveMAS, directory: str, command: str | None = None) -> None:
        Path(directory).mkdir(parents=True)
        (Path(directory) / "link_model.safetensors").write_bytes(b"half")
        raise TENSORS_DISK_FULL

    if where == "links":
        monkeypatch.setattr(RecursiveMAS, "save_pretrained", half_links)
    else:
        monkeypatch.setattr(trainer_module, "atomic_write", _disk_full)
    cfg = make_config(optim=SHORT)
    output = Path(cfg.run.output)
    with pytest.raises(CheckpointError, match=r"No space left on device.*checkpoints/step-000002.*--resume"):
        Trainer(cfg).run()
    assert not (output / "report.json").exists() and not (output / ".tmp-final").exists()
    assert (output / "final").exists() == (where == "report")  # never a half-written final/
    assert latest_checkpoint(output / "checkpoints").name == "step-000002"
    monkeypatch.undo()

    trainer = Trainer(cfg)
    report = trainer.run(resume=True)
    log = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    last = [r for r in log if r["kind"] == "train"][-1]
    saved = json.loads((output / "report.json").read_text())
    assert saved["steps"] == report.steps == 2
    assert saved["final_train_loss"] == last["loss"]  # from the log, not null
    assert (
        saved["final_validation_loss"] == [r for r in log if r["kind"] == "validation"][-1]["validation_loss"]
    )
    from_pretrained(output / "final", agents=list(trainer.system.agents.values()))
    with pytest.raises(ConfigError, match="nothing left to do"):
        Trainer(cfg).run(resume=True)


@pytest.mark.probe("train-resume-finished")
def test_a_checkpoint_on_a_full_disk_is_clear_and_resume_continues_from_the_previous(
    make_config, monkeypatch
):
    real_save = safetensors.torch.save_file
    calls: list[str] = []

    def second_fails(tensors: dict, filename: str | os.PathLike, metadata: dict | None = None) -> None:
        calls.append(str(filename))
        if len(calls) == 2:  # the step-4 checkpoint: half a file, then the disk is full
            Path(filename).write_bytes(b"half")
            raise TENSORS_DISK_FULL
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", second_fails)
    cfg = make_config()  # max_steps 4, a checkpoint every 2 steps
    output = Path(cfg.run.output)
    with pytest.raises(CheckpointError, match=r"step-000004 \(.*No space left.*continues from step-000002"):
        Trainer(cfg).run()
    monkeypatch.undo()
    checkpoints = output / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-000002"]  # no .tmp-step-000004
    assert not (output / "final").exists() and not (output / "report.json").exists()
    assert Trainer(cfg).run(resume=True).steps == 4
    assert latest_checkpoint(checkpoints).name == "step-000004"


def test_a_log_append_on_a_full_disk_is_clear_and_resume_keeps_a_clean_log(make_config, monkeypatch):
    real_open = Path.open
    appends: list[int] = []

    def third_append_fails(self: Path, mode: str = "r", *args: object, **kwargs: object):
        if self.name == "train_log.jsonl" and mode == "a":
            appends.append(1)
            if len(appends) == 5:  # validation at 0, steps 1-2, validation at 2; step 3: half a line, full
                with real_open(self, mode, *args, **kwargs) as f:
                    f.write('{"step": 3, "lo')
                raise DISK_FULL
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", third_append_fails)
    cfg = make_config()  # max_steps 4, a checkpoint every 2 steps
    message = r"append step 3 to .*train_log\.jsonl \(.*No space left.*--resume"
    with pytest.raises(CheckpointError, match=message):
        Trainer(cfg).run()
    monkeypatch.undo()
    assert Trainer(cfg).run(resume=True).steps == 4
    log = (Path(cfg.run.output) / "train_log.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in log]  # the cut line is gone
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]


# --- item 9: data edited between a run and its resume -------------------------------------------------


@pytest.mark.probe("train-data-changed")
def test_resume_refuses_edited_data_and_names_the_file(tmp_path, make_config, monkeypatch):
    assert main(["gen-data", "--source", "relay:1:12", "--validation", "0", "--output", str(tmp_path)]) == 0
    rows = tmp_path / "train.jsonl"
    data = {"sources": [{"kind": "file", "path": str(rows)}], "validation": 2}
    Trainer(make_config(data=data, optim=SHORT)).run()
    original = rows.read_text()
    first = json.loads(original.splitlines()[0])
    rows.write_text(original.replace(json.dumps(first), json.dumps({**first, "answer": "edited"}), 1))
    with pytest.raises(CheckpointError, match=re.escape(f"data file(s) {rows} changed") + ".*new --output"):
        Trainer(make_config(data=data, optim={"max_steps": 4})).run(resume=True)

    rows.write_text(original)
    build = trainer_module.build_splits
    monkeypatch.setattr(trainer_module, "build_splits", lambda *a, **k: Splits(build(*a, **k).train[1:], []))
    with pytest.raises(CheckpointError, match="training rows differ"):
        Trainer(make_config(data=data, optim={"max_steps": 4})).run(resume=True)
    monkeypatch.undo()
    assert Trainer(make_config(data=data, optim={"max_steps": 4})).run(resume=True).steps == 4


# --- item 10: corrupt state.json, unwritable outputs ---------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """The output folder of a finished two-step run."""
    cfg = tiny_config(tmp_path_factory.mktemp("finished"), optim=SHORT)
    Trainer(cfg).run()
    return Path(cfg.run.output)


GOOD_STATE = {
    "step": 2,
    "scheduler": {},
    "config": {},
    "sha256": {"trainable.safetensors": "0", "optimizer.pt": "0"},
}


@pytest.mark.probe("train-bad-state")
@pytest.mark.parametrize(
    "content, message",
    [
        (b"[]", "holds a JSON list, not an object"),
        (json.dumps({k: v for k, v in GOOD_STATE.items() if k != "step"}).encode(), "'step' must be"),
        (json.dumps({**GOOD_STATE, "step": "2"}).encode(), "'step' must be a non-negative integer"),
        (json.dumps({**GOOD_STATE, "step": -1}).encode(), "'step' must be a non-negative integer"),
        (json.dumps({**GOOD_STATE, "config": []}).encode(), "'config' must be an object"),
        (json.dumps({**GOOD_STATE, "sha256": {}}).encode(), "'sha256' must give the digests"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b'{"step": 2,', "not valid JSON"),
    ],
)
def test_a_corrupt_state_json_is_a_clear_error(tmp_path, make_config, finished, content, message):
    shutil.copytree(finished, tmp_path / "run")
    state = latest_checkpoint(tmp_path / "run" / "checkpoints") / "state.json"
    state.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"state.json is .*{message}.*corrupt checkpoint"):
        Trainer(make_config(optim={"max_steps": 4})).run(resume=True)


@pytest.mark.probe("train-bad-state")
@pytest.mark.parametrize("pointer", [b"\xff\xfe", b"../../elsewhere"])
def test_a_corrupt_latest_pointer_is_a_clear_error(tmp_path, make_config, finished, pointer):
    shutil.copytree(finished, tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "latest").write_bytes(pointer)
    with pytest.raises(CheckpointError, match=r"latest .*step-\* folder"):
        Trainer(make_config(optim={"max_steps": 4})).run(resume=True)


@pytest.fixture
def blocked(tmp_path) -> Path:
    """A path that cannot be a folder: its parent is a file."""
    (tmp_path / "file").write_text("not a folder")
    return tmp_path / "file" / "out"


@pytest.mark.probe("train-bad-state")
def test_an_unwritable_train_output_fails_before_any_work(tmp_path, blocked, capsys, monkeypatch):
    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("built the system although the output cannot be written")

    monkeypatch.setattr(trainer_module, "build_system", no_build)
    config = _config_file(tmp_path, max_steps=2)
    assert main(["train", "-c", str(config), "--output", str(blocked)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write to the output folder (run.output / --output) {blocked}" in err
    assert "Traceback" not in err


@pytest.mark.probe("train-bad-state")
def test_an_unwritable_gen_data_output_fails_before_any_work(blocked, capsys, monkeypatch):
    from recursivemas.train import cli as train_cli

    def no_rows(*args: object, **kwargs: object) -> None:
        raise AssertionError("generated rows although the output cannot be written")

    monkeypatch.setattr(train_cli, "build_splits", no_rows)
    assert main(["gen-data", "--source", "relay:1:4", "--validation", "1", "--output", str(blocked)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write to --output {blocked}" in err and "Traceback" not in err


@pytest.mark.probe("train-bad-state")
def test_gen_data_on_a_full_disk_is_clear_and_writes_no_partial_file(tmp_path, capsys, monkeypatch):
    from recursivemas.fileio import atomic_write
    from recursivemas.train import data as data_module

    def half(path: Path, write) -> None:
        if path.name != "train.jsonl":
            raise DISK_FULL
        atomic_write(path, write)

    monkeypatch.setattr(data_module, "atomic_write", half)
    assert main(["gen-data", "--source", "relay:1:4", "--validation", "1", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl"]  # whole, and nothing half-written
