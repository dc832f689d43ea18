"""The default preset's end-to-end latent answer in float32, bfloat16, int8 and fp16w (issue 13 goal 2).

    OMP_NUM_THREADS=1 python benchmarks/dtype_speed.py [--dtypes float32 bfloat16 int8] [--repeats 3]
                                                       [--questions 100] [--max-new-tokens 32]
                                                       [--threads 1]

Systems come from ``load_system`` as ``recursivemas run --dtype D`` builds them (the default preset, its
trained links, its rounds and latent steps; links float32 in every case), on ``--threads`` threads
(default one). Flags after a ``+`` change how it runs: ``+compile`` (``int8+compile``) adds ``--compile``,
whose compilation falls in the untimed warm-up round; ``+transformers`` runs every one-position step as a
``model(...)`` call (``StepConfig(fast=False)``, the library's only path before ``fast_step.FastSteps``);
``+whole`` runs every prompt pass whole (``StepConfig(reuse_prefixes=False)``, the library before
``cache.PromptPrefixes``); ``float32+transformers+whole`` is the library before both. The first entry is
the reference of the speed ratios and of the agreement columns; it must be a float32 one.

Speed: the first 1 and 8 questions of the relay task (level 1, held-out rows, ``eval --task relay:1``),
greedy, ``--max-new-tokens`` tokens at most, timed per ``RecursiveMAS.run`` call. The dtypes run
interleaved in ``--repeats`` rounds after a warm-up round, so their ratios to the reference come from calls
seconds apart; figures are medians. Load: seconds of ``load_system`` in this process, after the imports
(warm: converted models and int8 caches already on disk; fp16w packs its weights in it). Memory: the
peak resident set (``VmHWM``; ``ru_maxrss`` would
carry the parent's over ``exec``) of a fresh process per
dtype that loads the system and answers one batch of 8. Agreement: every dtype answers ``--questions``
relay questions in batches of 8 (``INT8_MAX_ROWS``, so int8 steps take the int8 kernel); the share of
final texts and of extracted answers identical to the reference's, and each dtype's strict relay accuracy
(Wilson 95% interval). Writes
``results/dtype_speed.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from recursivemas.agent import GenerationConfig
from recursivemas.eval.harness import wilson_interval
from recursivemas.eval.tasks import Task, load_task
from recursivemas.loading import AUTO, DTYPE_CHOICES, load_system
from recursivemas.models import dtype_name
from recursivemas.quantize import INT8_MAX_ROWS
from recursivemas.system import RecursiveMAS

RESULTS = Path(__file__).parent / "results"
BATCHES = (1, 8)
COMPILED, TRANSFORMERS, WHOLE = "compile", "transformers", "whole"
DTYPES = [d for d in DTYPE_CHOICES if d != AUTO]  # named as they run: auto is int8 here
FLAGS = (COMPILED, TRANSFORMERS, WHOLE)


def parse_variant(text: str) -> str:
    """A ``--dtypes`` value: a ``--dtype`` (not auto) and any of ``FLAGS`` after ``+`` signs
    (``float32+transformers+whole``)."""
    dtype, *flags = text.split("+")
    if dtype not in DTYPES or any(f not in FLAGS for f in flags) or len(set(flags)) < len(flags):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a dtype ({', '.join(DTYPES)}), then any of +{', +'.join(FLAGS)} once each"
        )
    return text


AGREEMENT_BATCH = INT8_MAX_ROWS
"""Agreement batches are small enough that int8's one-position steps take the int8 kernel, as a batch-1
answer's do (larger batches multiply by the loaded weights: they would measure bfloat16's or float32's
answers)."""


def load_variant(variant: str) -> RecursiveMAS:
    """The default preset in ``variant``: a ``--dtype`` value, with ``+compile`` for ``--compile``,
    ``+transformers`` for ``StepConfig(fast=False)``, ``+whole`` for ``StepConfig(reuse_prefixes=False)``."""
    dtype, *flags = variant.split("+")
    system = load_system(None, None, dtype, "cpu", compile=COMPILED in flags)
    if TRANSFORMERS in flags or WHOLE in flags:
        step = system.agents[next(iter(system.agents))].step_config
        changed = {"fast": TRANSFORMERS not in flags, "reuse_prefixes": WHOLE not in flags}
        system.set_step_config(dataclasses.replace(step, **changed))
    return system


def inputs(task: Task, n: int) -> list[dict]:
    return [{"question": ex.question, "context": ex.context} for ex in task.examples[:n]]


def timed_run(system: RecursiveMAS, rows: list[dict], gen: GenerationConfig) -> float:
    """Seconds of one latent run of ``rows`` as one batch."""
    start = time.perf_counter()
    system.run(rows, generation=gen, batch_size=len(rows))
    return time.perf_counter() - start


def speed(systems: dict[str, RecursiveMAS], task: Task, gen: GenerationConfig, repeats: int) -> dict:
    """{dtype: {batch: [seconds per repeat]}}, dtypes interleaved, after one untimed round."""
    times: dict[str, dict[int, list[float]]] = {d: {b: [] for b in BATCHES} for d in systems}
    for round_ in range(repeats + 1):
        for b in BATCHES:
            for name, system in systems.items():
                seconds = timed_run(system, inputs(task, b), gen)
                if round_:
                    times[name][b].append(seconds)
                print(f"round {round_} batch {b} {name}: {seconds:.2f} s", file=sys.stderr, flush=True)
    return times


def answers(system: RecursiveMAS, task: Task, n: int, gen: GenerationConfig) -> list[dict]:
    """Text, extracted answer and strict correctness of the first ``n`` questions."""
    results = system.run(inputs(task, n), generation=gen, batch_size=AGREEMENT_BATCH)
    rows = []
    for ex, result in zip(task.examples[:n], results, strict=True):
        score = task.score(ex, result.text)
        rows.append({"text": result.text, "extracted": score.extracted, "correct": score.correct})
    return rows


def peak_rss_mib(variant: str, max_new_tokens: int, threads: int) -> float:
    """Peak resident MiB of a fresh process that loads the system as ``variant`` and answers 8 questions."""
    code = (
        f"import re, sys, torch; torch.set_num_threads({threads})\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from dtype_speed import load_variant\n"
        "from recursivemas.agent import GenerationConfig\n"
        "from recursivemas.eval.tasks import load_task\n"
        f"s = load_variant({variant!r})\n"
        "t = load_task('relay:1', limit=8)\n"
        "rows = [{'question': e.question, 'context': e.context} for e in t.examples]\n"
        f"s.run(rows, generation=GenerationConfig(max_new_tokens={max_new_tokens}), batch_size=8)\n"
        "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 1024


def agreement(rows: list[dict], reference: list[dict]) -> dict:
    """Identical texts and extracted answers (% of questions), accuracy with its 95% interval, and how many
    distinct answers were extracted."""
    n = len(rows)
    correct = sum(r["correct"] for r in rows)
    low, high = wilson_interval(correct, n)
    return {
        "same_text_pct": 100 * sum(r["text"] == f["text"] for r, f in zip(rows, reference, strict=True)) / n,
        "same_answer_pct": 100
        * sum(r["extracted"] == f["extracted"] for r, f in zip(rows, reference, strict=True))
        / n,
        "accuracy_pct": 100 * correct / n,
        "accuracy_ci95": [100 * low, 100 * high],
        "distinct_answers": len({r["extracted"] for r in rows}),
    }


def table(report: dict) -> str:
    lines = [
        f"| dtype | batch 1: s (x vs {report['reference']}) | batch 8: s (x vs {report['reference']}) | "
        "load s | peak RSS MiB | same text | "
        "same answer | relay:1 accuracy (95% CI; distinct answers) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in report["dtypes"].items():
        cells = [f"{row['median_s'][str(b)]:.2f} (x{row['speedup'][str(b)]:.2f})" for b in BATCHES]
        agree = row["agreement"]
        low, high = agree["accuracy_ci95"]
        lines.append(
            f"| {name} | {' | '.join(cells)} | {row.get('load_s', float('nan')):.1f} | "
            f"{row['peak_rss_mib']:.0f} | {agree['same_text_pct']:.0f}% | "
            f"{agree['same_answer_pct']:.0f}% | {agree['accuracy_pct']:.0f}% ({low:.0f}-{high:.0f}; "
            f"{agree['distinct_answers']}) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "int8"], type=parse_variant)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--output", type=Path, default=RESULTS / "dtype_speed.json")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the CLI uses all cores)")
    args = parser.parse_args()
    reference = args.dtypes[0]
    if not reference.startswith("float32"):
        parser.error("the first --dtypes entry is the reference: it must be float32 or float32+...")
    torch.set_num_threads(args.threads)
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens)
    task = load_task("relay:1", limit=args.questions)
    systems, load_s = {}, {}
    for d in args.dtypes:  # in this process: the imports are paid before the first, not in its time
        start = time.perf_counter()
        systems[d] = load_variant(d)
        load_s[d] = time.perf_counter() - start
    with torch.inference_mode():
        times = speed(systems, task, gen, args.repeats)
        outputs = {d: answers(s, task, args.questions, gen) for d, s in systems.items()}
    agent_dtypes = {d: dtype_name(next(iter(s.agents.values())).dtype) for d, s in systems.items()}
    del systems
    report = {
        "settings": {
            **vars(args),
            "output": str(args.output),
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },
        "reference": reference,
        "dtypes": {},
    }
    base = {b: statistics.median(times[reference][b]) for b in BATCHES}
    for name in args.dtypes:
        medians = {b: statistics.median(times[name][b]) for b in BATCHES}
        report["dtypes"][name] = {
            "agent_dtype": agent_dtypes[name],
            "load_s": load_s[name],
            "times_s": {str(b): times[name][b] for b in BATCHES},
            "median_s": {str(b): medians[b] for b in BATCHES},
            "speedup": {str(b): base[b] / medians[b] for b in BATCHES},
            "peak_rss_mib": peak_rss_mib(name, args.max_new_tokens, args.threads),
            "agreement": agreement(outputs[name], outputs[reference]),
            "answers": outputs[name],
        }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1))
    print(table(report))


if __name__ == "__main__":
    main()
