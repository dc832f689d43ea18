"""The bundled-model cache under concurrent readers, in-place corruption and edited manifests (issue 11,
item 14). A fake bundled model with a seconds-free conversion stands in for the real ones, in a
temporary cache root, so the real cache is never touched."""

import fcntl
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from recursivemas.cli import main
from recursivemas.models import bundled

NAME = "fake-tiny"
WEIGHTS = bytes(range(256)) * 64


@dataclass
class FakeModel:
    """A bundled model whose conversion writes two small files; counts conversions, and can be held."""

    exports: list[Path] = field(default_factory=list)
    hold: threading.Event | None = None

    def export(self, gguf: Path, out: Path) -> None:
        if self.hold is not None:
            assert self.hold.wait(30)
        out.mkdir()
        (out / "config.json").write_text(json.dumps({"source": gguf.name}))
        (out / "model.safetensors").write_bytes(WEIGHTS)
        self.exports.append(out)

    @property
    def folder(self) -> Path:
        return bundled.model_dir(NAME)

    @property
    def weights(self) -> Path:
        return self.folder / "model.safetensors"


@pytest.fixture
def fake(tmp_path, monkeypatch) -> FakeModel:
    monkeypatch.setenv(bundled.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(bundled.VERIFY_ENV, raising=False)
    model = FakeModel()
    spec = bundled.BundledModel(
        NAME, "Fake", "Llama", 8, 1, 16, "1K", "none", "pip install fake", lambda work: work / "fake.gguf"
    )
    monkeypatch.setitem(bundled.BUNDLED, NAME, spec)
    monkeypatch.setattr(bundled, "_export", model.export)
    bundled.ensure_cached(NAME)
    assert len(model.exports) == 1
    return model


def _corrupt_in_place(path: Path) -> None:
    """Flip one byte, keeping the file's size and modification time."""
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _edit_manifest(folder: Path, edit) -> None:
    manifest = json.loads((folder / bundled.MANIFEST).read_text())
    edit(manifest)
    (folder / bundled.MANIFEST).write_text(json.dumps(manifest))


def _lock_file() -> Path:
    return bundled.model_dir(NAME).parent / f".{NAME}.lock"


def _can_lock(how: int) -> bool:
    """Whether another open file could take the cache lock ``how`` right now (without waiting)."""
    with _lock_file().open("a") as handle:
        try:
            fcntl.flock(handle, how | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


@pytest.mark.probe("model-cache")
def test_a_reader_holds_a_shared_lock_and_a_rebuild_waits_for_it(fake):
    inside, leave = threading.Event(), threading.Event()
    read = []

    def reader() -> None:
        with bundled.cached(NAME) as folder:
            inside.set()
            assert leave.wait(30)
            read.append((folder / "model.safetensors").read_bytes())  # still there: no rebuild yet

    thread = threading.Thread(target=reader)
    thread.start()
    assert inside.wait(30)
    assert _can_lock(fcntl.LOCK_SH) and not _can_lock(fcntl.LOCK_EX)  # readers share, rebuilds wait
    _edit_manifest(fake.folder, lambda m: m["files"]["config.json"].update(size=1))
    rebuild = threading.Thread(target=bundled.ensure_cached, args=(NAME,))
    rebuild.start()
    time.sleep(0.5)
    assert len(fake.exports) == 1  # the rebuild waits while the reader reads
    leave.set()
    thread.join(30)
    rebuild.join(30)
    assert read == [WEIGHTS] and len(fake.exports) == 2 and bundled.is_cached(NAME)


@pytest.mark.probe("model-cache")
def test_a_reader_waits_for_a_rebuild_in_progress(fake):
    fake.weights.unlink()
    fake.hold = threading.Event()
    rebuild = threading.Thread(target=bundled.ensure_cached, args=(NAME,))
    rebuild.start()
    deadline = time.monotonic() + 30
    while not _lock_file().exists() or _can_lock(fcntl.LOCK_SH):  # until the rebuild holds its lock
        assert time.monotonic() < deadline
        time.sleep(0.01)
    seen = []

    def reader() -> None:
        with bundled.cached(NAME) as folder:
            seen.append((folder / "model.safetensors").read_bytes())

    thread = threading.Thread(target=reader)
    thread.start()
    time.sleep(0.5)
    assert seen == []  # no read while the rebuild runs
    fake.hold.set()
    rebuild.join(30)
    thread.join(30)
    assert seen == [WEIGHTS] and len(fake.exports) == 2


@pytest.mark.probe("model-cache")
def test_same_size_same_mtime_corruption_is_caught_by_verification(fake, monkeypatch, capsys):
    _corrupt_in_place(fake.weights)
    assert bundled.cache_problem(NAME, verify=True) == "model.safetensors does not match its checksum"
    monkeypatch.setenv(bundled.VERIFY_ENV, "1")  # every load hashes every file
    assert bundled.cache_problem(NAME) == "model.safetensors does not match its checksum"
    bundled.ensure_cached(NAME)
    assert fake.weights.read_bytes() == WEIGHTS and len(fake.exports) == 2
    assert "does not match its checksum); rebuilding it" in capsys.readouterr().err


@pytest.mark.probe("model-cache")
def test_models_verify_rebuilds_a_cache_corrupted_in_place(fake, capsys):
    _corrupt_in_place(fake.weights)
    assert main(["models", "--verify"]) == 0
    out, err = capsys.readouterr()
    assert "does not match its checksum); rebuilding it" in err
    assert f"{NAME}: " in out and f"cached in {fake.folder}, every file matches its SHA-256" in out
    assert fake.weights.read_bytes() == WEIGHTS and len(fake.exports) == 2
    assert main(["models", "--verify"]) == 0 and len(fake.exports) == 2  # intact: nothing rebuilt


@pytest.mark.probe("model-cache")
def test_an_edited_manifest_is_detected_and_rebuilt(fake, capsys):
    record = json.loads((fake.folder / bundled.MANIFEST).read_text())["files"]["model.safetensors"]
    _corrupt_in_place(fake.weights)
    sha = bundled.sha256_file(fake.weights)
    _edit_manifest(fake.folder, lambda m: m["files"]["model.safetensors"].update(sha256=sha))
    assert (
        bundled.cache_problem(NAME, verify=True) == "manifest.json was edited (its checksum does not match)"
    )
    bundled.ensure_cached(NAME)
    assert "manifest.json was edited" in capsys.readouterr().err
    manifest = json.loads((fake.folder / bundled.MANIFEST).read_text())
    assert manifest["files"]["model.safetensors"]["sha256"] == record["sha256"]
    assert manifest["checksum"] == bundled.manifest_checksum(manifest) and len(fake.exports) == 2


@pytest.mark.probe("model-cache")
def test_an_older_unsigned_manifest_is_signed_once_verified(fake):
    _edit_manifest(fake.folder, lambda m: m.pop("checksum"))
    assert bundled.cache_problem(NAME) == bundled.UNSIGNED
    bundled.ensure_cached(NAME)
    assert bundled.is_cached(NAME) and len(fake.exports) == 1  # signed in place, not converted again

    _edit_manifest(fake.folder, lambda m: m.pop("checksum"))
    _corrupt_in_place(fake.weights)  # an unsigned manifest is only trusted after every file is hashed
    bundled.ensure_cached(NAME)
    assert fake.weights.read_bytes() == WEIGHTS and len(fake.exports) == 2


def test_a_rebuild_that_does_not_help_is_a_clear_error(fake, monkeypatch):
    monkeypatch.setattr(bundled, "convert", lambda spec: None)
    fake.weights.unlink()
    with pytest.raises(bundled.ConfigError, match=r"still unusable after a rebuild.*remove .* and retry"):
        bundled.ensure_cached(NAME)
