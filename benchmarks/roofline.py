"""Roofline of the one-position steps: measured time vs the time to stream the bytes a step must read.

    python benchmarks/roofline.py [--models smollm2-135m gemma3-270m] [--batches 1 4 16]
                                  [--dtype float32|bfloat16|int8|int4|fp16w] [--prompt-tokens 64] [--steps 16]
                                  [--rollouts 4] [--quick] [--output FILE]

Bandwidth: best of several ``dst.copy_(src)`` of 1 GiB float32 with torch's default threads, counted as
read + write bytes (2 x 1 GiB per copy); a read-only ``src.sum()`` figure is recorded beside it.

Steps: each rollout prefills a random ``--prompt-tokens`` prompt (untimed), then times ``--steps``
one-position steps one by one, so the KV cache spans prompt + 1 .. prompt + steps, as in an m = 16 rollout.
The first rollout is warm-up; the figure is the median over the others. The steps are the library's loop
bodies: a latent step is ``Agent.think``'s (R_in(h) of the previous step in, the last-layer hidden state
out, then the inner link, shaped like the default preset's: paper form, residual projection, norm
rescaling); a decode step is ``Agent.decode``'s greedy one (the previous token id in, logits out, then
argmax). Each runs through ``fast_step.FastSteps``, as the library does by default (``ms``), and, in
alternate rollouts, as raw ``model(...)`` calls over the prefill's ``DynamicCache`` with
``logits_to_keep=1`` (``transformers_ms``, the library's path before ``FastSteps``). As a check
that these describe what users run, at batch 1 the per-step time of the whole ``Agent.think`` /
``Agent.decode`` is also taken, as (time of 1 + steps - time of 1) / steps (``library_ms``; EOS is disabled
for the decode). To split a step's time between its matrix products and the rest (attention, norms, rotary
embeddings, cache updates, Python), every ``nn.Linear`` of the transformer layers is also timed alone,
run once each in order on a random (batch, in) input (``linears_ms``, with its own bound), and the
``FastSteps`` step is timed again with every one of those Linears returning a preallocated output instead of
multiplying (``rest_ms``: attention, norms, rotary embeddings, cache writes, the inner link, Python; for a
decode step also the embedding row and the LM head's product). No kernel for the layers' products can take a
step below ``rest_ms`` + the Linears' bound; over the step's bound, that is the ratio a perfect one would
reach (``floor_ratio``).

Bound: bytes read per step / copy bandwidth. A latent step reads every transformer layer and the final norm,
the inner link and the KV cache (no embedding row: its input is a vector; no LM head). A decode step reads
the same layers, one embedding row per batch row, the LM head (with tied embeddings that is the embedding
matrix, counted once) and the KV cache. Activations are not counted. With ``--dtype int8`` (the CPU
default) or ``int4`` (``recursivemas.quantize``), the model loads in ``low_bit_agent_dtype()`` (bfloat16 on
CPUs with bfloat16 units, else float32), and the layers' Linears and the LM head read their int8 or int4
weights and bfloat16 scales up to ``INT8_MAX_ROWS`` rows and their loaded weights beyond. With ``--dtype
fp16w`` the model loads in float32 and they read float16 weights (``quantize.Fp16Linear``) at any batch.
Writes ``--output`` (default ``results/roofline.json``, ``roofline-<dtype>.json`` for other dtypes, ``-quick``
with ``--quick``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rollout import wall_times

from recursivemas.agent import Agent, GenerationConfig, PromptBatch, position_ids
from recursivemas.cache import cache_kwargs, cache_length, new_cache
from recursivemas.fast_step import FastSteps
from recursivemas.fast_step import _linear as step_linear  # the projection FastSteps calls
from recursivemas.links import InnerLink, LinkConfig
from recursivemas.loading import agent_dtype
from recursivemas.models.bundled import BUNDLED
from recursivemas.quantize import FP16_WEIGHTS, LowBitLinear, fp16_weight_model, quantize_model

RESULTS = Path(__file__).parent / "results"
GiB = 2**30


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Least wall time of ``repeats`` calls after one warm-up."""
    return min(wall_times(fn, repeats))


