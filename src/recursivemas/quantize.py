"""Weight-only quantisation of the agents' transformer layers and LM heads, for CPUs: ``--dtype int8``
(the CPU default), ``--dtype int4`` and ``--dtype fp16w`` (at the end).

Every ``nn.Linear`` inside an agent's backbone (the attention and MLP projections), and its LM head,
becomes an ``Int8Linear``, or with ``--dtype int4`` an ``Int4Linear`` where that is as exact
(``quantize_layer`` picks, per layer); either keeps two copies of its weight: the one it was loaded with
(bfloat16 or float32, see below), and a low-bit one. Up to ``INT8_MAX_ROWS`` input rows (the one-position
latent and decode steps of batches of up to 8, nearly all of a batch-1 answer's time) are multiplied by
the low-bit weight with bfloat16 activations, by PyTorch's own kernels; more rows (a prompt pass, a large
batch) by the loaded weight, exactly as ``--dtype bfloat16`` (or float32) computes them. The low-bit
forms:

* int8, symmetric, one bfloat16 scale per output channel (``torch._weight_int8pack_mm``, the kernel
  gpt-fast uses): about 1% relative error on any weight;
* int4 in groups of 32 inputs, asymmetric (torch's CPU int4 kernel ``_weight_int4pack_mm_for_cpu``),
  only with ``--dtype int4`` and for layers where its error is no larger than int8's: weights that were
  4-bit per group at source, as the bundled SmolLM2 is (Q4_1 GGUF), come back exactly up to bfloat16
  scales (0.25% error), at half int8's bytes and 2.6 times its speed. Gemma-3's layers stay int8: its
  GGUF holds most of them in 5, 6 or 8 bits, and its Q4_K ones have fitted group scales that a min-max
  requantisation does not recover (4.5% error against int8's 1.1%); so do the LM heads (8-bit tied
  embeddings). Not the default: on the default preset's relay questions it turned 8 right answers wrong
  against int8's 4 (``benchmarks/results/RESULTS.md``).

``load_system`` loads the agents in ``low_bit_agent_dtype()`` first: bfloat16 on CPUs that multiply it in
hardware (AVX512-BF16, AMX), float32 on the others (AVX2 only), where bfloat16 prompt passes cost more
than the int8 steps save. Embeddings, norms and attention compute in that dtype; links stay float32.
Fingerprints are taken before quantising (they are cached), so checkpoints and
shipped links still match. ``quantize_agents`` can cache the quantised layers per model folder, so that
quantisation runs once per machine.

Keeping the loaded weight costs memory (bfloat16: 3 bytes per weight against float32's 4 for int8; float32:
5) and saves time:
the first version multiplied prompt passes by a weight dequantised on every call, 1.1 s of a 6.3 s batch-1
answer of the default preset (``benchmarks/results/RESULTS.md``, dtype and quantisation).

torchao's ``Int8WeightOnlyConfig`` (0.18) and torch's ``quantize_dynamic`` were measured first: the former
is slower than float32 on these CPUs, eager or compiled; the latter (int8 activations too) is fast but
breaks the default preset's answers.

``--dtype fp16w`` (``Fp16Linear``, ``fp16_weight_agents``) keeps float32 agents and activations and
rounds only the same layers' weights to float16, multiplied by fbgemm's float16 GEMM (the kernel of torch's
``quantize_dynamic(..., dtype=torch.float16)``) at every row count. Its error is float16's (0.03%), not
int8's (1%), and on CPUs without bfloat16 units, where torch's int8 kernel is compute-bound, it is at least
as fast as int8 once loaded; but fbgemm's packed weights cannot be cached, so every load packs them
(about 2.5 s for the default preset on two threads).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from recursivemas.errors import ConfigError
from recursivemas.fileio import WRITE_ERRORS, atomic_write
from recursivemas.models import dtype_name, loaded_weight_files
from recursivemas.models.bundled import cache_root
from recursivemas.system import RecursiveMAS

INT8_KERNEL = "_weight_int8pack_mm"
INT4_KERNEL, INT4_PACK = "_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu"
INT4_GROUP = 32
"""Input channels per 4-bit group: GGUF's Q4_0/Q4_1/Q4_K blocks (SmolLM2's layers are Q4_1 at source)."""
INT4_SAMPLE_ROWS = 256
"""Rows (strided) on which a layer's int4 and int8 errors are compared to choose its form."""
INT8_CACHE_FORMAT = 2
"""Version of the quantised layers' form in cache files (2: int4 layers); files of another version, or
written by another torch (the int4 packing is torch's), are rewritten."""
INT8_MAX_ROWS = 8
"""Inputs with more rows (a prompt pass, a large batch) multiply by the loaded weight instead: the int8
kernel is a matrix-vector loop whose time grows with the rows, bfloat16 GEMMs use AMX/AVX512-BF16
(measured on CPUs with them: int8 wins up to 8 rows, bfloat16 from 16)."""

