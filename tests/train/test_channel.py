"""Objectives that make the latent channel carry information: own-text inner targets, token alignment
of outer links, and training a subset of links (tiny-random system)."""

from __future__ import annotations

import pytest
import torch

from recursivemas.agent import GenerationConfig
from recursivemas.errors import ConfigError
from recursivemas.train.data import TrainRow
from recursivemas.train.objectives import AlignObjective, InnerObjective, UnrolledObjective, target_ids
from recursivemas.train.trainer import build_system, select_trainable

ROWS = [
    TrainRow("What is the secret number?", "42", context={"planner": "The secret number is 42."}),
    TrainRow("What is 2+3?", "5"),
]


@pytest.fixture
def system(make_config):
    return build_system(make_config().system, "cpu")


def test_own_text_targets_are_what_each_agent_writes_in_text_mode(system, make_config):
    cfg = make_config(stage="inner", objective={"inner_targets": "own-text", "own_text_tokens": 6})
    objective = InnerObjective(system, cfg)
    texts = objective.own_texts(ROWS)
    reference = system.run(
        [{"question": r.question, "context": r.context} for r in ROWS],
        mode="text",
        rounds=1,
        generation=GenerationConfig(max_new_tokens=6),
    )
    assert texts["planner"] == [r.trace[0].text for r in reference]
    assert texts["solver"] == [r.text for r in reference]
    values, targets = objective.targets(system.agents["critic"], ROWS)
    assert values == {"planner": texts["planner"]}  # the upstream agent's text fills the slot
    assert targets == texts["critic"]
    values, _ = objective.targets(system.agents["planner"], ROWS)
    assert values == {}  # the feedback edge (solver -> planner) is not upstream in round 1
    out = objective.loss(ROWS, keys=[0, 1])
    assert torch.isfinite(out.loss) and out.count > 0


def test_own_text_and_answer_targets_differ(system, make_config):
    own = InnerObjective(system, make_config(stage="inner", objective={"inner_targets": "own-text"}))
    answer = InnerObjective(system, make_config(stage="inner"))
    planner = system.agents["planner"]
    assert own.targets(planner, ROWS)[1] != answer.targets(planner, ROWS)[1]


def test_align_objective_learns_the_token_map_and_is_deterministic(system, make_config):
    cfg = make_config(objective={"outer": "align"}, optim={"links": ["planner->critic"]})
    named = select_trainable(system, "outer", "links", cfg.optim.links)
    objective = AlignObjective(system, cfg)
    assert [e.key for e in objective.edges] == ["planner->critic"]
    first = objective.loss(ROWS, keys=[3, 4])
    assert torch.equal(first.loss, objective.loss(ROWS, keys=[3, 4]).loss)
    optimizer = torch.optim.Adam(named.values(), lr=1e-2)
    for _ in range(30):
        out = objective.loss(ROWS, keys=[3, 4])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    after = objective.loss(ROWS, keys=[3, 4])
    assert float(after.loss.detach()) < 0.5 * float(first.loss.detach())
    assert after.metrics["top1/planner->critic"] > first.metrics["top1/planner->critic"]


def test_only_the_named_links_learn(system):
    named = select_trainable(system, "outer", "links", ["critic->solver"])
    assert named and all(n.startswith("links.outer.critic->solver.") for n in named)
    assert not any(p.requires_grad for p in system.links["outer"]["planner->critic"].parameters())


def test_an_outer_stage_can_fine_tune_an_inner_link_through_its_rollout(system, make_config):
    named = select_trainable(system, "outer", "links", ["critic", "critic->solver"])
    inner = {n for n in named if n.startswith("links.inner.critic.")}
    assert inner and inner | {n for n in named if n.startswith("links.outer.critic->solver.")} == set(named)
    assert not any(p.requires_grad for p in system.links["inner"]["planner"].parameters())
    objective = UnrolledObjective(system, make_config(system={"rounds": 1}))
    objective.loss(ROWS, keys=[0, 1]).loss.backward()
    grads = [named[n].grad for n in inner]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


def test_align_refuses_inner_links_it_would_never_train(system, make_config):
    cfg = make_config(objective={"outer": "align"}, optim={"links": ["critic", "planner->critic"]})
    with pytest.raises(ConfigError, match=r"remove \['critic'\] from optim.links"):
        AlignObjective(system, cfg)


def test_unknown_link_name_is_a_clear_error(system):
    with pytest.raises(ConfigError, match=r"optim.links names \['nope'\]"):
        select_trainable(system, "outer", "links", ["nope"])


def test_on_policy_adds_the_agents_own_rollout_states(system, make_config):
    objective = {"inner_targets": "own-text", "own_text_tokens": 5, "precompute": False}
    plain = InnerObjective(system, make_config(stage="inner", objective=objective))
    rolled = InnerObjective(system, make_config(stage="inner", objective=objective | {"on_policy": True}))
    critic = system.agents["critic"]
    base, more = plain.examples(critic, ROWS), rolled.examples(critic, ROWS)
    _, texts = plain.targets(critic, ROWS)
    for b, m, ids in zip(base, more, target_ids(critic, texts, 5), strict=True):
        assert m.hidden.shape[0] == b.hidden.shape[0] + len(ids)  # one rollout state per target token
        torch.testing.assert_close(m.hidden[: b.hidden.shape[0]], b.hidden)
        torch.testing.assert_close(m.targets[b.targets.shape[0] :], critic.embed(torch.tensor(ids)).float())


def test_align_without_shared_tokens_is_a_clear_error(system, make_config, monkeypatch):
    monkeypatch.setattr("recursivemas.train.objectives._token_pairs", lambda src, dst: [])
    objective = AlignObjective(system, make_config(objective={"outer": "align"}))
    with pytest.raises(ConfigError, match="share no token text"):
        objective.loss(ROWS, keys=[0, 1])


def test_latent_slots_put_the_upstream_thoughts_where_the_texts_were(system, make_config):
    """The critic's prompt holds the planner's mapped latent thoughts (m vectors) instead of its text;
    the target text stays the critic's own, and the planner (no upstream agent) is unchanged."""
    objective = {"inner_targets": "own-text", "own_text_tokens": 5, "precompute": False}
    plain = InnerObjective(system, make_config(stage="inner", objective=objective))
    latent = InnerObjective(system, make_config(stage="inner", objective=objective | {"latent_slots": True}))
    critic, planner = system.agents["critic"], system.agents["planner"]
    values, texts = latent.targets(critic, ROWS)
    assert texts == plain.targets(critic, ROWS)[1]
    steps = system.config.steps("planner")
    assert [tuple(v.shape) for v in values["planner"]] == [(steps, critic.hidden_size)] * len(ROWS)
    reference = system.run(
        [{"question": r.question, "context": r.context} for r in ROWS], rounds=1, batch_size=len(ROWS)
    )
    assert all(res.trace[1].latent_inputs == steps for res in reference)  # what inference splices in
    assert latent.targets(planner, ROWS)[0] == {}
    for a, b in zip(latent.examples(critic, ROWS), plain.examples(critic, ROWS), strict=True):
        assert a.hidden.shape == b.hidden.shape and not torch.allclose(a.hidden, b.hidden)
