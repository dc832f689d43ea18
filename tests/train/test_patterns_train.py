"""Training any pattern: configs name a pattern and its roles, relay facts go to its first agent, and the
links of every pattern's tiny preset learn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recursivemas.errors import ConfigError
from recursivemas.train.trainer import Trainer

TINY_PRESETS = {"mixture": "tiny-random-mixture", "distillation": "tiny-random-distillation"}


@pytest.mark.parametrize("pattern", sorted(TINY_PRESETS))
def test_every_pattern_trains_its_links(make_config, pattern):
    """Outer training on the pattern's tiny preset: relay facts go to its first agent, the loss falls."""
    cfg = make_config(
        system={"preset": TINY_PRESETS[pattern], "rounds": 1, "latent_steps": 2},
        data={"sources": [{"kind": "relay", "n": 4}], "validation": 0},
        optim={"max_steps": 30, "lr": 1e-2, "batch_size": 4, "warmup_steps": 1},
        run={"checkpoint_every": 30, "validate_every": 30},
    )
    trainer = Trainer(cfg)
    first = trainer.system.config.order[0]
    assert all(set(r.context) == {first} for r in trainer.splits.train)
    before = {k: v.clone() for k, v in trainer.system.links.state_dict().items()}
    trainer.run()
    log = [json.loads(x) for x in (Path(cfg.run.output) / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r["kind"] == "train"]
    assert losses[-1] < losses[0] - 0.3  # nats: links alone move a random model's answer CE
    changed = {k for k, v in trainer.system.links.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("outer.") for k in changed)


def test_train_config_takes_any_pattern_and_checks_its_roles(make_config):
    cfg = make_config(
        system={
            "preset": None,
            "pattern": "distillation",
            "agents": {"expert": "tiny-random:gemma3", "learner": "tiny-random:llama"},
            "rounds": 1,
            "latent_steps": 2,
        },
        optim={"max_steps": 1},
    )
    assert cfg.system.preset is None
    with pytest.raises(ConfigError, match="takes exactly the roles expert, learner"):
        make_config(system={"pattern": "distillation", "agents": {"planner": "tiny-random:llama"}})
