"""Int8 weight-only quantisation of the agents' transformer layers and LM heads (``--dtype int8``), for CPUs.

Every ``nn.Linear`` inside an agent's backbone (the attention and MLP projections), and its LM head,
becomes an ``Int8Linear``, which keeps two copies of its weight: the bfloat16 weight it was loaded with,
and that weight rounded to int8 with one bfloat16 scale per output channel. Up to ``INT8_MAX_ROWS`` input
rows (the one-position latent and decode steps of batches of up to 8, nearly all of a batch-1 answer's
time) are multiplied by PyTorch's own int8 weight-only kernel (``torch._weight_int8pack_mm``, the one
gpt-fast uses) with bfloat16 activations; more rows (a prompt pass, a large batch) by the bfloat16 weight,
exactly as ``--dtype bfloat16`` computes them. The agents are loaded in bfloat16 first, so embeddings and
norms are bfloat16; links stay float32, as with ``--dtype bfloat16``. Fingerprints are taken before
quantising (they are cached), so checkpoints and shipped links still match.

Keeping the bfloat16 weight costs memory (3 bytes per weight against float32's 4) and saves time: the
first version multiplied prompt passes by a weight dequantised on every call, 1.1 s of a 6.3 s batch-1
answer of the default preset (``benchmarks/results/RESULTS.md``, dtype and quantisation).

torchao's ``Int8WeightOnlyConfig`` (0.18) and torch's ``quantize_dynamic`` were measured first: the former
is slower than float32 on these CPUs, eager or compiled; the latter (int8 activations too) is fast but
breaks the default preset's answers.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from recursivemas.errors import ConfigError
from recursivemas.fileio import WRITE_ERRORS, atomic_write
from recursivemas.models.bundled import cache_root
from recursivemas.system import RecursiveMAS

INT8_KERNEL = "_weight_int8pack_mm"
INT8_CACHE_FORMAT = 1
"""Version of ``quantize_weight``'s output in int8 cache files; files of another version are rewritten."""
INT8_MAX_ROWS = 8
"""Inputs with more rows (a prompt pass, a large batch) multiply by the bfloat16 weight instead:
the int8 kernel is a matrix-vector loop whose time grows with the rows, bfloat16 GEMMs use AMX/AVX512-BF16
(measured on these CPUs: int8 wins up to 8 rows, bfloat16 from 16)."""


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) weight -> (int8 (out, in), bfloat16 (out,)), symmetric per output channel:
    ``s_o = max_i |w_oi| / 127`` (in float32, at least 1e-12), ``q_oi = clamp(round(w_oi / s_o), -127, 127)``;
    ``q * s`` is the weight the int8 kernel multiplies by."""
    # max |w| per row from the row's min and max: exact, and no float32 copy of the weight (loading the
    # default preset in int8 spent 2.5 of its 3.7 s of quantisation allocating such copies)
    low, high = weight.aminmax(dim=1)  # (out,) each
    scales = torch.maximum(high.float(), -low.float()).clamp(min=1e-12) / 127  # (out,) float32
    rounded = weight.to(torch.float32, copy=True)  # the one float32 copy, rounded in place
    rounded.div_(scales[:, None]).round_().clamp_(-127, 127)
    return rounded.to(torch.int8), scales.to(torch.bfloat16)


class Int8Linear(nn.Module):
    """A frozen ``nn.Linear`` computing in bfloat16: int8 weights (symmetric, per output channel) for up to
    ``INT8_MAX_ROWS`` rows, its bfloat16 weight for more."""

    def __init__(self, linear: nn.Linear, quantized: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Quantise ``linear``'s weight, or take ``quantized`` = ``quantize_weight(linear.weight)`` as
        computed before (``quantize_agents``' cache)."""
        super().__init__()
        weight = linear.weight.detach()
        qweight, scales = quantized if quantized is not None else quantize_weight(weight)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", weight.to(torch.bfloat16))  # (out, in), shared if already bfloat16
        self.register_buffer("qweight", qweight)  # (out, in) int8
        self.register_buffer("scales", scales)  # (out,) bfloat16
        bias = linear.bias.detach().to(torch.bfloat16) if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out), computed in bfloat16 whatever ``x``'s dtype."""
        # (rows, in), row-major: a strided last-position slice (the LM head's input) would make F.linear
        # expand the weight (see ``agent._row_major_head_inputs``)
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        return self.step_op(flat.shape[0])(flat).reshape(*x.shape[:-1], self.out_features)

    def step_op(self, rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """The product for row-major (``rows``, in) bfloat16 inputs as a plain function, its kernel chosen
        by ``rows``: what ``forward`` runs after its reshape and cast, and what ``fast_step.FastSteps``
        calls directly (7 times a layer, 210 times a SmolLM2 step, where the checks and casts of
        ``forward`` were a quarter of an int8 step's time)."""
        qweight, scales, weight, bias = self.qweight, self.scales, self.weight, self.bias
        if rows > INT8_MAX_ROWS:
            return lambda x: F.linear(x, weight, bias)
        if bias is None:
            return lambda x: torch._weight_int8pack_mm(x, qweight, scales)
        return lambda x: torch._weight_int8pack_mm(x, qweight, scales) + bias

    def dequantized(self) -> torch.Tensor:
        """(out, in) float32 weight the int8 path multiplies by."""
        return self.qweight.float() * self.scales.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


def has_int8_kernel() -> bool:
    """Whether this torch has the int8 weight-only kernel ``Int8Linear`` uses."""
    return hasattr(torch, INT8_KERNEL)


def check_int8_support() -> None:
    """Raise a ``ConfigError`` saying what to install if this torch lacks the int8 weight-only kernel."""
    if not has_int8_kernel():
        raise ConfigError(
            f"--dtype int8 needs PyTorch's int8 weight-only kernel (torch.{INT8_KERNEL}, torch >= 2.3); "
            f"this is torch {torch.__version__}: install a newer torch (this project uses torch==2.13.0) "
            "or use --dtype bfloat16 / float32"
        )


def quantize_module(module: nn.Module) -> int:
    """Replace every ``nn.Linear`` under ``module`` with an ``Int8Linear`` in place; return how many."""
    count = 0
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear(child))
            count += 1
        else:
            count += quantize_module(child)
    return count


