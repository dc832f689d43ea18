"""Shared helpers for training tests: a tiny config, and the tiny-random system's rows."""

from __future__ import annotations

import copy

import pytest

from recursivemas.train.config import TrainConfig

TINY = {
    "stage": "outer",
    "system": {"preset": "tiny-random", "rounds": 2, "latent_steps": 3},
    "data": {
        "sources": [
            {"kind": "relay", "n": 12},
            {"kind": "reasoning-gym", "name": "basic_arithmetic", "n": 12},
        ],
        "validation": 4,
        "max_answer_tokens": 8,
    },
    "optim": {"max_steps": 4, "batch_size": 2, "warmup_steps": 1},
    "run": {"checkpoint_every": 2, "validate_every": 2},
}


def tiny_config(tmp_path, **sections) -> TrainConfig:
    """The tiny config with sections updated (``optim={"lr": 1e-2}`` merges into ``optim``)."""
    raw = copy.deepcopy(TINY)
    raw["run"]["output"] = str(tmp_path / "run")
    for key, value in sections.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    return TrainConfig.from_dict(raw)


@pytest.fixture
def make_config(tmp_path):
    return lambda **sections: tiny_config(tmp_path, **sections)
