"""Every pattern of the registry on its tiny preset: all modes, batching, cache vs re-encode, save and
load, training, the relay sender, and clear errors for a pattern given the wrong roles."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from recursivemas import GenerationConfig, RecursiveMAS, build_preset
from recursivemas.errors import ConfigError
from recursivemas.eval.tasks import load_task
from recursivemas.patterns import PATTERNS, build_pattern, get_pattern
from recursivemas.presets import PRESETS

from .conftest import QUESTIONS

GEN = GenerationConfig(max_new_tokens=8)
TINY_PRESETS = {
    "mixture": "tiny-random-mixture",
    "distillation": "tiny-random-distillation",
    "deliberation": "tiny-random-deliberation",
}


@pytest.fixture(scope="module", params=sorted(TINY_PRESETS))
def system(request) -> RecursiveMAS:
    return build_preset(TINY_PRESETS[request.param], rounds=2, latent_steps=4)


def test_every_pattern_is_registered_with_its_roles():
    assert set(PATTERNS) >= {"sequential", "pair", "mixture", "distillation"}
    assert get_pattern("mixture").roles == ("math", "code", "science", "summarizer")
    assert get_pattern("distillation").roles == ("expert", "learner")
    assert get_pattern("deliberation").roles == ("reflector", "toolcaller")
    for name, pattern in TINY_PRESETS.items():
        assert build_preset(pattern, rounds=1, latent_steps=1).config.pattern == name
        assert name in PRESETS[pattern].description.lower()


@pytest.mark.parametrize("mode", ["latent", "text", "single"])
def test_all_modes_are_batch_invariant(system, mode):
    batched = system.run(QUESTIONS[:4], mode=mode, generation=GEN, batch_size=4)
    alone = system.run(QUESTIONS[:4], mode=mode, generation=GEN, batch_size=1)
    assert [r.text for r in batched] == [r.text for r in alone]
    stages = [(s.agent, s.round, s.kind) for s in batched[0].trace]
    if mode == "single":
        assert stages == [(system.config.answerer, 1, "text")]
    else:
        kind = "latent" if mode == "latent" else "text"
        expected = [(n, r, kind) for r in (1, 2) for n in system.config.order]
        expected[-1] = (system.config.answerer, 2, "text")
        assert stages == expected


def test_kv_cache_equals_reencode(system):
    fast = system.run(QUESTIONS[:3], generation=GEN)
    slow = system.run(QUESTIONS[:3], generation=GEN, use_cache=False)
    assert [r.text for r in fast] == [r.text for r in slow]


def test_every_message_reaches_its_receiver(system):
    """Round 2: the answerer reads every sender's thoughts, and the first agent reads the answerer's."""
    [result] = system.run(QUESTIONS[:1], generation=GEN)
    inputs = {(s.agent, s.round): s.latent_inputs for s in result.trace}
    senders = [e for e in system.config.edges if e.dst == system.config.answerer]
    assert inputs[(system.config.answerer, 2)] == 4 * len(senders)
    assert inputs[(system.config.order[0], 1)] == 0
    assert inputs[(system.config.order[0], 2)] == 4


def test_save_and_load_keep_pattern_links_and_per_agent_steps(system, tmp_path):
    system = build_preset(f"tiny-random-{system.config.pattern}", rounds=2, latent_steps=3, init="default")
    system.config.agent_latent_steps = {system.config.order[0]: 5}
    system.save_pretrained(str(tmp_path))
    loaded = RecursiveMAS.from_pretrained(str(tmp_path))
    assert loaded.config.to_dict() == system.config.to_dict()
    for key, value in system.links.state_dict().items():
        assert torch.equal(loaded.links.state_dict()[key], value)
    [a] = system.run(QUESTIONS[:1], generation=GEN)
    [b] = loaded.run(QUESTIONS[:1], generation=GEN)
    assert a.text == b.text
    assert a.trace[0].latent_steps == 5 and a.trace[1].latent_steps == 3
    assert {k: sorted(v.tools) for k, v in loaded.tools.items()} == {
        k: sorted(v.tools) for k, v in system.tools.items()
    }


def test_mixture_takes_any_specialists(tiny_agents):
    agents = {
        "algebra": dataclasses.replace(tiny_agents["llama"], name="algebra", template=None),
        "biology": dataclasses.replace(tiny_agents["gemma3"], name="biology", template=None),
        "summarizer": dataclasses.replace(tiny_agents["qwen3"], name="summarizer", template=None),
    }
    system = build_pattern("mixture", agents, rounds=1, latent_steps=2)
    assert system.config.order == ["algebra", "biology", "summarizer"]
    assert system.agents["summarizer"].template.slots == ("algebra", "biology")
    assert "biology" in system.agents["biology"].template.system
    [result] = system.run(QUESTIONS[:1], generation=GEN)
    assert result.trace[-1].latent_inputs == 4


@pytest.mark.parametrize(
    ("pattern", "roles", "match"),
    [
        ("distillation", ["expert"], "takes exactly the roles expert, learner"),
        ("sequential", ["planner", "critic", "writer"], "takes exactly the roles planner, critic, solver"),
        ("mixture", ["math", "code"], "needs a 'summarizer'"),
        ("mixture", ["summarizer"], "at least one other role"),
        ("debate", ["a", "b"], "unknown pattern 'debate'"),
    ],
)
def test_wrong_roles_are_clear_errors(tiny_agents, pattern, roles, match):
    agents = {r: dataclasses.replace(tiny_agents["llama"], name=r, template=None) for r in roles}
    with pytest.raises(ConfigError, match=match):
        build_pattern(pattern, agents)


def test_relay_facts_go_to_the_chosen_sender():
    task = load_task("relay:1", limit=2, relay_sender="expert")
    assert set(task.examples[0].context) == {"expert"}
