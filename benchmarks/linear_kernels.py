"""CPU kernels a weight-only dtype can multiply the layers by, on one model's layer shapes (issue 13 goal 2).

    python benchmarks/linear_kernels.py [--model smollm2-135m] [--rows 1 2 4 8 64 256] [--threads 1 2]
                                        [--repeats 15] [--output FILE]

Every ``nn.Linear`` of the model's transformer layers (SmolLM2-135M: 30 layers of 7, 210 products), each run
once in order on a (rows, in) float32 input, as ``FastSteps`` runs a step's products, by each kernel:

- ``float32``: ``torch.mm`` on the transposed float32 weight (``--dtype float32``);
- ``bfloat16``: ``torch.mm`` on a bfloat16 weight, the rows cast in and the product cast out;
- ``int8``: ``torch._weight_int8pack_mm`` (``quantize.Int8Linear``), rows cast to bfloat16 and back, as
  over float32 agents;
- ``fp16w``: fbgemm's float16 GEMM (``quantize.Fp16Linear``), float32 rows in and out.

Weights are random with the model's shapes (the kernels' speed does not depend on the values); the figure
is the least of ``--repeats`` timed passes after one warm-up, per thread count and row count. Also
recorded: each kernel's largest error against float32 on one layer, relative to the output's largest
magnitude. Writes ``--output`` (default ``results/linear_kernels.json``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from rollout import wall_times
from torch import nn
from transformers import AutoConfig

from recursivemas.models.bundled import BUNDLED, ensure_cached
from recursivemas.quantize import Fp16Linear, Int8Linear

RESULTS = Path(__file__).parent / "results"
Op = Callable[[torch.Tensor], torch.Tensor]


def layer_shapes(spec: str) -> list[tuple[int, int]]:
    """(out, in) of every Linear of the bundled model ``spec``'s transformer layers, in order, from its
    converted config (converting it first if need be)."""
    config = AutoConfig.from_pretrained(ensure_cached(spec)).get_text_config()
    d, ff = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    layer = [(q, d), (kv, d), (kv, d), (d, q), (ff, d), (ff, d), (d, ff)]
    return layer * config.num_hidden_layers


def kernels(linear: nn.Linear) -> dict[str, Op]:
    """Each kernel's product for ``linear``, as a function of (rows, in) float32 rows."""
    weight_t = linear.weight.detach().t()  # (in, out) view
    bf16_t = linear.weight.detach().to(torch.bfloat16).t()
    int8, fp16 = Int8Linear(linear), Fp16Linear(linear)
    return {
        "float32": lambda x: torch.mm(x, weight_t),
        "bfloat16": lambda x: torch.mm(x.to(torch.bfloat16), bf16_t).float(),
        "int8": lambda x: int8.step_op(1)(x),  # the int8 kernel at any rows (step_op(1): no row switch)
        "fp16w": lambda x: fp16.step_op(x.shape[0])(x),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", choices=sorted(BUNDLED))
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 64, 256])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--output", type=Path, default=RESULTS / "linear_kernels.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    shapes = layer_shapes(args.model)
    layers = [kernels(nn.Linear(i, o, bias=False)) for o, i in shapes]
    names = list(layers[0])
    times: dict[str, dict[str, dict[str, float]]] = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for rows in args.rows:
            inputs = {i: torch.randn(rows, i) for i in {i for _, i in shapes}}
            for name in names:
                ops = [(layer[name], inputs[i]) for layer, (_, i) in zip(layers, shapes, strict=True)]
                seconds = min(wall_times(lambda ops=ops: [op(x) for op, x in ops], args.repeats))
                times.setdefault(str(threads), {}).setdefault(str(rows), {})[name] = 1e3 * seconds
                print(f"{threads} threads, {rows} rows, {name}: {1e3 * seconds:.1f} ms", file=sys.stderr)
    x = torch.randn(4, shapes[0][1])
    exact = layers[0]["float32"](x)
    errors = {n: float((layers[0][n](x) - exact).abs().max() / exact.abs().max()) for n in names}
    report = {
        "command": " ".join(["python benchmarks/linear_kernels.py", *sys.argv[1:]]),
        "model": args.model,
        "products": len(shapes),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "ms": times,
        "relative_error": errors,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1))
    print(f"| threads | rows | {' | '.join(f'{n} ms' for n in names)} |")
    print(f"|---|---|{'---|' * len(names)}")
    for threads, by_rows in times.items():
        for rows, ms in by_rows.items():
            print(f"| {threads} | {rows} | {' | '.join(f'{ms[n]:.1f}' for n in names)} |")
    print("relative error against float32: " + ", ".join(f"{n} {e:.1e}" for n, e in errors.items()))


if __name__ == "__main__":
    main()
