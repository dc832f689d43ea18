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


def _distill_config(make_config, weight: float, steps: int = 1):
    return make_config(
        system={"preset": "tiny-random-distillation", "rounds": 1, "latent_steps": 2},
        data={"sources": [{"kind": "reasoning-gym", "name": "basic_arithmetic", "n": 4}], "validation": 0},
        objective={"outer": "distill", "distill_weight": weight},
        optim={"max_steps": steps, "lr": 1e-2, "batch_size": 4, "warmup_steps": 1},
        run={"checkpoint_every": steps, "validate_every": steps},
    )


def test_distill_without_weight_is_the_answer_ce_and_with_weight_differs(make_config):
    from recursivemas.train.objectives import UnrolledObjective, build_objective

    trainer = Trainer(_distill_config(make_config, 0.0))
    rows = trainer.splits.train[:4]
    plain = UnrolledObjective(trainer.system, trainer.config).loss(rows).loss
    assert torch.allclose(build_objective(trainer.system, trainer.config).loss(rows).loss, plain)
    weighted = Trainer(_distill_config(make_config, 1.0)).objective.loss(rows).loss
    assert float(weighted.detach()) >= 0 and not torch.allclose(weighted, plain)


def test_distill_aligns_positions_across_tokenizers(make_config):
    from recursivemas.train.objectives import _aligned_positions

    trainer = Trainer(_distill_config(make_config, 1.0))
    learner, teacher = trainer.system.agents["learner"], trainer.system.agents["expert"]
    text = "\\boxed{1234}"
    ids = learner.tokenizer(text, add_special_tokens=False)["input_ids"]
    other = teacher.tokenizer(text, add_special_tokens=False)["input_ids"]
    pairs = _aligned_positions(learner, teacher, text, ids, other)
    assert pairs[0] == (0, 0) and 0 < len(pairs) <= len(ids)
    assert _aligned_positions(learner, learner, text, ids, ids) == [(j, j) for j in range(len(ids))]


def test_distill_training_lowers_the_kl_to_the_expert(make_config):
    cfg = _distill_config(make_config, 1.0, steps=20)
    trainer = Trainer(cfg)
    trainer.run()
    log = [json.loads(x) for x in (Path(cfg.run.output) / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r["kind"] == "train"]
    assert losses[-1] < losses[0] - 0.03