def bandwidth(repeats: int) -> dict[str, float]:
    """GB/s (1e9 bytes) of a 1 GiB float32 copy (read + write bytes) and sum (read bytes)."""
    src = torch.ones(GiB // 4)
    dst = torch.zeros_like(src)  # touched, so no page faults are timed
    copy = best_time(lambda: dst.copy_(src), repeats)
    read = best_time(lambda: src.sum(), repeats)
    return {"copy_gbps": 2 * GiB / copy / 1e9, "read_gbps": GiB / read / 1e9}


def step_bytes(module: torch.nn.Module, rows: int) -> int:
    """Bytes of ``module``'s weights a step of ``rows`` input rows reads, shared tensors counted once:
    parameters in full; an int8 or int4 layer's low-bit weight and scales up to ``INT8_MAX_ROWS`` rows,
    its loaded (bfloat16 or float32) weight beyond (its bias either way)."""
    tensors: dict[int, torch.Tensor] = {}
    for m in module.modules():
        read = m.read_tensors(rows) if isinstance(m, LowBitLinear) else list(m.parameters(recurse=False))
        # keyed by storage; stand-ins on the meta device (``Fp16Linear``'s packed weight) have none
        tensors.update((id(t) if t.is_meta else t.data_ptr(), t) for t in read)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def kv_bytes(agent: Agent, batch: int, length: int) -> int:
    """Bytes of keys and values a step attends over with ``length`` cached positions (its own included)."""
    config = agent.model.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    window = getattr(config, "sliding_window", None) or length
    positions = sum(min(length, window) if t == "sliding_attention" else length for t in types)
    return 2 * batch * config.num_key_value_heads * head_dim * positions * agent.dtype.itemsize


def prompt(agent: Agent, batch: int, tokens: int) -> PromptBatch:
    ids = torch.randint(0, len(agent.tokenizer), (batch, tokens), generator=torch.Generator().manual_seed(0))
    return agent.encode([[agent.embed(row)] for row in ids])


def rollout(
    agent: Agent, link: InnerLink, batch: PromptBatch, steps: int, kind: str, runtime: str
) -> list[tuple[float, int]]:
    """(seconds, cache length after the step) of each one-position step after an untimed prefill, run by
    ``FastSteps`` (``runtime="fast"``, what the library runs by default) or as ``model(...)`` calls over
    the prefill's ``DynamicCache`` (``"transformers"``)."""
    latent = kind == "latent"
    cache, mask = new_cache(agent.model), batch.mask
    pos = position_ids(mask)
    module = agent.backbone if latent else agent.model  # Agent.think's / Agent.decode's loop body
    kw = {**cache_kwargs(module, cache), **({} if latent else {"logits_to_keep": 1})}
    out = module(inputs_embeds=batch.embeds, attention_mask=mask, position_ids=pos, **kw)
    if latent:
        x = link(out.last_hidden_state[:, -1]).to(agent.dtype)[:, None]
    else:
        nxt = out.logits[:, -1].float().argmax(-1)
    head = None if latent else agent.model.get_output_embeddings()
    fast = FastSteps(agent.backbone, cache, mask, pos, steps, head) if runtime == "fast" else None
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        if fast is not None:
            if latent:
                x = link(fast.step(inputs_embeds=x)).to(agent.dtype)[:, None]
            else:
                nxt = fast.step(input_ids=nxt[:, None]).argmax(-1)
            times.append((time.perf_counter() - start, fast.length))
            continue
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        pos = pos[:, -1:] + 1
        if latent:
            out = module(inputs_embeds=x, attention_mask=mask, position_ids=pos, **kw)
            x = link(out.last_hidden_state[:, -1]).to(agent.dtype)[:, None]
        else:
            out = module(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, **kw)
            nxt = out.logits[:, -1].float().argmax(-1)
        times.append((time.perf_counter() - start, cache_length(cache)))
    return times


def library_step(agent: Agent, link: InnerLink, batch: PromptBatch, steps: int, kind: str, n: int) -> float:
    """Per-step seconds of the whole ``Agent.think`` / ``Agent.decode``: median of (t(1 + steps) - t(1))."""

    def run(m: int) -> float:
        start = time.perf_counter()
        if kind == "latent":
            agent.think(batch, m, link)
        else:
            agent.decode(batch, GenerationConfig(max_new_tokens=m))
        return time.perf_counter() - start

    eos, agent.eos_ids = agent.eos_ids, []  # decode the full count of tokens
    try:
        run(1 + steps)
        return statistics.median((run(1 + steps) - run(1)) / steps for _ in range(n))
    finally:
        agent.eos_ids = eos


def layer_linears(agent: Agent) -> dict[str, torch.nn.Module]:
    """``{name in the backbone: layer}`` of the transformer layers' Linears (plain or low-bit), in order."""
    kinds = (torch.nn.Linear, LowBitLinear)
    return {name: m for name, m in agent.backbone.named_modules() if isinstance(m, kinds)}


def linears(agent: Agent, batch: int, repeats: int) -> tuple[float, int]:
    """(median seconds, weight bytes) of every ``nn.Linear`` of the transformer layers run once, in order,
    on a random (batch, in) input, as ``FastSteps`` calls them (``fast_step._linear``: ``torch.mm`` /
    ``addmm`` on the transposed weight, or a low-bit layer's ``step_op``): a step's matrix products alone,
    without what surrounds them."""
    layers = list(layer_linears(agent).values())
    widths = {m.in_features for m in layers}
    inputs = {n: torch.randn(batch, n, dtype=agent.dtype, device=agent.device) for n in widths}
    ops = [(step_linear(m, batch), inputs[m.in_features]) for m in layers]

    def run() -> None:
        for op, x in ops:
            op(x)

    return statistics.median(wall_times(run, repeats)), sum(step_bytes(m, batch) for m in layers)


class NoProduct(torch.nn.Module):
    """Stands in for a Linear with a zero output of its shape and no matrix product: preallocated per row
    count for ``FastSteps`` (``step_op``), new for ``forward`` (the untimed prefill)."""

    def __init__(self, layer: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.dtype = layer.out_features, dtype
        self.outputs: dict[int, torch.Tensor] = {}

    def step_op(self, rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
        out = self.outputs.setdefault(rows, torch.zeros(rows, self.out_features, dtype=self.dtype))
        return lambda x: out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def rest_of_step(
    agent: Agent, link: InnerLink, batch: PromptBatch, steps: int, kind: str, rollouts: int
) -> list[float]:
    """Seconds of each ``FastSteps`` step (after a warm-up rollout) with every transformer-layer Linear
    replaced by a ``NoProduct``: what a step costs beyond its matrix products."""
    originals = layer_linears(agent)
    for name, layer in originals.items():
        agent.backbone.set_submodule(name, NoProduct(layer, agent.dtype))
    try:
        runs = [rollout(agent, link, batch, steps, kind, "fast") for _ in range(rollouts + 1)]
    finally:
        for name, layer in originals.items():
            agent.backbone.set_submodule(name, layer)
    return [t for run in runs[1:] for t, _ in run]


def measure(spec: str, args: argparse.Namespace, gbps: float) -> list[dict]:
    """Rows of one model: latent and decode steps at each batch size."""
    low_bit, int4 = args.dtype in ("int8", "int4"), args.dtype == "int4"
    agent = Agent.from_pretrained(spec, "agent", dtype=agent_dtype(args.dtype))
    if low_bit:
        quantize_model(agent.model, agent.backbone, int4=int4)
    elif args.dtype == FP16_WEIGHTS:
        fp16_weight_model(agent.model, agent.backbone)
    d, elem = agent.hidden_size, agent.dtype.itemsize
    link = InnerLink(LinkConfig("agent", "inner", d, d, residual_proj=True, rescale_norm=1.0))
    emb, head = agent.model.get_input_embeddings(), agent.model.get_output_embeddings()
    rows = []
    for b in args.batches:
        layers = step_bytes(agent.backbone, b) - emb.weight.numel() * elem  # transformer layers + final norm
        batch = prompt(agent, b, args.prompt_tokens)
        linear_s, linear_bytes = linears(agent, b, args.steps * args.rollouts)
        for kind in ("latent", "decode"):
            samples, baseline = [], []
            for i in range(args.rollouts + 1):  # the two runtimes interleaved; the first round warms up
                fast = rollout(agent, link, batch, args.steps, kind, "fast")
                slow = rollout(agent, link, batch, args.steps, kind, "transformers")
                if i > 0:
                    samples += fast
                    baseline += [t for t, _ in slow]
            fixed = layers + (step_bytes(link, b) if kind == "latent" else step_bytes(head, b) + b * d * elem)
            kv = statistics.median(kv_bytes(agent, b, n) for _, n in samples)
            measured = statistics.median(t for t, _ in samples)
            rest = statistics.median(rest_of_step(agent, link, batch, args.steps, kind, args.rollouts))
            bound = (fixed + kv) / (gbps * 1e9)
            row = {
                "model": spec,
                "step": kind,
                "batch": b,
                "ms": 1e3 * measured,
                "transformers_ms": 1e3 * statistics.median(baseline),
                "bound_ms": 1e3 * bound,
                "ratio": measured / bound,
                "weight_bytes": fixed,
                "kv_bytes": kv,
                "cache_positions": [samples[0][1], samples[-1][1]],
                "samples": len(samples),
                "tied_embeddings": emb.weight.data_ptr() == head.weight.data_ptr(),
                "linears_ms": 1e3 * linear_s,
                "linears_bound_ms": 1e3 * linear_bytes / (gbps * 1e9),
                "rest_ms": 1e3 * rest,
                "floor_ratio": (rest + linear_bytes / (gbps * 1e9)) / bound,
            }
            if b == 1:
                row["library_ms"] = 1e3 * library_step(agent, link, batch, args.steps, kind, args.rollouts)
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(BUNDLED))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16", "int8", "int4", FP16_WEIGHTS]
    )
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16, help="timed one-position steps per rollout")
    parser.add_argument("--rollouts", type=int, default=4, help="measured rollouts (one more for warm-up)")
    parser.add_argument("--bandwidth-repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="batch 1, 4 steps, 1 rollout: a smoke test")
    parser.add_argument("--output", type=Path, help="default results/roofline[-<dtype>][-quick].json")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.steps, args.rollouts, args.bandwidth_repeats = [1], 4, 1, 3
    name = "roofline" + ("" if args.dtype == "float32" else f"-{args.dtype}")
    output = args.output or RESULTS / f"{name}{'-quick' if args.quick else ''}.json"
    torch.set_grad_enabled(False)
    bw = bandwidth(args.bandwidth_repeats)
    rows = [row for spec in args.models for row in measure(spec, args, bw["copy_gbps"])]
    for row in rows:
        row["ratio_read_bw"] = row["ratio"] * bw["read_gbps"] / bw["copy_gbps"]
    info = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), "")
    result = {
        "command": " ".join(["python benchmarks/roofline.py", *sys.argv[1:]]),
        "settings": {**vars(args), "output": str(output)},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu,
        "bandwidth": {**bw, "convention": "copy: (read + write bytes) / time, 1 GiB float32; read: sum"},
        "rows": rows,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"# Roofline, {args.dtype}, prompt {args.prompt_tokens} + {args.steps} steps, {cpu}")
    print(
        f"\nBandwidth (torch, {result['threads']} threads, 1 GiB float32): copy {bw['copy_gbps']:.1f} GB/s "
        f"(read + write bytes; the bound uses this), sum {bw['read_gbps']:.1f} GB/s (read bytes)\n"
    )
    print(
        "| model | step | batch | ms measured | ms bound | ratio | transformers' forward: ms (ratio) | "
        "layers' Linears alone: ms (bound) | rest of the step: ms (floor ratio) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['step']} | {r['batch']} | {r['ms']:.1f} | {r['bound_ms']:.1f} | "
            f"x{r['ratio']:.2f} | {r['transformers_ms']:.1f} (x{r['transformers_ms'] / r['bound_ms']:.2f}) | "
            f"{r['linears_ms']:.1f} ({r['linears_bound_ms']:.1f}) | "
            f"{r['rest_ms']:.1f} (x{r['floor_ratio']:.2f}) |"
        )
    lib = [f"{r['model']} {r['step']} {r['library_ms']:.1f} ms" for r in rows if "library_ms" in r]
    if lib:
        print(f"\nWhole Agent.think / Agent.decode per step at batch 1: {', '.join(lib)}")


if __name__ == "__main__":
    main()
