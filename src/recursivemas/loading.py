"""Turning CLI-level names (preset, checkpoint, dtype, device) into a loaded system."""

from __future__ import annotations

import sys
import time

import torch

from recursivemas import models
from recursivemas.agent import StepConfig
from recursivemas.errors import ConfigError
from recursivemas.presets import DEFAULT_PRESET, build_preset
from recursivemas.quantize import (
    FP16_WEIGHTS,
    check_fp16_weight_support,
    check_int8_support,
    fp16_weight_agents,
    has_fp16_weight_kernel,
    has_int8_kernel,
    int8_cache_dir,
    low_bit_agent_dtype,
    native_bfloat16,
    quantize_agents,
)
from recursivemas.system import RecursiveMAS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZED = ("int4", "int8")
"""Quantised ``--dtype`` names: agents load in ``quantize.low_bit_agent_dtype()`` (bfloat16 or float32,
by the CPU), then their Linear layers are quantised."""
CPU_ONLY = (FP16_WEIGHTS, *QUANTIZED)
"""``--dtype`` names whose kernels run on the CPU only: the low-bit ones and ``fp16w`` (float32 agents
whose Linear layers multiply by float16 weights, ``quantize.Fp16Linear``)."""
AUTO = "auto"
"""The default ``--dtype``: int8 on the CPU (``resolve_dtype``), float32 elsewhere."""
DTYPE_CHOICES = [AUTO, *sorted([*DTYPES, *CPU_ONLY])]
"""Every ``--dtype`` value ``load_system`` takes."""
DTYPE_HELP = (
    "agent weights (default auto: int8 on the CPU, float32 on other devices); int8: int8 weight-only "
    "one-position steps, prompt passes and the rest in bfloat16 on CPUs with bfloat16 units, else float32 "
    "(CPU only); int4: as int8, with 4-bit layers "
    "where the weights are 4-bit at source (faster; see the README); fp16w: float32 agents whose layers "
    "multiply by float16 weights (x86 CPUs only; answers as float32's, faster than int8 on AVX2-only CPUs "
    "once loaded, packs its weights at every load); links always compute in float32"
)
"""The ``--dtype`` help of every command that loads a system."""
COMPILE_HELP = (
    "static KV cache and torch.compile for latent and decode steps (for GPUs: CUDA graphs; "
    "the first steps of each batch size compile, minutes on a CPU)"
)
"""The ``--compile`` help of every command that loads a system."""


