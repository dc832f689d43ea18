"""Objectives on the tiny-random system: equal paths agree, gradients go where they should."""

from __future__ import annotations

import pytest
import torch

from recursivemas.errors import InputError
from recursivemas.train.config import TrainConfig
from recursivemas.train.data import TrainRow, build_splits
from recursivemas.train.objectives import (
    InnerObjective,
    TeacherForcedObjective,
    UnrolledObjective,
    build_objective,
)
from recursivemas.train.trainer import build_system, select_trainable
from tests.train.conftest import TINY

TEACHER_ROWS = [
    TrainRow("What is 2+3?", "5", {"plan": "Add the numbers.", "refined_plan": "Add 2 and 3 to get 5."}),
    TrainRow(
        "What is 7-4?", "3", {"plan": "Subtract.", "refined_plan": "7 minus 4 is 3."}, {"planner": "hint"}
    ),
]


@pytest.fixture(scope="module")
def system():
    return build_system(TrainConfig.from_dict(TINY).system, "cpu")


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in module.named_parameters()}


def _zero(system) -> None:
    system.links.zero_grad(set_to_none=True)


def test_inner_precomputed_and_online_losses_agree(system, make_config):
    for positions in ("answer", "all"):
        cfg = make_config(stage="inner", objective={"positions": positions})
        rows = build_splits(cfg.data).train[:3]
        objective = InnerObjective(system, cfg)
        cached = objective.loss(rows, keys=[0, 1, 2])
        again = objective.loss(rows, keys=[0, 1, 2])  # served from the cache
        online = objective.loss(rows)
        assert torch.allclose(cached.loss, online.loss, atol=1e-6)
        assert torch.allclose(again.loss, online.loss, atol=1e-6)
        assert cached.count == online.count > 0


def test_inner_answer_positions_count_answer_tokens(system, make_config):
    cfg = make_config(
        stage="inner", objective={"positions": "answer", "precompute": False}, data={"max_answer_tokens": 32}
    )
    rows = [TrainRow("What is 2+3?", "5")]
    objective = InnerObjective(system, cfg)
    for name, agent in system.agents.items():
        ids = agent.tokenizer(["\\boxed{5}"], add_special_tokens=False)["input_ids"][0]
        examples = objective.examples(agent, rows)
        assert examples[0].hidden.shape[0] == len(ids) + 1  # answer tokens + EOS, one prediction each
        # the targets are the answer's own input embeddings, in order
        expected = agent.embed(torch.tensor([*ids, agent.eos_ids[0]])).float()
        assert torch.allclose(examples[0].targets, expected), name


def test_inner_loss_reaches_only_inner_links(system, make_config):
    cfg = make_config(stage="inner", objective={"precompute": False})
    select_trainable(system, "inner", "links")
    _zero(system)
    out = InnerObjective(system, cfg).loss(build_splits(cfg.data).train[:2])
    out.loss.backward()
    assert all(g is not None for g in _grads(system.links["inner"]).values())
    assert all(g is None for g in _grads(system.links["outer"]).values())
    for agent in system.agents.values():
        assert all(p.grad is None for p in agent.model.parameters())
    assert set(out.metrics) == {f"loss/{n}" for n in system.agents}
    _zero(system)


def test_unrolled_gradients_reach_outer_links_through_frozen_models(system, make_config):
    cfg = make_config()
    select_trainable(system, "outer", "links")
    _zero(system)
    rows = build_splits(cfg.data).train[:2]
    out = UnrolledObjective(system, cfg).loss(rows)
    assert torch.isfinite(out.loss) and out.count > 0
    out.loss.backward()
    grads = _grads(system.links["outer"])
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # the feedback link solver->planner only acts through round 2's planner: it must still get gradient
    assert float(system.links["outer"]["solver->planner"].residual_proj.weight.grad.abs().sum()) > 0
    assert all(g is None for g in _grads(system.links["inner"]).values())
    for agent in system.agents.values():
        assert all(p.grad is None for p in agent.model.parameters())
    norms = out.round_grad_norms()
    assert set(norms) == {1, 2} and all(v > 0 for v in norms.values())
    _zero(system)


def test_gradient_checkpointing_gives_the_same_gradients(system, make_config):
    select_trainable(system, "outer", "links")
    rows = build_splits(make_config().data).train[:2]
    results = []
    for flag in (True, False):
        _zero(system)
        out = UnrolledObjective(system, make_config(objective={"gradient_checkpointing": flag})).loss(rows)
        out.loss.backward()
        results.append(
            (float(out.loss.detach()), {n: g.clone() for n, g in _grads(system.links["outer"]).items()})
        )
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4), name
    _zero(system)


def test_intermediate_round_losses_are_added(system, make_config):
    rows = build_splits(make_config().data).train[:2]
    with torch.no_grad():
        base = UnrolledObjective(system, make_config()).loss(rows)
        extra = UnrolledObjective(system, make_config(objective={"intermediate_weight": 0.5})).loss(rows)
    assert "intermediate_ce" in extra.metrics
    expected = base.metrics["answer_ce"] + 0.5 * extra.metrics["intermediate_ce"]
    assert float(extra.loss) == pytest.approx(expected, rel=1e-5)


def test_teacher_forced_needs_reference_texts_and_trains_outer_links(system, make_config):
    cfg = make_config(objective={"outer": "teacher-forced", "teacher_positions": 4})
    objective = build_objective(system, cfg)
    assert isinstance(objective, TeacherForcedObjective)
    with pytest.raises(InputError, match="needs a 'plan' field"):
        objective.loss([TrainRow("What is 1+1?", "2")])
    select_trainable(system, "outer", "links")
    _zero(system)
    out = objective.loss(TEACHER_ROWS)
    out.loss.backward()
    grads = _grads(system.links["outer"])
    trained = {n.split(".")[0] for n, g in grads.items() if g is not None}
    assert trained == {"planner->critic", "critic->solver"}  # one round: no feedback edge
    _zero(system)


def test_teacher_fields_must_cover_every_sender(system, make_config):
    cfg = make_config(objective={"outer": "teacher-forced", "teacher_fields": {"planner": "plan"}})
    with pytest.raises(InputError, match=r"\['critic'\]"):
        build_objective(system, cfg)