def int8_cache_dir() -> Path:
    """Where ``load_system`` keeps int8 weights: ``$RECURSIVEMAS_CACHE/int8`` (default
    ``~/.cache/recursivemas/int8``), one safetensors file per model folder."""
    return cache_root() / "int8"


def quantize_agents(system: RecursiveMAS, cache_dir: Path | None = None) -> RecursiveMAS:
    """Quantise every agent's backbone Linear layers and LM head to int8 weight-only in place; return
    ``system``.

    The agents must be bfloat16 and on the CPU; a model shared by several agents is quantised once. A head
    tied to the input embeddings keeps sharing its bfloat16 weight with them (``Int8Linear.weight``).

    With ``cache_dir``, a model loaded unchanged from a local folder of safetensors (a bundled model's cache,
    a downloaded checkpoint) takes its int8 weights from ``cache_dir``, or quantises and saves them there:
    the default preset loads 1 s faster from the cache. A cached file is used only if the folder's
    safetensors have the names, sizes and modification times they had when it was written, every layer's
    shapes match and three rows per layer requantise to the cached ones; otherwise it is rewritten.
    Only pass ``cache_dir`` for weights as ``from_pretrained`` left them (``load_system`` does).
    """
    check_int8_support()
    agents = list(system.agents.values())
    if any(agent.device.type != "cpu" for agent in agents):
        raise ConfigError("--dtype int8 runs on the CPU only; use --device cpu (or bfloat16 on a GPU)")
    if any(agent.dtype != torch.bfloat16 for agent in agents):
        raise ConfigError("--dtype int8 quantises bfloat16 agents; load them with dtype bfloat16 first")
    done: set[int] = set()
    for agent in agents:
        agent.fingerprint()  # cached before the weights change
        if id(agent.model) not in done:
            done.add(id(agent.model))
            linears = _quantized_linears(agent.model, agent.backbone)
            entry = _cache_entry(agent.model, cache_dir) if cache_dir is not None else None
            quantized = _read_cache(*entry, linears) if entry else None
            if quantized is None:
                quantized = {name: quantize_weight(layer.weight.detach()) for name, layer in linears.items()}
                if entry:
                    _write_cache(*entry, quantized)
            for name, linear in linears.items():
                parent, _, attribute = name.rpartition(".")
                setattr(agent.model.get_submodule(parent), attribute, Int8Linear(linear, quantized[name]))
    return system


