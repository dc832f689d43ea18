"""The code sandbox (``recursivemas.tools.sandbox``): limits, bounded waits, the end-of-run proof and, where
the machine provides it, isolation from the evaluator, its files and the network."""

from __future__ import annotations

import os
import socket
import time
from textwrap import dedent

import pytest

from recursivemas.tools.sandbox import isolation, run_python

ISOLATED = pytest.mark.skipif(
    isolation() != "namespaces+nobody", reason="needs root with unshare and setpriv (CI containers have them)"
)


def test_a_program_that_runs_to_its_end_passes():
    result = run_python("print('hi')\nassert 1 + 1 == 2\n")
    assert (result.passed, result.detail, result.stdout) == (True, "ok", "hi\n")


def test_stdout_and_stdin():
    result = run_python("print(input()[::-1])", stdin="abc\n")
    assert result.passed and result.stdout.strip() == "cba"


def test_large_stdin_is_fed_without_deadlock():
    result = run_python("import sys\nprint(len(sys.stdin.read()))", stdin="a" * 3_000_000)
    assert result.passed and result.stdout.strip() == "3000000"


def test_future_imports_work():
    assert run_python("from __future__ import annotations\nx: int = 1\nassert x == 1\n").passed


def test_the_evaluators_packages_are_importable_and_read_only():
    """numpy (a dependency of torch, so in the evaluator's environment) imports inside the sandbox."""
    result = run_python("import numpy\nprint(numpy.arange(3).sum())\n")
    assert result.passed and result.stdout == "3\n", result
    if isolation() != "none":
        write = "import numpy, os\nopen(os.path.join(os.path.dirname(numpy.__file__), 'x'), 'w')\n"
        assert "Read-only file system" in run_python(write).detail


def test_code_that_loops_forever_times_out():
    result = run_python("while True:\n    pass\n", timeout_s=2)
    assert not result.passed and "timed out" in result.detail


def test_code_memory_is_limited():
    result = run_python("x = bytearray(4 * 1024 ** 3)\n", timeout_s=5, memory_mb=512)
    assert not result.passed and "MemoryError" in result.detail


def test_code_cannot_use_the_socket_module():
    program = "import socket\nsocket.create_connection(('127.0.0.1', 9))\n"
    result = run_python(program, timeout_s=5)
    assert not result.passed and "network access is disabled" in result.detail


def test_background_children_do_not_hold_the_run_open():
    program = "import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(9)'])"
    start = time.monotonic()
    result = run_python(program, timeout_s=5)
    assert result.passed and time.monotonic() - start < 4


@pytest.mark.probe("sandbox-setsid")
def test_a_child_in_its_own_session_holding_the_pipe_is_killed_at_the_timeout():
    program = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\ntime.sleep(60)\n"
    start = time.monotonic()
    result = run_python(program, timeout_s=2)
    assert not result.passed and "timed out" in result.detail
    assert time.monotonic() - start < 6


@pytest.mark.probe("sandbox-setsid")
def test_a_child_in_its_own_session_does_not_outlive_a_finished_run():
    program = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('done')\n"
    start = time.monotonic()
    result = run_python(program, timeout_s=10)
    assert result.passed and result.stdout == "done\n"
    assert time.monotonic() - start < 8


FAKES = {
    "sys-exit": "import sys\nsys.exit(0)\n",
    "raise-systemexit": "raise SystemExit\n",
    "os-exit": "import os\nos._exit(0)\n",
    "argv-and-cmdline": (
        "import os, sys\nprint(*sys.argv, sep='\\n')\n"
        "print(open('/proc/self/cmdline', 'rb').read().decode().strip('\\0').split('\\0')[-1], flush=True)\n"
        "os._exit(0)\n"
    ),
    "frames": (
        "import os, sys\nf = sys._getframe()\nwhile f:\n    for scope in (f.f_locals, f.f_globals):\n"
        "        for name in ('marker', 'token', 'secret'):\n            if name in scope:\n"
        "                print(scope[name], flush=True)\n    f = f.f_back\nos._exit(0)\n"
    ),
    "gc-walk": (
        "import gc, os\nfor o in gc.get_objects():\n    if isinstance(o, bytes) and len(o) == 32:\n"
        "        os.write(3, o); os.write(1, o)\nos._exit(0)\n"
    ),
    "end-event": "import os, sys\nsys.audit('recursivemas.sandbox.end')\nos._exit(0)\n",
    "proc-mem": "import os\nopen('/proc/self/mem', 'rb')\nos._exit(0)\n",
    "proc-mem-relative": "import os\nos.chdir('/proc/self')\nopen('mem', 'rb')\nos._exit(0)\n",
    "ctypes-read": "import ctypes, os\nctypes.string_at(id(os), 64)\nos._exit(0)\n",
    "settrace": "import sys, os\nsys.settrace(lambda *a: None)\nos._exit(0)\n",
    "write-proof-fd": dedent("""
        import os
        for fd in range(3, 20):
            try:
                os.write(fd, b"x" * 32)
            except OSError:
                pass
        """),
}


