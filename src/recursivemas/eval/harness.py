"""Run several modes of one system on one task, with the same questions, prompts, rounds, decoding
settings and seeds, and score every prediction.

Modes: ``single``, ``text`` (Recursive-TextMAS), ``latent`` (RecursiveMAS with the system's links) and
``latent-free`` (latent mode with training-free link initialisation, the LatentMAS-like baseline).
Seeds change only the sampling seeds; with ``temperature == 0`` every seed gives the same predictions.
"""

from __future__ import annotations

import math
import statistics
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from recursivemas.agent import GenerationConfig
from recursivemas.errors import ConfigError
from recursivemas.eval.tasks import Example, Task
from recursivemas.memory import PeakMemory
from recursivemas.system import RecursiveMAS

EVAL_MODES = ("single", "text", "latent", "latent-free")


@dataclass(frozen=True)
class EvalSettings:
    """Everything that must be equal across modes for a fair comparison."""

    modes: tuple[str, ...] = EVAL_MODES
    seeds: tuple[int, ...] = (0, 1, 2)
    rounds: int | None = None
    latent_steps: int | None = None
    batch_size: int = 8
    max_new_tokens: int = 256
    temperature: float = 0.6
    top_p: float = 0.95
    lenient: bool = False

    def __post_init__(self) -> None:
        unknown = [m for m in self.modes if m not in EVAL_MODES]
        if unknown or not self.modes:
            raise ConfigError(f"unknown modes {unknown or '(none)'}; choose from {', '.join(EVAL_MODES)}")
        if not self.seeds:
            raise ConfigError("give at least one seed")
        GenerationConfig(
            self.max_new_tokens, self.temperature, self.top_p, 0
        )  # validates the decoding settings


@dataclass
class Prediction:
    """One scored answer."""

    id: str
    mode: str
    seed: int
    question: str
    gold: str
    text: str
    extracted: str | None
    correct: bool
    decoded_tokens: int
    latent_steps: int
    detail: str = ""
    trace: list = field(default_factory=list)
    diagnostics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ModeRun:
    """Predictions of one mode over all seeds, with its wall time and peak memory."""

    predictions: list[Prediction]
    seconds: float
    peak_memory_bytes: int


def with_training_free_links(system: RecursiveMAS) -> RecursiveMAS:
    """A system on the same agents (no copy of the models) whose links are training-free initialised."""
    return RecursiveMAS(list(system.agents.values()), system.config).init_links("training-free")


def run_mode(
    system: RecursiveMAS,
    task: Task,
    examples: list[Example],
    mode: str,
    settings: EvalSettings,
    on_batch: Callable[[int], None] | None = None,
) -> ModeRun:
    """Answer and score ``examples`` in ``mode`` once per seed."""
    runner = with_training_free_links(system) if mode == "latent-free" else system
    run_as = "latent" if mode == "latent-free" else mode
    device = next(iter(system.agents.values())).device
    inputs = [{"question": ex.question, "context": ex.context} for ex in examples]
    outputs = []
    start = time.perf_counter()
    with PeakMemory(device) as memory:
        for seed in settings.seeds:
            gen = GenerationConfig(settings.max_new_tokens, settings.temperature, settings.top_p, seed)
            # one seed per example id: the same sample whatever the batch, shard or position
            question_seeds = [example_seed(seed, ex.id) for ex in examples]
            results = runner.run(
                inputs,
                mode=run_as,
                generation=gen,
                rounds=settings.rounds,
                latent_steps=settings.latent_steps,
                batch_size=settings.batch_size,
                seeds=question_seeds,
                on_batch=on_batch,
                lens_top_k=task.lens_top_k if run_as == "latent" else 0,
            )
            outputs.append((seed, results))
    seconds = time.perf_counter() - start  # generation only: scoring (the code sandbox) is not timed
    predictions = []
    for seed, results in outputs:
        for ex, result in zip(examples, results, strict=True):
            score = task.score(ex, result.text, settings.lenient)
            predictions.append(
                Prediction(
                    id=ex.id,
                    mode=mode,
                    seed=seed,
                    question=ex.question,
                    gold=ex.gold,
                    text=result.text,
                    extracted=score.extracted,
                    correct=score.correct,
                    decoded_tokens=result.usage["decoded_tokens"],
                    latent_steps=result.usage["latent_steps"],
                    detail=score.detail,
                    trace=[asdict(s) for s in result.trace],
                    diagnostics=(
                        task.diagnose(runner, ex, result.trace)
                        if task.diagnose is not None and run_as == "latent"
                        else {}
                    ),
                )
            )
    return ModeRun(predictions, seconds, memory.peak)


def example_seed(seed: int, example_id: str) -> int:
    """A sampling seed for one example under run seed ``seed``."""
    return (seed * 1_000_003 + zlib.crc32(example_id.encode())) % 2**61


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``correct / total`` (``(0, 1)`` when ``total == 0``)."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def summarize(runs: dict[str, list[ModeRun]], seeds: tuple[int, ...]) -> dict[str, dict]:
    """Per mode: accuracy mean and std over seeds, its 95% interval (Wilson, over all predictions), n,
    the number of distinct extracted answers (a run that answers everything alike is a failure however
    it scores), token and latent-step means, seconds, peak memory.

    ``runs[mode]`` may hold one ``ModeRun`` per shard; predictions are pooled, times added, peaks maxed.
    """
    summary = {}
    for mode, parts in runs.items():
        preds = [p for part in parts for p in part.predictions]
        per_seed = [statistics.fmean(p.correct for p in preds if p.seed == s) for s in seeds]
        low, high = wilson_interval(sum(p.correct for p in preds), len(preds))
        summary[mode] = {
            "accuracy": statistics.fmean(per_seed),
            "accuracy_std": statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0,
            "accuracy_ci95": [low, high],
            "distinct_answers": len({p.extracted for p in preds}),
            "n": len({p.id for p in preds}),
            "decoded_tokens_mean": statistics.fmean(p.decoded_tokens for p in preds),
            "latent_steps_mean": statistics.fmean(p.latent_steps for p in preds),
            "seconds_total": sum(part.seconds for part in parts),
            "peak_memory_bytes": max(part.peak_memory_bytes for part in parts),
        }
        keys = sorted({k for p in preds for k in p.diagnostics})
        if keys:
            summary[mode]["diagnostics"] = {
                k: statistics.fmean(p.diagnostics[k] for p in preds if k in p.diagnostics) for k in keys
            }
    return summary


def choose_latent_steps(
    system: RecursiveMAS, task: Task, candidates: list[int], settings: EvalSettings
) -> tuple[int, dict[int, float]]:
    """Pick the latent length with the best latent-mode accuracy on the validation split (ties: the shorter).

    The test split is never looked at here.
    """
    if not task.validation:
        raise ConfigError("sweeping --latent-steps needs a validation split: pass --val-size N")
    accuracy = {}
    for m in candidates:
        trial = EvalSettings(
            ("latent",),
            settings.seeds,
            settings.rounds,
            m,
            settings.batch_size,
            settings.max_new_tokens,
            settings.temperature,
            settings.top_p,
            settings.lenient,
        )
        run = run_mode(system, task, task.validation, "latent", trial)
        accuracy[m] = statistics.fmean(p.correct for p in run.predictions)
    best = max(candidates, key=lambda m: (accuracy[m], -m))
    return best, accuracy
