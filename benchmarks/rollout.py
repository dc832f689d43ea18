"""Latent rollout cost: KV-cached ``Agent.think`` vs the re-encode reference, and our overhead over a
raw transformers forward loop with a cache.

    python benchmarks/rollout.py [--steps 16 48 80] [--prompt-tokens 128] [--batch 1] [--repeats 3]
                                 [--device cpu] [--dtype float32] [--static-cache | --compile]

``--static-cache`` / ``--compile`` run ``Agent.think``'s steps over a static KV cache / compiled with
``torch.compile`` (``StepConfig``); the re-encode reference and the raw loop stay eager over a dynamic
cache, so "our overhead" then says what they gain. The warm-up call before each timing compiles.
Writes benchmarks/results/rollout.json (``rollout-<device>-<dtype>-<eager|static|compile>.json`` for other
settings, ``-b<batch>`` appended past batch 1) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from shapes import shaped_agent

from recursivemas.agent import StepConfig, position_ids
from recursivemas.cache import cache_kwargs, new_cache
from recursivemas.links import InnerLink, LinkConfig

RESULTS = Path(__file__).parent / "results"


def wall_times(fn, repeats: int) -> list[float]:
    """Wall times of ``repeats`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def timed(fn, repeats: int) -> float:
    """Median wall time of ``repeats`` calls after one warm-up."""
    return statistics.median(wall_times(fn, repeats))


def synced(fn, device: torch.device):
    """``fn`` followed by waiting for the device, so wall times include queued GPU work."""
    if device.type != "cuda":
        return fn
    return lambda: (fn(), torch.cuda.synchronize(device))


def raw_loop(agent, batch, steps: int) -> None:
    """The least a cached latent rollout can do: transformers forward calls, hidden state fed back as-is."""
    backbone, cache = agent.backbone, new_cache(agent.model)
    mask, pos, x = batch.mask, position_ids(batch.mask), batch.embeds
    for _ in range(steps):
        h = backbone(
            inputs_embeds=x, attention_mask=mask, position_ids=pos, **cache_kwargs(backbone, cache)
        ).last_hidden_state[:, -1:]
        x, pos = h, pos[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[16, 48, 80])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shape", default="smollm2-shape")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    steps = parser.add_mutually_exclusive_group()
    steps.add_argument("--static-cache", action="store_true", help="latent steps over a static KV cache")
    steps.add_argument("--compile", action="store_true", help="static KV cache and torch.compile'd steps")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    step_config = StepConfig(static_cache=args.static_cache, compile=args.compile)
    agent = shaped_agent(
        args.shape, "agent", dtype=getattr(torch, args.dtype), device=args.device, step_config=step_config
    )
    link = InnerLink(LinkConfig("agent", "inner", agent.hidden_size, agent.hidden_size)).to(agent.device)
    ids = torch.randint(0, len(agent.tokenizer), (args.batch, args.prompt_tokens))
    batch = agent.encode([[agent.embed(row)] for row in ids])
    rows = []
    for m in args.steps:
        cached = timed(synced(lambda m=m: agent.think(batch, m, link), agent.device), args.repeats)
        reference = timed(
            synced(lambda m=m: agent.think_reference(batch, m, link), agent.device), args.repeats
        )
        raw = timed(synced(lambda m=m: raw_loop(agent, batch, m), agent.device), args.repeats)
        rows.append(
            {
                "latent_steps": m,
                "kv_cached_s": cached,
                "reencode_s": reference,
                "raw_loop_s": raw,
                "speedup": reference / cached,
                "overhead_vs_raw": cached / raw - 1,
            }
        )
    steps = "compile" if args.compile else "static" if args.static_cache else "eager"
    result = {
        "command": " ".join(["python benchmarks/rollout.py", *sys.argv[1:]]),
        "shape": args.shape,
        "prompt_tokens": args.prompt_tokens,
        "batch": args.batch,
        "device": str(agent.device),
        "dtype": args.dtype,
        "steps": steps,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "rows": rows,
    }
    default = (agent.device.type, args.dtype, steps) == ("cpu", "float32", "eager")
    name = "rollout" if default else f"rollout-{agent.device.type}-{args.dtype}-{steps}"
    name += f"-b{args.batch}" if args.batch != 1 else ""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"# Latent rollout, {args.shape}, prompt {args.prompt_tokens} tokens, batch {args.batch}, "
        f"{args.dtype} on {agent.device}, {steps} steps\n"
    )
    print("| m | KV-cached (s) | re-encode (s) | speed-up | raw HF loop (s) | our overhead |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['latent_steps']} | {r['kv_cached_s']:.3f} | {r['reencode_s']:.3f} | x{r['speedup']:.1f} | "
            f"{r['raw_loop_s']:.3f} | {100 * r['overhead_vs_raw']:+.1f}% |"
        )


if __name__ == "__main__":
    main()