@pytest.mark.probe("sandbox-fake-pass")
@pytest.mark.parametrize("cheat", list(FAKES), ids=list(FAKES))
def test_a_program_cannot_fake_a_pass_before_its_failing_assert(cheat):
    result = run_python(FAKES[cheat] + "assert False, 'the tests fail'\n", timeout_s=5)
    assert not result.passed, result


@pytest.mark.probe("sandbox-output-flood")
@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_output_floods_are_capped_and_killed(stream):
    program = f"import sys\nfor _ in range(200 * 16):\n    sys.{stream}.write('x' * 65536)\n"
    result = run_python(program, timeout_s=20, output_limit=1 << 20)
    assert not result.passed and f"more than {1 << 20} bytes on {stream}" in result.detail
    assert len(getattr(result, stream)) <= 1 << 20


@ISOLATED
@pytest.mark.probe("sandbox-escape")
def test_the_program_cannot_write_outside_its_folder(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o777)
    outside.chmod(0o777)
    program = dedent(f"""
        import os
        for d in [{str(outside)!r}, "/var/tmp", "/root", os.path.expanduser("~"), "/etc"]:
            try:
                open(os.path.join(d, "escaped.txt"), "w").write("x")
            except OSError:
                pass
        open("inside.txt", "w").write("fine")
        """)
    assert run_python(program).passed
    assert not list(outside.iterdir()) and not os.path.exists("/etc/escaped.txt")
    assert not os.path.exists("/root/escaped.txt")


@ISOLATED
@pytest.mark.probe("sandbox-escape")
def test_the_program_cannot_read_root_only_files():
    result = run_python("open('/etc/shadow').read()\n")
    assert not result.passed and "Permission denied" in result.detail


@ISOLATED
@pytest.mark.probe("sandbox-escape")
def test_the_program_cannot_signal_the_evaluator():
    program = dedent(f"""
        import os, signal
        for pid in (os.getppid(), {os.getpid()}):
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError as err:
                print(type(err).__name__)
        """)
    result = run_python(program)
    assert result.passed and "ProcessLookupError" in result.stdout  # our pid does not exist in its namespace


@ISOLATED
@pytest.mark.probe("sandbox-escape")
def test_a_daemon_does_not_outlive_the_run(tmp_path):
    marker = tmp_path / "daemon"
    tmp_path.chmod(0o777)
    program = (
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(1)\n"
        f"    open({str(marker)!r}, 'w').write('alive')\n"
    )
    assert run_python(program).passed
    time.sleep(2)
    assert not marker.exists()


@ISOLATED
@pytest.mark.probe("sandbox-escape")
def test_forking_is_capped():
    program = dedent("""
        import os, time
        n = 0
        try:
            for _ in range(500):
                if os.fork() == 0:
                    time.sleep(5)
                    os._exit(0)
                n += 1
        except OSError:
            pass
        print(n)
        """)
    result = run_python(program, max_processes=16, timeout_s=10)
    assert result.passed and int(result.stdout) < 16


@ISOLATED
@pytest.mark.probe("sandbox-escape")
def test_no_network_even_through_the_c_socket_module():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        program = (
            "import _socket, importlib, socket\nfor make in (lambda: _socket.socket(),\n"
            "             lambda: importlib.reload(socket).socket()):\n    s = make()\n    try:\n"
            f"        s.connect(('127.0.0.1', {port}))\n        print('connected')\n"
            "    except OSError as err:\n        print(type(err).__name__)\n"
        )
        result = run_python(program)
    assert result.passed and "connected" not in result.stdout, result


@pytest.fixture
def weaker_isolation(monkeypatch, request):
    """Pretend the machine offers only ``request.param`` isolation (not root, or no util-linux)."""
    import recursivemas.tools.sandbox as sandbox

    if request.param == "none":
        monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    else:
        monkeypatch.setattr(sandbox.os, "geteuid", lambda: 1000)
    isolation.cache_clear()
    with pytest.warns(RuntimeWarning, match=f"isolation is '{request.param}'"):
        assert isolation() == request.param
    yield request.param
    isolation.cache_clear()


@pytest.mark.parametrize("weaker_isolation", ["none", "namespaces"], indirect=True)
def test_weaker_isolation_still_runs_limits_and_checks_the_end(weaker_isolation):
    if weaker_isolation == "namespaces" and not isolation.__wrapped__().startswith("namespaces"):
        pytest.skip("this machine has no user namespaces")
    assert run_python("print(input())", stdin="x\n").stdout == "x\n"
    assert run_python("import numpy\n").passed
    assert not run_python(FAKES["argv-and-cmdline"] + "assert False\n").passed
    assert "timed out" in run_python("while True: pass\n", timeout_s=1).detail
