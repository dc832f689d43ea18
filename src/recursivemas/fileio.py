"""Small file helpers shared by checkpoints, outputs and the model cache: checksums, atomic writes and
an up-front check that an output folder can be written."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError

from recursivemas.errors import ConfigError

# What a failed write (a full disk, a quota) raises: OSError from Python's own files, SafetensorError from
# safetensors, RuntimeError from torch.save (whose stream writer reports a full disk as "unexpected pos").
WRITE_ERRORS: tuple[type[Exception], ...] = (OSError, SafetensorError, RuntimeError)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)``, flush it to disk, then move the temporary file onto ``path``.

    A crash at any point leaves either the old file or the new one under ``path``, never a mix.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes owner-only files; use the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_writable_dir(path: Path, what: str) -> None:
    """Create the folder ``path`` if needed and prove a file can be created in it, before any work.

    Raises ``ConfigError`` naming ``what`` (e.g. ``"--output"``) when the folder cannot be made or
    written (a parent is a file, no permission, a read-only file system).
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise ConfigError(
            f"cannot write to {what} {path} ({err.strerror or err}); choose a folder you can write to"
        ) from None


def write_failure(err: Exception, path: Path) -> str:
    """A failed write in words, with the space left on the disk that holds ``path``."""
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    where = path
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = f"{shutil.disk_usage(where).free / 2**20:.0f} MiB free there"
    except OSError:
        return reason
    return f"{reason}; {free}"
