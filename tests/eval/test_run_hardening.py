"""``recursivemas eval`` on a full disk (issue 11, item 10): one clear line, and the output folder left as
it was (no ``.shards``, no half-written report)."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from recursivemas.cli import main
from recursivemas.eval import report as report_module
from recursivemas.eval import run as run_module
from recursivemas.fileio import atomic_write

FAST = ["--preset", "tiny-random", "--rounds", "1", "--latent-steps", "2", "--max-new-tokens", "4"]
FAST += ["--temperature", "0", "--seeds", "0", "--task", "relay:1", "--limit", "2", "--modes", "latent"]


def _full_after(writes: int) -> Callable[[Path, Callable[[Path], object]], None]:
    """An ``atomic_write`` that writes ``writes`` files, then finds the disk full."""
    done: list[Path] = []

    def write(path: Path, fill: Callable[[Path], object]) -> None:
        if len(done) >= writes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        done.append(path)
        atomic_write(path, fill)

    return write


@pytest.mark.probe("train-bad-state")
@pytest.mark.parametrize("where", ["shard", "report"])
def test_eval_on_a_full_disk_is_clear_and_leaves_the_output_as_it_was(tmp_path, capsys, monkeypatch, where):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    if where == "shard":
        monkeypatch.setattr(run_module, "atomic_write", _full_after(0))
    else:  # summary.json gets written, predictions.jsonl finds the disk full
        monkeypatch.setattr(report_module, "atomic_write", _full_after(1))
    assert main(["eval", *FAST, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"recursivemas: error: cannot write the results to --output {out} (No space left on device;" in err
    assert "Traceback" not in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]  # no .shards, no staging, no partial report
