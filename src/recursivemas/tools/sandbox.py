"""Run untrusted Python (model-written code plus its tests) in an isolated, limited process.

Isolation (see the README's reliability section for what each level contains):

* ``"namespaces+nobody"`` (running as root, ``unshare`` and ``setpriv`` from util-linux present, the usual
  case in containers and CI): the program runs in new PID, network, IPC, UTS and mount namespaces, as the
  unprivileged user ``nobody`` (uid 65534) with ``no_new_privs`` and a parent-death signal. It sees no
  network (only a down loopback), no process outside its namespace (it cannot signal the evaluator; every
  process it starts dies with it), fresh size-capped ``tmpfs`` over ``/tmp``, ``/var/tmp``, ``/dev/shm``
  and ``/run/lock`` (nothing it writes survives the run), and the rest of the file system read-only
  through ``nobody``'s permissions (it can read world-readable files, not root-only ones such as
  ``/etc/shadow``). ``RLIMIT_NPROC`` caps its processes.
* ``"namespaces"`` (not root, unprivileged user namespaces allowed): the same namespaces and ``tmpfs``
  folders, but the program keeps the user's identity, so it can read and write what the user can outside
  those folders. A warning says so once per process.
* ``"none"`` (neither available): a new session and the limits below only. A warning says so once.

Always: a fresh interpreter (``python -I``) with an empty environment; a wall-clock timeout after which
the whole process tree is killed and no wait is unbounded; CPU-time, address-space and file-size limits,
no core dumps; stdout and stderr read incrementally into capped buffers (the run is killed past the cap).

Passing: a program passes only if it runs to its last line. The proof is a random token that the
wrapper reads from a pipe before the program starts (it is in no argument, environment variable or
file) and that an audit hook writes to a separate pipe only when called from the wrapper's own frame
after the program returned. The hook denies what could read the token out of the process: ``gc``
object walks, ``ctypes`` memory reads, ``/proc/*/mem``, tracing and profiling hooks. Printing something
and exiting early, ``sys.exit(0)`` or ``os._exit(0)`` before a failing assert do not pass.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

NOBODY = 65534
_FILE_LIMIT = 64 << 20
_OUTPUT_LIMIT = 1 << 20
_TMPFS_SIZE = "64m"
_SANDBOX_PYTHON = "/tmp/.python"  # where the interpreter's prefix is bind-mounted inside the namespace
_SANDBOX_SITE = "/tmp/.site-packages"  # and the virtual environment's packages (numpy, ...), if any
_KILL_WAIT_S = 5.0
_END_EVENT = "recursivemas.sandbox.end"
_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}

# Runs as the sandboxed user. argv: code fd, token fd, proof fd, memory, cpu, file size, processes.
# Reads the program and the token, installs the audit hook (which keeps the token in a closure no
# Python object outside the interpreter's hook list points to), sets the limits, runs the program as
# __main__, raises the end event from its own frame only if the program returned, and exits at once
# (os._exit: no waiting for threads or atexit handlers the program left).
_WRAPPER = r"""
import os, resource, runpy, socket, sys

def _guard(token, proof_fd, home):
    write, getframe = os.write, sys._getframe
    denied = ("gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.settrace", "sys.setprofile",
              "sys._current_frames", "sys.monitoring.register_callback", "ctypes.string_at",
              "ctypes.wstring_at", "ctypes.cdata", "ctypes.cdata/buffer", "ctypes.call_function",
              "ctypes.dlsym", "ctypes.dlsym/handle")
    def hook(event, args):
        if event == @END@:
            if getframe(1) is home:
                write(proof_fd, token)
        elif event in denied:
            raise RuntimeError(f"{event} is disabled in the recursivemas sandbox")
        elif event == "open" and isinstance(args[0], (str, bytes)) and _memory_file(os.fsdecode(args[0])):
            raise PermissionError(f"opening {args[0]!r} is disabled in the recursivemas sandbox")
        elif event == "import" and str(args[0]).startswith(("_testcapi", "_testinternalcapi", "_xxsub")):
            raise ImportError(f"{args[0]} is disabled in the recursivemas sandbox")
    sys.addaudithook(hook)

def _memory_file(path):
    # /proc/<pid>/mem and map_files, however reached (relative to /proc/self, through dir_fd, ...)
    return os.path.basename(path.rstrip("/")) in ("mem", "map_files") or "/map_files/" in path

def _read_all(fd):
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)