def resolve_device(device: str) -> str:
    """Check that ``device`` exists here; raise a ``ConfigError`` naming the alternatives if not."""
    kind, _, index = device.partition(":")
    if kind == "cpu" and not index:
        return device
    if kind == "cuda" and (not index or index.isdigit()):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for, but CUDA is not available here; use --device cpu")
        if index and int(index) >= torch.cuda.device_count():
            raise ConfigError(
                f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
        return device
    if kind == "mps" and not index:
        if not torch.backends.mps.is_available():
            raise ConfigError("--device mps was asked for, but MPS is not available here; use --device cpu")
        return device
    raise ConfigError(f"unknown --device {device!r}; use cpu, cuda, cuda:N or mps")


def resolve_dtype(dtype_name: str, device: str) -> str:
    """``dtype_name``, with ``auto`` made concrete: ``int8`` on the CPU when this torch has the int8 kernel
    (x2.1 the speed of float32 on the default preset on CPUs with AVX512-BF16, x1.2-1.6 on AVX2-only ones,
    with accuracy within float32's interval: ``benchmarks/results/RESULTS.md``, dtype and quantisation),
    ``float32`` otherwise.

    Raises ``ConfigError`` for a name that is not a ``--dtype`` choice, or (for ``auto``) a device that
    ``resolve_device`` rejects.
    """
    if dtype_name not in DTYPE_CHOICES:
        raise ConfigError(f"unknown --dtype {dtype_name!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    if dtype_name != AUTO:
        return dtype_name
    return "int8" if torch.device(resolve_device(device)).type == "cpu" and has_int8_kernel() else "float32"


def agent_dtype(dtype_name: str) -> torch.dtype:
    """The dtype agents load in for the concrete ``--dtype`` ``dtype_name`` (before any quantisation):
    ``low_bit_agent_dtype()`` for int8 / int4, float32 for fp16w, else the dtype named."""
    if dtype_name in QUANTIZED:
        return low_bit_agent_dtype()
    return torch.float32 if dtype_name == FP16_WEIGHTS else DTYPES[dtype_name]


def load_system(
    preset: str | None,
    checkpoint: str | None,
    dtype_name: str,
    device: str,
    init: str | None = None,
    allow_hub: bool = False,
    compile: bool = False,
) -> RecursiveMAS:
    """Build the preset (links by ``init``, default: the preset's) or load the checkpoint named.

    ``allow_hub`` lets a checkpoint name models on the Hugging Face Hub (see ``checkpoint.from_pretrained``).
    ``compile`` (``--compile``) runs every agent's latent and decode steps over a static KV cache through
    ``torch.compile`` (``StepConfig(compile=True)``); otherwise they run eagerly over a dynamic cache.
    """
    if preset and checkpoint:
        raise ConfigError("give either --preset or --checkpoint, not both")
    if checkpoint and init:
        raise ConfigError("--init applies to presets; a checkpoint brings its own links")
    device = resolve_device(device)
    asked, dtype_name = dtype_name, resolve_dtype(dtype_name, device)
    if dtype_name in CPU_ONLY:  # checked before loading anything
        if torch.device(device).type != "cpu":
            raise ConfigError(
                f"--dtype {dtype_name} runs on the CPU only; use --device cpu (or bfloat16 on a GPU)"
            )
        if dtype_name == FP16_WEIGHTS:
            check_fp16_weight_support()
        else:
            check_int8_support(int4=dtype_name == "int4")
    dtype = agent_dtype(dtype_name)
    source = f"checkpoint {checkpoint}" if checkpoint else f"preset {preset or DEFAULT_PRESET}"
    print(f"recursivemas: loading {source} ({dtype_name} on {device})...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    if checkpoint:
        system = RecursiveMAS.from_pretrained(checkpoint, dtype=dtype, device=device, allow_hub=allow_hub)
    else:
        system = build_preset(preset or DEFAULT_PRESET, dtype=dtype, device=device, init=init)
    if dtype_name == FP16_WEIGHTS:
        system = fp16_weight_agents(system)
    elif dtype_name in QUANTIZED:
        system = quantize_agents(system, cache_dir=int8_cache_dir(), int4=dtype_name == "int4")
    system.set_step_config(StepConfig(compile=compile))
    seconds = time.perf_counter() - start
    # the weight-only forms keep embeddings, norms and attention in a dtype their name does not say
    agents = f" (agents in {models.dtype_name(dtype)})" if dtype_name in CPU_ONLY else ""
    print(f"recursivemas: loaded in {seconds:.1f}s{agents}", file=sys.stderr, flush=True)
    for tip in (compile_tip(device, compile), dtype_tip(asked, dtype_name)):
        if tip:
            print(f"recursivemas: tip: {tip}", file=sys.stderr, flush=True)
    return system


def dtype_tip(asked: str, dtype_name: str) -> str | None:
    """Advice for ``--dtype auto`` resolved to int8 on a CPU without bfloat16 units (AVX2 only), where
    torch's int8 kernel is compute-bound: ``fp16w`` answers as float32 does, as fast once loaded
    (``benchmarks/results/RESULTS.md``, "fp16w")."""
    if (asked, dtype_name) != (AUTO, "int8") or native_bfloat16() or not has_fp16_weight_kernel():
        return None
    return (
        f"this CPU has no bfloat16 units: --dtype {FP16_WEIGHTS} gives float32's answers (int8's differ on "
        "about 1 question in 10), as fast as int8 at batch 1 and faster in batches, for about 2.5 s more "
        "loading and 1.5 GB more memory; worth it for eval and serve"
    )


def compile_tip(device: str, compile: bool) -> str | None:
    """Advice for a system loaded on ``device`` with steps compiled or not: on CUDA without ``--compile``,
    to add it (one-position steps of small models are bound by kernel launches there)."""
    if torch.device(device).type != "cuda" or compile:
        return None
    return (
        "add --compile on CUDA; eager one-position steps of small models are bound by kernel launches, "
        "which its CUDA graphs remove (0.8 ms against 27 ms a step on an H200, after a one-time compile)"
    )
