"""How far the KV-cached latent rollout (``Agent.think``) drifts from the re-encode reference
(``Agent.think_reference``) on the bundled SmolLM2 planner, in float32 and in float64.

For the shipped trained inner link (on both prompts) and an identity link (on the first), per latent
step k = 1..m: ``||h_fast_k - h_ref_k|| / ||h_ref_k||`` in float32 and in float64 (a float64 copy of the
model and the link), and the distance of each float32 path from the float64 reference. If float64 agrees
to ~1e-15 while float32 drifts, the float32 difference is rounding (the two paths add in different orders)
amplified by the latent recurrence, not a cache bug; the growth per step is fitted on log10 of the
float32 divergence from its first non-zero step to its peak.

    python benchmarks/cache_divergence.py [--latent-steps 48] [--answers]

Writes benchmarks/results/cache_divergence.json and prints a Markdown table. About 2 min of CPU (117 s on
one thread, OMP_NUM_THREADS=1); ``--answers`` adds the r = 2 system's greedy answers with and without the
cache in float32 and float64 (about 9 min more on one thread).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import platform
import time
from pathlib import Path

import torch

from recursivemas import RecursiveMAS, build_preset
from recursivemas.links import InnerLink, LinkConfig

RESULTS = Path(__file__).parent / "results"
QUESTIONS = ["What is 23 plus 19?", "A box holds 6 eggs. How many eggs are in 7 boxes?"]
MARKS = (1, 8, 16, 24, 32, 40, 48)


def per_step(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """(1, m, d) rollouts -> per step ``||a_k - b_k|| / ||b_k||`` (computed in float64)."""
    a, b = a[0].double(), b[0].double()
    return ((a - b).norm(dim=-1) / b.norm(dim=-1)).tolist()


def growth(rel: list[float]) -> dict:
    """Growth of a per-step divergence while it grows: least-squares fit of log10(rel_k) = a + b·k from
    the first non-zero step to the step of the maximum; ``per_step`` is the factor 10**b."""
    first = next((k for k, r in enumerate(rel) if r > 0), None)
    peak = max(range(len(rel)), key=rel.__getitem__)
    if first is None or peak - first < 2:
        return {"per_step": None, "from_step": None, "to_step": None}
    points = [(k + 1, math.log10(rel[k])) for k in range(first, peak + 1)]
    n = len(points)
    mk = sum(k for k, _ in points) / n
    my = sum(y for _, y in points) / n
    slope = sum((k - mk) * (y - my) for k, y in points) / sum((k - mk) ** 2 for k, _ in points)
    return {"per_step": 10**slope, "from_step": first + 1, "to_step": peak + 1}


def float64_copy(system: RecursiveMAS) -> RecursiveMAS:
    """A float64 copy of a whole system (models and links)."""
    copied = copy.deepcopy(system)
    for model in copied.models().values():
        model.double()
    copied.links.double()
    return copied


def answers(system: RecursiveMAS) -> dict:
    """Greedy answers of the r = 2 system with and without the KV cache, in float32 and float64."""
    out = {}
    for dtype, mas in (("float32", system), ("float64", float64_copy(system))):
        for use_cache in (True, False):
            results = mas.run(QUESTIONS, batch_size=1, use_cache=use_cache)
            out[f"{dtype}_{'cached' if use_cache else 'reference'}"] = [r.text for r in results]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent-steps", type=int, default=48)
    parser.add_argument(
        "--answers",
        action="store_true",
        help="also run the r = 2 system on both questions with and without the cache, float32 and float64 "
        "(greedy, up to 256 new tokens; ~9 min more on one thread)",
    )
    args = parser.parse_args()
    m = args.latent_steps
    torch.set_grad_enabled(False)
    start = time.perf_counter()
    mas = build_preset("smollm2-gemma3", rounds=2, latent_steps=m)
    agent = mas.agents["planner"]
    agent64 = dataclasses.replace(agent, model=copy.deepcopy(agent.model).double())
    links = {"trained": mas.inner("planner"), "identity": InnerLink(LinkConfig("planner", "inner", 576, 576))}
    # The identity link stays at rounding level on every prompt tried; one prompt keeps the run short.
    cases = [("trained", q) for q in QUESTIONS] + [("identity", QUESTIONS[0])]
    rows = []
    for link_name, question in cases:
        link = links[link_name]
        link64 = copy.deepcopy(link).double()
        segments = agent.fill(agent.render(question, None, set()), {})
        batch, batch64 = agent.encode([segments]), agent64.encode([segments])
        fast, ref = agent.think(batch, m, link), agent.think_reference(batch, m, link)
        fast64, ref64 = agent64.think(batch64, m, link64), agent64.think_reference(batch64, m, link64)
        f32 = per_step(fast.hidden, ref.hidden)
        f64 = per_step(fast64.hidden, ref64.hidden)
        rows.append(
            {
                "link": link_name,
                "question": question,
                "prompt_tokens": batch.lengths[0],
                "hidden_norm_first_last": [float(ref64.hidden[0, i].norm()) for i in (0, -1)],
                "float32": f32,
                "float64": f64,
                "float32_embeds": per_step(fast.embeds, ref.embeds),
                "float64_embeds": per_step(fast64.embeds, ref64.embeds),
                "float32_cached_vs_float64": per_step(fast.hidden, ref64.hidden),
                "float32_reference_vs_float64": per_step(ref.hidden, ref64.hidden),
                "float32_growth": growth(f32),
                "float32_max": max(f32),
                "float64_max": max(f64),
            }
        )
    result = {
        "command": f"python benchmarks/cache_divergence.py --latent-steps {m}" + " --answers" * args.answers,
        "preset": "smollm2-gemma3",
        "agent": "planner",
        "model": agent.model_id,
        "latent_steps": m,
        "batch": 1,
        "trained_link": dataclasses.asdict(links["trained"].config),
        "metric": "||h_cached_k - h_reference_k|| / ||h_reference_k||, last-layer hidden state of step k",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "seconds": time.perf_counter() - start,
        "rows": rows,
    }
    if args.answers:
        result["answers"] = {"questions": QUESTIONS, **answers(mas)}
        result["seconds"] = time.perf_counter() - start
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cache_divergence.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"# KV-cached vs re-encode rollout, SmolLM2 planner, m = {m}, batch 1: ||Δh_k|| / ||h_k||\n")
    print("| link | question | dtype | " + " | ".join(f"k={k}" for k in MARKS if k <= m) + " | growth/step |")
    print("|---|---|---|" + "---|" * (len([k for k in MARKS if k <= m]) + 1))
    for r in rows:
        for dtype in ("float32", "float64"):
            cells = " | ".join(f"{r[dtype][k - 1]:.1e}" for k in MARKS if k <= m)
            g = r["float32_growth"]
            grows = f"x{g['per_step']:.2f} (k={g['from_step']}..{g['to_step']})" if g["per_step"] else "-"
            grows = grows if dtype == "float32" else "-"
            print(f"| {r['link']} | {r['question'][:24]} | {dtype} | {cells} | {grows} |")
    if args.answers:
        print("\n| answers | " + " | ".join(QUESTIONS) + " |\n|---|" + "---|" * len(QUESTIONS))
        for key, texts in result["answers"].items():
            if key != "questions":
                print(f"| {key} | " + " | ".join(t.replace("\n", " ")[-60:] for t in texts) + " |")
    print(f"\n{result['seconds']:.0f}s")


if __name__ == "__main__":
    main()