def _quantized_linears(model: nn.Module, backbone: nn.Module) -> dict[str, nn.Linear]:
    """``{name in model: layer}`` for the Linear layers int8 replaces: the backbone's and the LM head."""
    chosen = {id(m) for m in backbone.modules() if isinstance(m, nn.Linear)}
    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear):
        chosen.add(id(head))
    return {name: m for name, m in model.named_modules() if id(m) in chosen}


def _cache_entry(model: nn.Module, cache_dir: Path) -> tuple[Path, str] | None:
    """(cache file, signature of the model's files) for a model loaded from a local folder of safetensors;
    ``None`` for others (built from a config, a hub id)."""
    folder = Path(getattr(model, "name_or_path", "") or "")
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    folder = folder.resolve()
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    signature = hashlib.sha256(json.dumps([INT8_CACHE_FORMAT, str(folder), stats]).encode()).hexdigest()
    name = hashlib.sha256(str(folder).encode()).hexdigest()[:16]
    return cache_dir / f"{folder.name}-{name}.safetensors", signature


def _read_cache(
    path: Path, signature: str, linears: dict[str, nn.Linear]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """``{name: (qweight, scales)}`` from ``path`` (memory-mapped) if it holds ``signature`` and every layer
    checks out, else ``None`` (saying why on stderr when a file was there)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("signature") != signature:
                return _stale(path, "its model's files changed")
        tensors = load_file(path)
    except (SafetensorError, OSError) as err:
        return _stale(path, f"it is unreadable ({err})")
    if set(tensors) != {f"{name}.{part}" for name in linears for part in ("qweight", "scales")}:
        return _stale(path, "its layers differ from the model's")
    quantized = {}
    for name, linear in linears.items():
        qweight, scales = tensors[f"{name}.qweight"], tensors[f"{name}.scales"]
        weight = linear.weight.detach()  # (out, in)
        if (qweight.dtype, qweight.shape, scales.dtype, scales.shape) != (
            torch.int8,
            weight.shape,
            torch.bfloat16,
            weight.shape[:1],
        ):
            return _stale(path, f"layer {name} has the wrong shape or dtype")
        rows = sorted({0, weight.shape[0] // 2, weight.shape[0] - 1})
        q_rows, s_rows = quantize_weight(weight[rows])
        if not (torch.equal(q_rows, qweight[rows]) and torch.equal(s_rows, scales[rows])):
            return _stale(path, f"layer {name} does not match the model's weights")
        quantized[name] = (qweight, scales)
    return quantized


def _write_cache(path: Path, signature: str, quantized: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Save ``quantized`` to ``path`` atomically; a failed write (full disk, read-only cache) only costs the
    next load its quantisation, so it is reported on stderr, not raised."""
    tensors = {}
    for name, (qweight, scales) in quantized.items():
        tensors[f"{name}.qweight"], tensors[f"{name}.scales"] = qweight, scales
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"signature": signature}))
    except WRITE_ERRORS as err:
        print(f"recursivemas: could not cache int8 weights in {path} ({err})", file=sys.stderr, flush=True)


def _stale(path: Path, reason: str) -> None:
    print(f"recursivemas: requantising to int8: {path} is stale, {reason}", file=sys.stderr, flush=True)
    return None