def _main():
    code_fd, token_fd, proof_fd, mem, cpu, fsize, nproc = (int(v) for v in sys.argv[1:8])
    with open("program.py", "wb") as f:
        f.write(_read_all(code_fd))
    _guard(_read_all(token_fd), proof_fd, sys._getframe())
    audit = sys.audit
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    if nproc >= 0:
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    def no_network(*args, **kwargs):
        raise OSError("network access is disabled in the recursivemas sandbox")
    socket.socket = socket.create_connection = socket.getaddrinfo = no_network
    if os.path.isdir(@SITE@):  # the evaluator's virtual environment, read-only (namespaces only)
        sys.path.append(@SITE@)
    sys.argv = ["program.py"]
    ended = False
    try:
        runpy.run_path("program.py", run_name="__main__")
        ended = True
    except BaseException:  # SystemExit included: the program did not run to its end
        import traceback
        traceback.print_exc()
    if ended:
        audit(@END@)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    os._exit(0 if ended else 1)

_main()
""".replace("@END@", repr(_END_EVENT)).replace("@SITE@", repr(_SANDBOX_SITE))

# Runs as root (or the user) inside the new namespaces: fresh tmpfs folders, the interpreter's prefix
# bind-mounted read-only where the sandboxed user can reach it, a private working folder; then execs
# "$@" (setpriv ... python, or python). $1: the prefix to bind ("" for none); $2: the work folder's owner;
# $3: the virtual environment's site-packages to bind ("" for none). Both are opened (fds 7, 8) before the
# fresh /tmp hides them, in case they live under /tmp, and bound through /proc/self/fd.
_SETUP = f"""set -e
if [ -n "$1" ]; then exec 7<"$1"; fi
if [ -n "$3" ]; then exec 8<"$3"; fi
for d in /tmp /var/tmp /dev/shm /run/lock; do
  if [ -d "$d" ]; then mount -t tmpfs -o size={_TMPFS_SIZE},mode=1777,nosuid,nodev tmpfs "$d"; fi