FP16_WEIGHTS = "fp16w"
"""The ``--dtype`` of float16 weight-only layers (``Fp16Linear``) over float32 agents."""
FP16_PREPACK, FP16_KERNEL = "linear_prepack_fp16", "linear_dynamic_fp16"
"""fbgemm's float16 weight packing and GEMM, as ``torch.ops.quantized`` names them."""
FP16_BLOCK_ROWS = 32768
"""Output rows packed together by ``Fp16Linear``: every transformer layer of the bundled models is one
block, Gemma-3's LM head eight, which pack in parallel."""

LOW_BIT_AGENT_DTYPES = (torch.bfloat16, torch.float32)
"""Dtypes of the agents ``quantize_agents`` takes: their embeddings, norms, attention and prompt passes
(more than ``INT8_MAX_ROWS`` rows) compute in it; ``low_bit_agent_dtype`` picks one for this CPU."""

LOW_BIT_AGENTS_ENV = "RECURSIVEMAS_LOW_BIT_AGENTS"
"""Overrides ``low_bit_agent_dtype``'s choice by the CPU: ``bfloat16`` or ``float32``."""

Quantized = dict[str, torch.Tensor]
"""One layer's quantised tensors: ``qweight`` and ``scales`` (int8) or ``qweight4`` and
``scales_and_zeros`` (int4), as ``Int8Linear`` / ``Int4Linear`` hold them and cache files store them."""


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


