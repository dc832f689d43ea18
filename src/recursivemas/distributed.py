"""Multi-process CPU runs under ``accelerate launch --cpu --num_processes N``.

accelerate's launcher starts a single plain process for ``--cpu`` (it only goes multi-process on CPU
through ``mpirun``), setting ``ACCELERATE_USE_CPU`` and ``MASTER_ADDR``/``MASTER_PORT`` but no rank.
Commands that shard work (``train``, ``eval``) call ``cpu_processes_requested()`` and, when it is above
one, start that many workers themselves with ``torch.distributed.run`` (gloo backend); each worker then
sees the usual ``RANK``/``WORLD_SIZE`` variables and accelerate sets up the process group as it does on
GPUs. Elsewhere (GPUs, ``torchrun``, ``mpirun``, one process) nothing changes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


def _parent_arguments() -> list[str]:
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _num_processes(argv: Sequence[str]) -> int:
    """``--num_processes`` of an ``accelerate launch`` command line, parsed by accelerate's own parser."""
    from accelerate.commands.launch import launch_command_parser

    # `accelerate launch ...` or `python -m accelerate.commands.launch ...`
    marks = [i for i, a in enumerate(argv) if a == "launch" or a.endswith("accelerate.commands.launch")]
    if not marks:
        return 1
    args, _ = launch_command_parser().parse_known_args(list(argv[marks[0] + 1 :]))
    return int(args.num_processes or 1)


def cpu_processes_requested() -> int:
    """N when this process was started by ``accelerate launch --cpu --num_processes N`` (N > 1), else 1."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("true", "1"):
        return 1
    if any(v in os.environ for v in RANK_VARIABLES) or "MASTER_ADDR" not in os.environ:
        return 1
    try:
        return max(1, _num_processes(_parent_arguments()))
    except (ValueError, SystemExit):  # not a command line accelerate's parser understands
        return 1


def launch_cpu_workers(n: int, argv: Sequence[str]) -> int:
    """Run ``python -m recursivemas ARGV`` in ``n`` gloo worker processes; return their exit status."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={n}",
        f"--master_addr={os.environ.get('MASTER_ADDR', '127.0.0.1')}",
        f"--master_port={os.environ.get('MASTER_PORT', '29500')}",
        "-m",
        "recursivemas",
        *argv,
    ]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    return subprocess.call(command, env=env)