done
mkdir /tmp/work
if [ -n "$1" ]; then mkdir {_SANDBOX_PYTHON}; mount --bind /proc/self/fd/7 {_SANDBOX_PYTHON}; \
mount -o remount,bind,ro {_SANDBOX_PYTHON}; fi
if [ -n "$3" ]; then mkdir {_SANDBOX_SITE}; mount --bind /proc/self/fd/8 {_SANDBOX_SITE}; \
mount -o remount,bind,ro {_SANDBOX_SITE}; fi
if [ -n "$2" ]; then chown "$2:$2" /tmp/work; fi
cd /tmp/work
exec 7<&- 8<&-
shift 3
exec "$@"
"""

_UNSHARE = ["--fork", "--pid", "--mount-proc", "--net", "--ipc", "--uts", "--kill-child"]


@dataclass(frozen=True)
class SandboxResult:
    """``passed``: ran to its end within the limits; ``detail``: why not; ``stdout``/``stderr``: what it
    printed (each cut to ``output_limit`` bytes)."""

    passed: bool
    detail: str
    stdout: str = ""
    stderr: str = ""


def run_python(
    program: str,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    stdin: str = "",
    max_processes: int = 64,
    output_limit: int = _OUTPUT_LIMIT,
) -> SandboxResult:
    """Execute ``program`` with ``stdin`` as its input; it passes if it runs to its last line in time.

    ``max_processes >= 0`` caps the processes (and threads) of the sandboxed user (``RLIMIT_NPROC``;
    ignored when the program keeps root's identity, i.e. isolation ``"none"`` as root); ``-1`` leaves it.
    Printing more than ``output_limit`` bytes on stdout or stderr kills the run.
    """
    level = isolation()
    token = secrets.token_hex(16).encode()
    limits = [memory_mb << 20, int(timeout_s) + 1, _FILE_LIMIT, max_processes]
    with tempfile.TemporaryDirectory(prefix="recursivemas-sandbox-") as workdir:
        code_fd = _unlinked_file(Path(workdir, "program.in"), program.encode())
        token_fd = _unlinked_file(Path(workdir, "token.in"), token)
        proof_r, proof_w = os.pipe()
        fds = [_above_setup(fd) for fd in (code_fd, token_fd, proof_w)]
        try:
            proc = subprocess.Popen(
                _command(level, [*fds, *limits]),
                cwd=workdir,
                env=_ENV,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=fds,
                start_new_session=True,
            )
        finally:
            for fd in fds:
                os.close(fd)
        try:
            outcome = _communicate(proc, stdin.encode(), timeout_s, output_limit)
            proved = _read_proof(proof_r) == token
        finally:
            os.close(proof_r)
    stdout, stderr = (b.decode("utf-8", "replace") for b in (outcome.stdout, outcome.stderr))
    if outcome.failure:
        return SandboxResult(False, outcome.failure, stdout, stderr)
    if proved:
        return SandboxResult(True, "ok", stdout, stderr)
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    detail = lines[-1] if lines else "the program exited before its end (tests not run)"
    return SandboxResult(False, detail, stdout, stderr)


@functools.cache
def isolation() -> str:
    """The strongest isolation this machine provides: ``"namespaces+nobody"``, ``"namespaces"`` or
    ``"none"`` (probed once per process by running ``true`` in it); warns when it is not the first."""
    unshare, setpriv = shutil.which("unshare"), shutil.which("setpriv")
    level = "none"
    if unshare and os.geteuid() == 0 and setpriv and _works([unshare, *_UNSHARE, "true"]):
        level = "namespaces+nobody"
    elif unshare and _works([unshare, "--user", "--map-root-user", *_UNSHARE, "true"]):
        level = "namespaces"
    if level != "namespaces+nobody":
        warnings.warn(
            f"recursivemas sandbox isolation is {level!r}: model-written code "
            + (
                "runs without network and in its own process tree, but can read and write your files"
                if level == "namespaces"
                else "runs as you, with network access, and can read, write and kill what you can"
            )
            + "; run evaluations of untrusted code as root in a container (unshare and setpriv needed)",
            RuntimeWarning,
            stacklevel=2,
        )
    return level


def _works(command: list[str]) -> bool:
    try:
        return subprocess.run(command, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _command(level: str, args: list[int]) -> list[str]:
    """The argv that runs the wrapper with ``args`` under isolation ``level``. With namespaces the base
    interpreter runs from its prefix bind-mounted at ``_SANDBOX_PYTHON`` (reachable by ``nobody``, and
    not hidden by the fresh ``/tmp`` when a virtual environment lives there)."""
    wrapper = ["-I", "-c", _WRAPPER, *map(str, args)]
    if level == "none":
        return [sys.executable, *wrapper]
    prefix = Path(sys.base_prefix)
    python = Path(_SANDBOX_PYTHON) / Path(sys._base_executable).relative_to(prefix)  # type: ignore[attr-defined]
    unshare = [shutil.which("unshare"), *_UNSHARE, "sh", "-c", _SETUP, "sandbox-setup", str(prefix)]
    site = sysconfig.get_path("purelib") if sys.prefix != sys.base_prefix else ""
    if level == "namespaces":
        return [unshare[0], "--user", "--map-root-user", *unshare[1:], "", site, str(python), *wrapper]
    drop = [shutil.which("setpriv"), f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    drop += ["--no-new-privs", "--pdeathsig=KILL", "--"]
    return [*unshare, str(NOBODY), site, *drop, str(python), *wrapper]


def _above_setup(fd: int) -> int:
    """``fd`` moved to a number >= 10, clear of the descriptors the setup script opens (0-9)."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


def _unlinked_file(path: Path, data: bytes) -> int:
    """A read-only descriptor of a file holding ``data`` whose name is already removed."""
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    path.unlink()
    return fd


@dataclass
class _Outcome:
    stdout: bytes
    stderr: bytes
    failure: str = ""


def _communicate(proc: subprocess.Popen, data: bytes, timeout_s: float, limit: int) -> _Outcome:
    """Feed ``data`` to stdin and read stdout/stderr until both close, within ``timeout_s`` and ``limit``
    bytes each; on either bound kill the process tree. Every wait is bounded."""
    deadline = time.monotonic() + timeout_s
    out = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    failure = ""
    with selectors.DefaultSelector() as sel:
        for stream in out:
            sel.register(stream, selectors.EVENT_READ)
        if data:
            os.set_blocking(proc.stdin.fileno(), False)
            sel.register(proc.stdin, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        view = memoryview(data)
        while sel.get_map() and not failure:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                failure = f"timed out after {timeout_s:g}s"
                break
            for key, _ in sel.select(remaining):
                if key.fileobj is proc.stdin:
                    view = _feed(proc.stdin, view, sel)
                    continue
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buffer = out[key.fileobj]
                buffer += chunk
                if len(buffer) > limit:
                    name = "stdout" if key.fileobj is proc.stdout else "stderr"
                    failure = f"printed more than {limit} bytes on {name}"
                    break
    if not failure:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(deadline - time.monotonic(), 0.0))
        if proc.returncode is None:
            failure = f"timed out after {timeout_s:g}s"
    if failure or proc.returncode is None:
        _kill_tree(proc)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        with contextlib.suppress(OSError):
            stream.close()
    return _Outcome(bytes(out[proc.stdout][:limit]), bytes(out[proc.stderr][-limit:]), failure)


def _feed(stdin, view: memoryview, sel: selectors.BaseSelector) -> memoryview:
    """Write what the pipe takes of ``view``; close stdin when done or when the program closed it."""
    try:
        view = view[os.write(stdin.fileno(), view[: 1 << 16]) :]
    except BlockingIOError:  # the pipe is full: try again when it is writable
        return view
    except BrokenPipeError:  # the program closed its stdin: drop the rest
        view = view[:0]
    if not view:
        sel.unregister(stdin)
        with contextlib.suppress(OSError):
            stdin.close()
    return view


def _read_proof(fd: int) -> bytes:
    """What the proof pipe holds now (never blocks: a process the program left may still hold it)."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 1024)
    except BlockingIOError:
        return b""


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the session (with namespaces, killing ``unshare`` kills the namespace and all in it)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(_KILL_WAIT_S)
