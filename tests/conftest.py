"""Shared fixtures: tiny random models (Llama, Qwen3, Gemma3) and the tiny-random system, built offline."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from recursivemas import Agent, build_preset
from recursivemas.models.tiny import TINY_MODELS, tiny_model
from recursivemas.prompts import ROLE_TEMPLATES

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


@pytest.fixture(scope="session")
def tiny_agents() -> dict[str, Agent]:
    """One agent per tiny architecture, named after it, with the solver's prompt."""
    agents = {}
    for name in TINY_MODELS:
        model, tok = tiny_model(name)
        agents[name] = Agent(
            name=name,
            model=model,
            tokenizer=tok,
            template=ROLE_TEMPLATES["solver"],
            model_id=f"tiny-random:{name}",
        )
    return agents


@pytest.fixture(scope="session")
def tiny_system():
    return build_preset("tiny-random", rounds=2, latent_steps=6)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def accelerate_cpu_launch(processes: int, *args: str) -> list[str]:
    """``accelerate launch --cpu --num_processes N -m recursivemas ARGS`` with every launcher default
    given (no warnings), as users run it."""
    return [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--cpu",
        f"--num_processes={processes}",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        f"--main_process_port={29500 + os.getpid() % 1000}",
        "-m",
        "recursivemas",
        *args,
    ]


_PROBE_OUTCOMES: dict[str, list[str]] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Collect the outcome of every ``probe``-marked test (its call phase, or a failed/skipped setup)."""
    probe = getattr(report, "probe_id", None)
    if probe and (report.when == "call" or report.outcome != "passed"):
        _PROBE_OUTCOMES.setdefault(probe, []).append(report.outcome)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    marker = item.get_closest_marker("probe")
    if marker:
        outcome.get_result().probe_id = marker.args[0]


def pytest_sessionfinish(session: pytest.Session) -> None:
    """With ``RECURSIVEMAS_RELIABILITY=<file>``, write the reliability table with each probe's outcome."""
    target = os.environ.get("RECURSIVEMAS_RELIABILITY")
    if target:
        from tests.reliability import reliability_table

        Path(target).write_text(reliability_table(_PROBE_OUTCOMES))
