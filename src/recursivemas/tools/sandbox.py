"""Run untrusted Python (model-written code plus its tests) in a separate, limited process.

What it does: the program runs in a fresh interpreter (``python -I``: no user site, no environment-driven
imports) in a new session, inside a temporary working directory, with an empty environment, a
wall-clock timeout after which the whole process group is killed, CPU-time, address-space and
file-size limits, no core dumps, and the ``socket`` module's constructors replaced so ordinary network
calls fail. A program only passes if it runs to its end: the sandbox appends a random marker that
must be printed, so ``sys.exit(0)`` before the tests does not count as passing.

What it does not do: it is no security boundary. Code can still read files the user can read, import
``_socket`` directly, or start processes (root ignores process-count limits). Run untrusted
benchmarks in a container or VM as well.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Sets the limits and the socket guard, runs the program as __main__, prints the marker only if the
# program returned normally, and always ends by killing its own process group (children included).
_WRAPPER = """
import os, resource, runpy, signal, socket, sys
mem, cpu, fsize, nproc = (int(v) for v in sys.argv[1:5])
marker = sys.argv[5]
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
if nproc >= 0:
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the recursivemas sandbox")
socket.socket = socket.create_connection = socket.getaddrinfo = _no_network
sys.argv = ["program.py"]
try:
    runpy.run_path("program.py", run_name="__main__")
    print(marker)
except BaseException:  # SystemExit included: the program did not run to its end
    import traceback
    traceback.print_exc()
finally:
    sys.stdout.flush()
    sys.stderr.flush()
    os.killpg(0, signal.SIGKILL)
"""
_FILE_LIMIT = 64 << 20
_OUTPUT_LIMIT = 1 << 20


@dataclass(frozen=True)
class SandboxResult:
    """``passed``: ran to its end within the limits; ``detail``: why not; ``stdout``/``stderr``: what it
    printed (each cut to ``output_limit`` characters)."""

    passed: bool
    detail: str
    stdout: str = ""
    stderr: str = ""


def run_python(
    program: str,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    stdin: str = "",
    max_processes: int = -1,
    output_limit: int = _OUTPUT_LIMIT,
) -> SandboxResult:
    """Execute ``program`` with ``stdin`` as its input; it passes if it runs to its last line in time.

    ``max_processes >= 0`` caps the processes (and threads) of this user while it runs (``RLIMIT_NPROC``;
    ignored for root), so the program cannot fork; ``-1`` leaves the cap alone.
    """
    marker = f"recursivemas-sandbox-done-{secrets.token_hex(8)}"
    with tempfile.TemporaryDirectory(prefix="recursivemas-sandbox-") as workdir:
        Path(workdir, "program.py").write_text(program)
        limits = [str(memory_mb << 20), str(int(timeout_s) + 1), str(_FILE_LIMIT), str(max_processes)]
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _WRAPPER, *limits, marker],
            cwd=workdir,
            env={"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            stdout, stderr = proc.communicate(stdin, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return SandboxResult(False, f"timed out after {timeout_s:g}s")
    if stdout.endswith(marker + "\n"):
        return SandboxResult(True, "ok", stdout[: -len(marker) - 1][:output_limit], stderr[:output_limit])
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    detail = lines[-1] if lines else "the program exited before its end (tests not run)"
    return SandboxResult(False, detail, stdout[:output_limit], stderr[-output_limit:])


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