def quantize_weight_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) weight -> (codes (out, in) int32 in 0..15, scales_and_zeros (in / G, out, 2) bfloat16):
    asymmetric per group of G = ``INT4_GROUP`` inputs, ``s = (max - min) / 15``, ``q = round((w - min) / s)``,
    zero ``z = min + 8 s``; the kernel multiplies by ``(q - 8) s + z``. A weight that is 4-bit per group at
    source (a Q4_1 GGUF's) comes back exactly, up to the bfloat16 rounding of ``s`` and ``z``."""
    out, inputs = weight.shape
    groups = weight.to(torch.float32, copy=True)  # a copy: codes are computed in place below
    groups = groups.reshape(out, inputs // INT4_GROUP, INT4_GROUP)  # (out, in / G, G)
    low, high = groups.aminmax(dim=-1)  # (out, in / G) each
    scales = ((high - low) / 15).clamp(min=1e-12)
    codes = groups.sub_(low[..., None]).div_(scales[..., None]).round_().clamp_(0, 15)
    scales_and_zeros = torch.stack([scales, low + 8 * scales], dim=-1).transpose(0, 1)  # (in / G, out, 2)
    return codes.reshape(out, inputs).to(torch.int32), scales_and_zeros.to(torch.bfloat16).contiguous()


def int4_dequantized(codes: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """(out, in) float32 weight ``(q - 8) s + z`` of ``quantize_weight_int4``'s output."""
    out, inputs = codes.shape
    scale, zero = scales_and_zeros.float().transpose(0, 1).unbind(-1)  # (out, in / G) each
    groups = (codes.float().reshape(out, -1, INT4_GROUP) - 8) * scale[..., None] + zero[..., None]
    return groups.reshape(out, inputs)


def _relative_error(approx: torch.Tensor, weight: torch.Tensor) -> float:
    return float((approx - weight.float()).norm() / weight.float().norm().clamp(min=1e-30))


def quantize_layer(weight: torch.Tensor, int4: bool = False) -> Quantized:
    """A layer's quantised tensors: int8 per channel (``Int8Linear``), or with ``int4`` the better of two
    forms: 4-bit groups (``Int4Linear``) where this torch has the int4 kernel, the shape allows it (out a
    multiple of 16, in of ``INT4_GROUP``) and its error ``||W_q - W|| / ||W||`` on ``INT4_SAMPLE_ROWS``
    strided rows is no larger than int8's, else int8. Weights that were 4-bit at source take int4
    (SmolLM2's layers: 0.25% against int8's 1%), others int8 (random or 5/6/8-bit weights: int4 is 4-9
    times int8's error)."""
    out, inputs = weight.shape
    if int4 and has_int4_kernel() and out % 16 == 0 and inputs % INT4_GROUP == 0:
        sample = weight[:: max(1, out // INT4_SAMPLE_ROWS)]  # (<= 2 x INT4_SAMPLE_ROWS, in)
        q8, s8 = quantize_weight(sample)
        int8_error = _relative_error(q8.float() * s8.float()[:, None], sample)
        if _relative_error(int4_dequantized(*quantize_weight_int4(sample)), sample) <= int8_error:
            codes, scales_and_zeros = quantize_weight_int4(weight)
            packed = getattr(torch.ops.aten, INT4_PACK)(codes, 1)  # (out, in / 2) uint8
            return {"qweight4": packed, "scales_and_zeros": scales_and_zeros}
    qweight, scales = quantize_weight(weight)
    return {"qweight": qweight, "scales": scales}


def quantized_linear(
    linear: nn.Linear, quantized: Quantized | None = None, int4: bool = False
) -> LowBitLinear:
    """``linear`` as an ``Int4Linear`` or ``Int8Linear``: the form ``quantize_layer(weight, int4)`` picks,
    or the one ``quantized`` (its earlier output, from a cache) holds."""
    quantized = quantize_layer(linear.weight.detach(), int4) if quantized is None else quantized
    if "qweight4" in quantized:
        return Int4Linear(linear, quantized["qweight4"], quantized["scales_and_zeros"])
    return Int8Linear(linear, (quantized["qweight"], quantized["scales"]))


class LowBitLinear(nn.Module):
    """A frozen ``nn.Linear`` computing in its weight's dtype (``LOW_BIT_AGENT_DTYPES``): low-bit weights
    (``_product``) for up to ``INT8_MAX_ROWS`` rows, its own weight (the one it was loaded with, shared)
    for more. The low-bit kernels take bfloat16 inputs; a float32 layer casts its input to bfloat16 for them
    and their output back. (``Fp16Linear`` picks no kernel by rows: it overrides ``step_op``.)"""

    form = ""
    kernel_rows = INT8_MAX_ROWS
    """Inputs of up to this many rows take the low-bit kernel, larger ones the loaded weight (0: one kernel
    for all; ``cache.PromptPrefixes`` keeps a shortened prompt pass on the same side)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach()
        if weight.dtype not in LOW_BIT_AGENT_DTYPES:
            raise ConfigError(f"low-bit layers wrap bfloat16 or float32 Linear layers, not {weight.dtype}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", weight)  # (out, in), shared
        self.register_buffer("bias", linear.bias.detach() if linear.bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out), computed in the weight's dtype whatever ``x``'s."""
        # (rows, in), row-major: a strided last-position slice (the LM head's input) would make F.linear
        # expand the weight (see ``agent._row_major_head_inputs``)
        flat = x.reshape(-1, self.in_features).to(self.weight.dtype).contiguous()
        return self.step_op(flat.shape[0])(flat).reshape(*x.shape[:-1], self.out_features)

    def step_op(self, rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """The product for row-major (``rows``, in) inputs of the weight's dtype as a plain function, its
        kernel chosen by ``rows``: what ``forward`` runs after its reshape and cast, and what
        ``fast_step.FastSteps`` calls directly (7 times a layer, 210 times a SmolLM2 step, where the checks
        and casts of ``forward`` were a quarter of an int8 step's time)."""
        weight, bias = self.weight, self.bias
        if rows > INT8_MAX_ROWS:
            return lambda x: F.linear(x, weight, bias)
        product = self._product()  # bfloat16 in and out
        if weight.dtype != torch.bfloat16:
            product = _through_bfloat16(product, weight.dtype)
        if bias is None:
            return product
        return lambda x: product(x) + bias

    def read_tensors(self, rows: int) -> list[torch.Tensor]:
        """The tensors a product of ``rows`` rows reads (``benchmarks/roofline.py`` counts their bytes)."""
        weights = self.low_bit_tensors() if rows <= INT8_MAX_ROWS else [self.weight]
        return [*weights, *([self.bias] if self.bias is not None else [])]

    def _product(self) -> Callable[[torch.Tensor], torch.Tensor]:
        raise NotImplementedError

    def low_bit_tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def dequantized(self) -> torch.Tensor:
        """(out, in) float32 weight the low-bit path multiplies by."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.form} weight-only"


class Fp16Linear(LowBitLinear):
    """A frozen float32 ``nn.Linear`` multiplying by its weight rounded to float16 (``--dtype fp16w``), at
    every row count, by fbgemm's float16 GEMM: PyTorch's dynamic float16 quantisation kernel
    (``torch.ops.quantized.linear_dynamic_fp16``), which widens the packed float16 weight to float32 in
    registers. Float32 rows in and out, float32 arithmetic, half float32's bytes read. Rounding a weight to
    float16 costs about 0.03% relative error (int8: 1%); an AVX2-only CPU multiplies faster than in
    float32 at every row count (SmolLM2's 210 layers, 2 threads: 12.7 ms against 26.9 ms at 1 row, 19.3
    against 53.0 at 8, 88.2 against 135.3 at 64; ``benchmarks/linear_kernels.py``, ``results/RESULTS.md``).

    The packed weight is fbgemm's own object, not a tensor: it cannot be saved (torch saves it as the
    float32 weight), so every load packs again, at about 50-100M weights a second on one thread. It is
    packed in blocks of ``FP16_BLOCK_ROWS`` output rows (``packed``, one per block), so that the blocks of
    a large LM head (Gemma-3's 262k x 640: 3.3 s on one thread) pack on several threads
    (``fp16_weight_model``); each block's outputs are the whole matrix's columns, bit for bit."""

    form = FP16_WEIGHTS
    kernel_rows = 0

    def __init__(self, linear: nn.Linear, packed: list[object] | None = None) -> None:
        """Pack ``linear``'s weight, or take ``packed`` = ``fp16_blocks(linear)``'s output, packed before."""
        super().__init__(linear)
        if self.weight.dtype != torch.float32:
            raise ConfigError(
                f"--dtype {FP16_WEIGHTS} packs float32 Linear layers (its kernel takes float32 rows), "
                f"not {self.weight.dtype}"
            )
        self.packed = packed if packed is not None else [pack() for pack in fp16_blocks(linear)]

    def step_op(self, rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """The product for row-major (``rows``, in) float32 inputs, bias included: the same kernel for any
        ``rows``, the blocks' (rows, block) outputs concatenated."""
        kernel = _fp16_op(FP16_KERNEL)
        if len(self.packed) == 1:
            packed = self.packed[0]
            return lambda x: kernel(x, packed)
        return lambda x: torch.cat([kernel(x, block) for block in self.packed], dim=-1)

    def read_tensors(self, rows: int) -> list[torch.Tensor]:
        """Stand-ins (on the meta device) for the float16 weight the packed object holds, and the bias."""
        weight = torch.empty(self.weight.shape, dtype=torch.float16, device="meta")
        return [weight, *([self.bias] if self.bias is not None else [])]

    def dequantized(self) -> torch.Tensor:
        return self.weight.half().float()


def fp16_blocks(linear: nn.Linear) -> list[Callable[[], object]]:
    """One call per block of ``FP16_BLOCK_ROWS`` output rows of ``linear``, packing that block's weight
    (a row slice: a view) and bias for ``Fp16Linear``."""
    weight = linear.weight.detach()  # (out, in)
    bias = linear.bias.detach() if linear.bias is not None else None
    prepack, starts = _fp16_op(FP16_PREPACK), range(0, weight.shape[0], FP16_BLOCK_ROWS)
    rows = [slice(i, i + FP16_BLOCK_ROWS) for i in starts]
    return [partial(prepack, weight[r], None if bias is None else bias[r]) for r in rows]


def _fp16_op(name: str) -> Callable[..., object]:
    return getattr(torch.ops.quantized, name).default


def _through_bfloat16(
    product: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``product`` (bfloat16 in and out) for inputs and outputs of ``dtype``: two casts of a few rows."""
    return lambda x: product(x.to(torch.bfloat16)).to(dtype)


class Int8Linear(LowBitLinear):
    """Int8 weights, symmetric per output channel (``quantize_weight``), by ``torch._weight_int8pack_mm``."""

    form = "int8"

    def __init__(self, linear: nn.Linear, quantized: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Quantise ``linear``'s weight, or take ``quantized`` = ``quantize_weight(linear.weight)`` as
        computed before (``quantize_agents``' cache)."""
        super().__init__(linear)
        qweight, scales = quantized if quantized is not None else quantize_weight(linear.weight.detach())
        self.register_buffer("qweight", qweight)  # (out, in) int8
        self.register_buffer("scales", scales)  # (out,) bfloat16

    def _product(self) -> Callable[[torch.Tensor], torch.Tensor]:
        qweight, scales = self.qweight, self.scales
        return lambda x: torch._weight_int8pack_mm(x, qweight, scales)

    def low_bit_tensors(self) -> list[torch.Tensor]:
        return [self.qweight, self.scales]

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scales.float()[:, None]


class Int4Linear(LowBitLinear):
    """4-bit weights in groups of ``INT4_GROUP`` inputs (``quantize_weight_int4``), packed as torch packs
    them, through torch's CPU int4 kernel (``_weight_int4pack_mm_for_cpu``): half the bytes of int8, and
    2.6 times its speed on these CPUs (106M weights: 3.8 ms against 9.9 ms, 2 threads)."""

    form = "int4"

    def __init__(self, linear: nn.Linear, packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> None:
        super().__init__(linear)
        self.register_buffer("qweight4", packed)  # (out, in / 2) uint8, torch's int4 packing
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # (in / G, out, 2) bfloat16

    def _product(self) -> Callable[[torch.Tensor], torch.Tensor]:
        packed, scales_and_zeros, kernel = self.qweight4, self.scales_and_zeros, _int4_kernel()
        # the kernel assumes a contiguous input (rows strided apart, e.g. FastSteps' attention output at
        # batch 8, crash it), where the int8 one only needs each row contiguous
        return lambda x: kernel(x.contiguous(), packed, INT4_GROUP, scales_and_zeros)

    def low_bit_tensors(self) -> list[torch.Tensor]:
        return [self.qweight4, self.scales_and_zeros]

    def dequantized(self) -> torch.Tensor:
        identity = torch.eye(self.in_features, dtype=torch.bfloat16)  # row i of I W^T is column i of W
        return _int4_kernel()(identity, self.qweight4, INT4_GROUP, self.scales_and_zeros).float().t()


def _int4_kernel() -> Callable[..., torch.Tensor]:
    return getattr(torch.ops.aten, INT4_KERNEL).default


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX, as torch detects them)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def low_bit_agent_dtype() -> torch.dtype:
    """The dtype ``load_system`` loads agents in before quantising them (``--dtype int8`` / ``int4``):
    ``$RECURSIVEMAS_LOW_BIT_AGENTS`` (``bfloat16`` or ``float32``) if set, else bfloat16 where the CPU
    multiplies it natively (``native_bfloat16``) and float32 elsewhere. On an AVX2-only CPU, bfloat16
    matrix products of 8 to 256 rows took 2.8 to 8.3 times float32's time (1536 x 576, 2 threads), and the
    default preset's int8 answer with bfloat16 agents took 12.9 s against float32's 9.7 s
    (``benchmarks/results/RESULTS.md``).

    Raises ``ConfigError`` for another value of the variable."""
    choice = os.environ.get(LOW_BIT_AGENTS_ENV, "")
    if choice:
        choices = {dtype_name(d): d for d in LOW_BIT_AGENT_DTYPES}
        if choice not in choices:
            raise ConfigError(
                f"${LOW_BIT_AGENTS_ENV}={choice!r}: use one of {', '.join(sorted(choices))}, or unset it to "
                "let the CPU decide"
            )
        return choices[choice]
    return torch.bfloat16 if native_bfloat16() else torch.float32


def has_int8_kernel() -> bool:
    """Whether this torch has the int8 weight-only kernel ``Int8Linear`` uses."""
    return hasattr(torch, INT8_KERNEL)


def has_fp16_weight_kernel() -> bool:
    """Whether this torch has fbgemm's float16 weight-only kernel ``Fp16Linear`` uses (x86 builds)."""
    ops = torch.ops.quantized
    fbgemm = "fbgemm" in torch.backends.quantized.supported_engines
    return fbgemm and all(hasattr(ops, op) for op in (FP16_PREPACK, FP16_KERNEL))


def has_int4_kernel() -> bool:
    """Whether this torch has the CPU int4 kernel ``Int4Linear`` uses, and its packing."""
    return all(hasattr(torch.ops.aten, op) for op in (INT4_KERNEL, INT4_PACK))


def check_int8_support(int4: bool = False) -> None:
    """Raise a ``ConfigError`` saying what to install if this torch lacks the int8 weight-only kernel (or,
    with ``int4``, the int4 one)."""
    if not has_int8_kernel():
        raise ConfigError(
            f"--dtype int8 needs PyTorch's int8 weight-only kernel (torch.{INT8_KERNEL}, torch >= 2.3); "
            f"this is torch {torch.__version__}: install a newer torch (this project uses torch==2.13.0) "
            "or use --dtype bfloat16 / float32"
        )
    if int4 and not has_int4_kernel():
        raise ConfigError(
            f"--dtype int4 needs PyTorch's CPU int4 kernel (torch.ops.aten.{INT4_KERNEL}, torch >= 2.6); "
            f"this is torch {torch.__version__}: install a newer torch or use --dtype int8"
        )


def check_fp16_weight_support() -> None:
    """Raise a ``ConfigError`` saying what to use instead if this torch lacks fbgemm's float16 kernel."""
    if not has_fp16_weight_kernel():
        engines = ", ".join(torch.backends.quantized.supported_engines)
        raise ConfigError(
            f"--dtype {FP16_WEIGHTS} needs fbgemm's float16 kernel (torch.ops.quantized.{FP16_KERNEL}, in "
            f"PyTorch's x86 builds); this torch {torch.__version__} has the quantized engines [{engines}]: "
            "use --dtype int8 or float32"
        )


def quantize_module(module: nn.Module, int4: bool = False) -> int:
    """Replace every ``nn.Linear`` under ``module`` by its ``quantized_linear`` in place; return how many."""
    count = 0
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, quantized_linear(child, int4=int4))
            count += 1
        else:
            count += quantize_module(child, int4)
    return count


def int8_cache_dir() -> Path:
    """Where ``load_system`` keeps quantised (int8 and int4) weights: ``$RECURSIVEMAS_CACHE/int8`` (default
    ``~/.cache/recursivemas/int8``), one safetensors file per model folder."""
    return cache_root() / "int8"


def quantize_agents(system: RecursiveMAS, cache_dir: Path | None = None, int4: bool = False) -> RecursiveMAS:
    """Quantise every agent's backbone Linear layers and LM head to int8 weight-only in place, with ``int4``
    to int4 where that is as exact (``quantize_layer``); return ``system``.

    The agents must be on the CPU, in bfloat16 or float32 (``LOW_BIT_AGENT_DTYPES``; what is not quantised
    and prompt passes compute in it); a model shared by several agents is quantised once. A head tied to the
    input embeddings keeps sharing its weight with them (``Int8Linear.weight``).

    With ``cache_dir``, a model loaded from a local folder (a bundled model's cache, a downloaded
    checkpoint; ``models.load_model`` records its weight files) takes its quantised layers from
    ``cache_dir``, or quantises and saves them there: the default preset loads 1-2 s faster from the cache.
    A cached file is used only if the folder's weight files have the names, sizes and modification times
    they had when the model that wrote it loaded (with this torch and format), every layer's shapes match
    and four rows per layer (one drawn at random) requantise to the cached ones (for int4: scales equal,
    products within 1%); otherwise it is rewritten.
    Only pass ``cache_dir`` for weights as they were loaded (``load_system`` does).
    """
    check_int8_support(int4)
    dtype_name = "int4" if int4 else "int8"
    if any(agent.dtype not in LOW_BIT_AGENT_DTYPES for agent in system.agents.values()):
        raise ConfigError(
            f"--dtype {dtype_name} quantises bfloat16 or float32 agents; load them in one of those first "
            "(quantize.low_bit_agent_dtype() picks the faster on this CPU)"
        )
    return _replace_in_models(system, dtype_name, partial(quantize_model, cache_dir=cache_dir, int4=int4))


def fp16_weight_agents(system: RecursiveMAS) -> RecursiveMAS:
    """Give every agent's backbone Linear layers and LM head float16 weights (``Fp16Linear``) in place;
    return ``system``. The agents must be float32 and on the CPU; a model shared by several agents is
    packed once, and a head tied to the input embeddings keeps sharing their float32 weight."""
    check_fp16_weight_support()
    if any(agent.dtype != torch.float32 for agent in system.agents.values()):
        raise ConfigError(f"--dtype {FP16_WEIGHTS} packs float32 agents; load them in float32 first")
    return _replace_in_models(system, FP16_WEIGHTS, fp16_weight_model)


def _replace_in_models(
    system: RecursiveMAS, dtype_name: str, replace: Callable[[nn.Module, nn.Module], None]
) -> RecursiveMAS:
    """``replace(model, backbone)`` once per distinct model of ``system``'s agents (which must be on the
    CPU, as ``--dtype dtype_name`` needs), after every agent's fingerprint is taken (and cached) from the
    weights as loaded, which checkpoints and shipped links expect; return ``system``."""
    agents = list(system.agents.values())
    if any(agent.device.type != "cpu" for agent in agents):
        raise ConfigError(
            f"--dtype {dtype_name} runs on the CPU only; use --device cpu (or bfloat16 on a GPU)"
        )
    done: set[int] = set()
    for agent in agents:
        agent.fingerprint()  # cached before the weights change
        if id(agent.model) not in done:
            done.add(id(agent.model))
            replace(agent.model, agent.backbone)
    return system


def fp16_weight_model(model: nn.Module, backbone: nn.Module) -> None:
    """Replace ``model``'s backbone Linear layers and LM head by ``Fp16Linear`` in place, their blocks
    (``fp16_blocks``) packed on ``torch.get_num_threads()`` threads (fbgemm packs a block on one thread)."""
    linears = _quantized_linears(model, backbone)
    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
        packing = {
            name: [pool.submit(pack) for pack in fp16_blocks(linear)] for name, linear in linears.items()
        }
        for name, linear in linears.items():
            _replace(model, name, Fp16Linear(linear, [block.result() for block in packing[name]]))


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent), attribute, layer)


def quantize_model(
    model: nn.Module, backbone: nn.Module, cache_dir: Path | None = None, int4: bool = False
) -> None:
    """Replace ``model``'s backbone Linear layers and LM head by their ``quantized_linear`` in place, reading
    and writing ``cache_dir`` as ``quantize_agents`` describes; ``backbone`` is ``model``'s decoder
    (``Agent.backbone``)."""
    linears = _quantized_linears(model, backbone)
    entry = _cache_entry(model, cache_dir, int4) if cache_dir is not None else None
    quantized = _read_cache(*entry, linears) if entry else None
    if quantized is None:
        quantized = {name: quantize_layer(layer.weight.detach(), int4) for name, layer in linears.items()}
        if entry:
            _write_cache(*entry, quantized)
    for name, linear in linears.items():
        _replace(model, name, quantized_linear(linear, quantized[name]))


def _quantized_linears(model: nn.Module, backbone: nn.Module) -> dict[str, nn.Linear]:
    """``{name in model: layer}`` for the Linear layers int8 (and fp16w) replaces: the backbone's and the
    LM head."""
    chosen = {id(m) for m in backbone.modules() if isinstance(m, nn.Linear)}
    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear):
        chosen.add(id(head))
    return {name: m for name, m in model.named_modules() if id(m) in chosen}


def _cache_entry(model: nn.Module, cache_dir: Path, int4: bool) -> tuple[Path, str] | None:
    """(cache file, signature) for a model loaded from a local folder whose weight files did not change
    while it loaded (``models.loaded_weight_files``); ``None`` for others (built from a config, a hub id).
    The file is one per folder and form (int8 / int4, with ``_float32`` for float32 agents, whose layers
    are quantised from float32 weights) for this torch version and cache format,
    ``<folder name>-<folder hash>-<form>-<torch and format hash>.safetensors``; the signature adds the
    weight files' names, sizes and modification times."""
    loaded = loaded_weight_files(model)
    if loaded is None:
        return None
    folder, files = loaded
    form = ("int4" if int4 else "int8") + (
        "" if model.dtype == torch.bfloat16 else f"_{dtype_name(model.dtype)}"
    )
    version = [INT8_CACHE_FORMAT, torch.__version__]
    signature = hashlib.sha256(json.dumps([*version, folder, form, files]).encode()).hexdigest()
    stem = f"{Path(folder).name}-{_short_hash(folder)}-{form}"
    return cache_dir / f"{stem}-{_short_hash(json.dumps(version))}.safetensors", signature


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _read_cache(path: Path, signature: str, linears: dict[str, nn.Linear]) -> dict[str, Quantized] | None:
    """``{name: quantised tensors}`` from ``path`` if it holds ``signature`` and every layer
    checks out (``_layer_problem``), else ``None`` (saying why on stderr when a file was there)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:  # one handle: the file checked is the file read
            if (f.metadata() or {}).get("signature") != signature:
                return _stale(path, "its model's files, the format or torch changed")
            # copied out of the mapping: mapped tensors lie where the file puts them (8-byte aligned), and
            # torch's int8 kernel crashes at 8 rows on weights that are not 64-byte aligned
            tensors = {key: f.get_tensor(key).clone() for key in f.keys()}  # noqa: SIM118 (a safe_open handle is no dict)
    except (SafetensorError, OSError) as err:
        return _stale(path, f"it is unreadable ({err})")
    quantized: dict[str, Quantized] = {}
    for key, tensor in tensors.items():
        name, _, part = key.rpartition(".")
        quantized.setdefault(name, {})[part] = tensor
    if quantized.keys() != linears.keys():
        return _stale(path, "its layers differ from the model's")
    for name, linear in linears.items():
        problem = _layer_problem(linear.weight.detach(), quantized[name])
        if problem:
            return _stale(path, f"layer {name} {problem}")
    return quantized


def _layer_problem(weight: torch.Tensor, parts: Quantized) -> str | None:
    """Why ``parts`` are not ``quantize_layer(weight)``'s, judged by their shapes and dtypes and by rows
    requantised (the first, middle and last, and one drawn at random, so that a weight changed in a row the
    fixed ones miss shows over loads); ``None`` if they are."""
    out, inputs = weight.shape
    rows = sorted({0, out // 2, out - 1, random.SystemRandom().randrange(out)})  # one new row each load
    if parts.keys() == {"qweight", "scales"}:
        qweight, scales = parts["qweight"], parts["scales"]
        if (qweight.dtype, qweight.shape, scales.dtype, scales.shape) != (
            torch.int8,
            weight.shape,
            torch.bfloat16,
            weight.shape[:1],
        ):
            return "has the wrong shape or dtype"
        q_rows, s_rows = quantize_weight(weight[rows])
        same = torch.equal(q_rows, qweight[rows]) and torch.equal(s_rows, scales[rows])
        return None if same else "does not match the model's weights"
    if parts.keys() == {"qweight4", "scales_and_zeros"}:
        packed, scales_and_zeros = parts["qweight4"], parts["scales_and_zeros"]
        if (packed.dtype, packed.shape, scales_and_zeros.dtype, scales_and_zeros.shape) != (
            torch.uint8,
            (out, inputs // 2),
            torch.bfloat16,
            (inputs // INT4_GROUP, out, 2),
        ):
            return "has the wrong shape or dtype"
        codes, s_rows = quantize_weight_int4(weight[rows])
        x = torch.randn(1, inputs, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        got = _int4_kernel()(x, packed, INT4_GROUP, scales_and_zeros)[0, rows].float()  # (rows,)
        expected = x.float() @ int4_dequantized(codes, s_rows).t()  # (1, rows)
        close = float((got - expected[0]).norm()) <= 0.01 * float(expected.norm()) + 1e-6
        same = torch.equal(s_rows, scales_and_zeros[:, rows]) and close
        return None if same else "does not match the model's weights"
    return f"holds {sorted(parts)}, not a quantised layer"


def _write_cache(path: Path, signature: str, quantized: dict[str, Quantized]) -> None:
    """Save ``quantized`` to ``path`` atomically, and remove the files of the same folder and form written
    for another torch or cache format; a failed write (full disk, read-only cache) only costs the next load
    its quantisation, so it is reported on stderr, not raised."""
    tensors = {f"{name}.{part}": t for name, parts in quantized.items() for part, t in parts.items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"signature": signature}))
        # the same folder and form for another torch or cache format: never read again by this install
        for older in path.parent.glob(f"{glob.escape(path.name.rsplit('-', 1)[0])}-*.safetensors"):
            if older != path:
                older.unlink(missing_ok=True)
    except WRITE_ERRORS as err:
        message = f"recursivemas: could not cache quantised weights in {path} ({err})"
        print(message, file=sys.stderr, flush=True)


def _stale(path: Path, reason: str) -> None:
    print(f"recursivemas: requantising: {path} is stale, {reason}", file=sys.stderr, flush=True)
    return None
