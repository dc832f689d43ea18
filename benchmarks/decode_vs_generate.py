"""Text decode speed: ``Agent.decode`` vs transformers' ``model.generate`` with a KV cache (issue 13 goal 3).

    python benchmarks/decode_vs_generate.py [--models smollm2-135m gemma3-270m] [--batches 1 8]
                                            [--new-tokens 32] [--repeats 5] [--dtype float32] [--device cpu]
                                            [--compile]

Both decode the same chat prompts (the solver's role prompt around the first ``B`` test questions, left
padded), greedy, exactly ``--new-tokens`` new tokens per row: EOS is disabled in both (``Agent.eos_ids``
emptied; ``generate`` given no EOS id, so it needs no ``min_new_tokens`` processor), so neither stops
early. ``generate`` gets the token ids and builds its own ``DynamicCache``; ours gets the same ids
embedded by ``Agent.encode``. Each repeat times both, in alternating order (one warm-up call each first),
so load from other processes falls on both alike; the figures are the medians, and the median of the
per-repeat ratios (each from two back-to-back calls). Tokens/s = B x new tokens / wall time of the whole
call (prefill included). The generated ids are checked to be identical. ``--compile``: ours with
``StepConfig(compile=True)`` (static cache, compiled steps), ``generate`` with
``cache_implementation="static"`` (which it compiles by itself on CUDA). Writes
``results/decode_vs_generate.json`` (``decode_vs_generate-<device>-<dtype>[-compile].json`` for other
settings) and prints a table. ``--models`` also takes the random models of ``shapes.py``
(``smollm2-shape gemma3-shape``: the real layer shapes with a tiny tokenizer, so a small LM head), for
machines the bundled GGUFs cannot reach.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from shapes import SHAPES, shaped_agent
from transformers import GenerationConfig as HFGenerationConfig

from recursivemas.agent import Agent, GenerationConfig, PromptBatch, StepConfig
from recursivemas.models.bundled import BUNDLED
from recursivemas.prompts import ROLE_TEMPLATES

RESULTS = Path(__file__).parent / "results"
QUESTIONS = [
    "What is 12 plus 30?",
    "A train travels 60 miles in 2 hours. What is its speed?",
    "If x + 7 = 19, what is x?",
    "Alice has 5 apples and gives 2 to Bob. How many apples does she keep?",
    "Divide 100 by 4.",
    "How many days are in a week? Think step by step and check each step before answering.",
    "What is the square of 9?",
    "Sum 1, 2, 3 and 4.",
]


def prompts(agent: Agent, batch: int) -> list[str]:
    """The solver's full prompt (chat template or plain fallback) for the first ``batch`` questions."""
    return ["".join(agent.render(q, None, set())) for q in QUESTIONS[:batch]]


def generate_inputs(agent: Agent, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) left-padded token ids and their mask, tokenised as ``Agent.encode`` tokenises them."""
    rows = agent.tokenizer(texts, add_special_tokens=False)["input_ids"]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), agent.pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids.to(agent.device), mask.to(agent.device)


def ours(agent: Agent, batch: PromptBatch, new_tokens: int) -> list[list[int]]:
    """Greedy ``Agent.decode`` of exactly ``new_tokens`` tokens per row (EOS disabled) -> the ids per row."""
    eos, agent.eos_ids = agent.eos_ids, []
    try:
        return agent.decode(batch, GenerationConfig(max_new_tokens=new_tokens)).token_ids
    finally:
        agent.eos_ids = eos


def theirs(
    agent: Agent, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, static: bool
) -> list[list[int]]:
    """Greedy ``model.generate`` of exactly ``new_tokens`` tokens per row (no EOS id), over a static cache
    if ``static`` -> the new ids per row."""
    config = HFGenerationConfig(
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=[],
        pad_token_id=agent.pad_id,
        cache_implementation="static" if static else None,
    )
    out = agent.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    return out[:, ids.shape[1] :].tolist()


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Wall times of each function over ``repeats`` rounds, after one warm-up call of each; the order
    within a round alternates, so neither always runs first."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        for name in list(fns)[:: 1 if r % 2 == 0 else -1]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def measure(spec: str, args: argparse.Namespace) -> list[dict]:
    """Rows of one model: ours vs generate at each batch size."""
    load = partial(shaped_agent, spec) if spec in SHAPES else partial(Agent.from_pretrained, spec)
    agent = load(
        name="solver",
        template=ROLE_TEMPLATES["solver"],
        dtype=getattr(torch, args.dtype),
        device=args.device,
        step_config=StepConfig(compile=args.compile),
    )
    return [compare(agent, spec, b, args) for b in args.batches]


def compare(agent: Agent, spec: str, b: int, args: argparse.Namespace) -> dict:
    """One row: ours vs generate on the first ``b`` prompts."""
    texts = prompts(agent, b)
    batch = agent.encode([[t] for t in texts])
    ids, mask = generate_inputs(agent, texts)
    run_ours = partial(ours, agent, batch, args.new_tokens)
    run_theirs = partial(theirs, agent, ids, mask, args.new_tokens, args.compile)
    same = run_ours() == run_theirs()
    times = interleaved({"ours": run_ours, "generate": run_theirs}, args.repeats)
    tps = {name: b * args.new_tokens / statistics.median(t) for name, t in times.items()}
    paired = statistics.median(g / o for o, g in zip(times["ours"], times["generate"], strict=True))
    print(
        f"{spec} batch {b}: ours {tps['ours']:.1f} tok/s, generate {tps['generate']:.1f} tok/s, "
        f"x{tps['ours'] / tps['generate']:.3f} (paired x{paired:.3f}), identical {same}",
        file=sys.stderr,
    )
    return {
        "model": spec,
        "batch": b,
        "prompt_tokens": batch.lengths,
        "new_tokens": args.new_tokens,
        "identical_tokens": same,
        "ours_tok_s": tps["ours"],
        "generate_tok_s": tps["generate"],
        "ratio": tps["ours"] / tps["generate"],
        "paired_ratio": paired,
        "ours_s": times["ours"],
        "generate_s": times["generate"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(BUNDLED))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="static caches and compiled steps in both")
    args = parser.parse_args()
    if max(args.batches) > len(QUESTIONS):
        parser.error(f"--batches: at most {len(QUESTIONS)} (one prompt per question)")
    torch.set_grad_enabled(False)
    rows = [row for spec in args.models for row in measure(spec, args)]
    result = {
        "command": " ".join(["python benchmarks/decode_vs_generate.py", *sys.argv[1:]]),
        "settings": vars(args),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    suffix = "" if (args.device, args.dtype) == ("cpu", "float32") else f"-{args.device}-{args.dtype}"
    suffix += "-compile" if args.compile else ""
    (RESULTS / f"decode_vs_generate{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    steps = ", static cache + compile" if args.compile else ""
    print(
        f"# Decode vs generate, greedy, {args.new_tokens} new tokens, {args.dtype} on {args.device}{steps}\n"
    )
    print("| model | batch | ours tok/s | generate tok/s | ours / generate | paired | identical tokens |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['batch']} | {r['ours_tok_s']:.1f} | {r['generate_tok_s']:.1f} | "
            f"x{r['ratio']:.3f} | x{r['paired_ratio']:.3f} | {'yes' if r['identical_tokens'] else 'NO'} |"
        )


if __name__ == "__main__":
    main()
