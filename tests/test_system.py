"""The recursion on the tiny-random system: modes, caching, batching, traces, frozen backbones."""

import copy
import dataclasses
import time

import pytest
import torch

from recursivemas import GenerationConfig, PromptTemplate, RecursiveMAS, SystemConfig, build_preset
from recursivemas.errors import ConfigError, InputError
from recursivemas.system import Edge, stage_seed

from .conftest import QUESTIONS

GEN = GenerationConfig(max_new_tokens=10)


@pytest.mark.parametrize("mode", ["latent", "text", "single"])
def test_batch_invariance_all_modes(tiny_system, mode):
    batched = tiny_system.run(QUESTIONS, mode=mode, generation=GEN, batch_size=8)
    single = tiny_system.run(QUESTIONS, mode=mode, generation=GEN, batch_size=1)
    assert [r.text for r in batched] == [r.text for r in single]
    assert [r.usage for r in batched] == [r.usage for r in single]


def test_kv_cache_and_reference_agree_across_rounds(tiny_system):
    fast = tiny_system.run(QUESTIONS[:4], generation=GEN, rounds=3, latent_steps=8)
    slow = tiny_system.run(QUESTIONS[:4], generation=GEN, rounds=3, latent_steps=8, use_cache=False)
    assert [r.text for r in fast] == [r.text for r in slow]


def _planner_latents(system, use_cache):
    """The planner's latent embeddings of each round of a 3-round run on ``QUESTIONS[:3]``."""
    agent = system.agents["planner"]
    captured = []
    rollout = agent.think if use_cache else agent.think_reference

    def spy(*args, **kwargs):
        out = rollout(*args, **kwargs)
        captured.append(out.embeds.clone())
        return out

    name = "think" if use_cache else "think_reference"
    setattr(agent, name, spy)
    try:
        system.run(QUESTIONS[:3], generation=GEN, rounds=3, latent_steps=6, use_cache=use_cache)
    finally:
        delattr(agent, name)
    assert len(captured) == 3  # planner thinks once per round
    return captured


def test_latent_messages_agree_across_rounds(tiny_system):
    """Per-stage latents of the cached and re-encode paths agree through 3 rounds: to rounding in float64
    (<= 1e-10 on values of order 1), and relatively in float32, where the recurrences amplify rounding."""
    system64 = copy.deepcopy(tiny_system)
    for model in system64.models().values():
        model.double()
    system64.links.double()
    pairs64 = zip(_planner_latents(system64, True), _planner_latents(system64, False), strict=True)
    for fast, slow in pairs64:
        assert fast.dtype == torch.float64
        torch.testing.assert_close(fast, slow, atol=1e-10, rtol=0)
    pairs32 = zip(_planner_latents(tiny_system, True), _planner_latents(tiny_system, False), strict=True)
    for fast, slow in pairs32:
        assert fast.dtype == torch.float32
        err, scale = float((fast - slow).abs().max()), float(slow.abs().max())
        assert err <= 1e-4 * scale, f"max |fast - ref| = {err:.3g}, max |ref| = {scale:.3g}"


def test_trace_and_usage_are_consistent(tiny_system):
    rounds, m = 3, 5
    start = time.perf_counter()
    [result] = tiny_system.run(QUESTIONS[:1], generation=GEN, rounds=rounds, latent_steps=m)
    wall_s = time.perf_counter() - start
    stages = [(s.agent, s.round, s.kind) for s in result.trace]
    assert stages == [
        ("planner", 1, "latent"),
        ("critic", 1, "latent"),
        ("solver", 1, "latent"),
        ("planner", 2, "latent"),
        ("critic", 2, "latent"),
        ("solver", 2, "latent"),
        ("planner", 3, "latent"),
        ("critic", 3, "latent"),
        ("solver", 3, "text"),
    ]
    assert result.usage["latent_steps"] == (3 * rounds - 1) * m  # SPEC §5: 3r-1 latent rollouts
    assert result.usage["decoded_tokens"] == result.trace[-1].decoded_tokens > 0
    assert result.usage["prompt_tokens"] == sum(s.prompt_tokens for s in result.trace)
    # round 1 planner has no feedback; later planners and every critic/solver receive m latents
    assert [s.latent_inputs for s in result.trace] == [0] + [m] * 8
    assert result.trace[-1].final and not any(s.final for s in result.trace[:-1])
    assert sum(s.seconds for s in result.trace) <= result.timings["total_s"] <= wall_s  # stages run in turn


def test_text_mode_counts_all_decoded_tokens(tiny_system):
    [result] = tiny_system.run(QUESTIONS[:1], mode="text", generation=GEN, rounds=2)
    assert all(s.kind == "text" for s in result.trace) and len(result.trace) == 6
    assert result.usage["decoded_tokens"] == sum(s.decoded_tokens for s in result.trace)
    assert result.usage["latent_steps"] == 0


def test_single_mode_is_the_answerer_alone(tiny_system):
    [result] = tiny_system.run(QUESTIONS[:1], mode="single", generation=GEN)
    assert [(s.agent, s.kind) for s in result.trace] == [("solver", "text")]
    assert result.trace[0].latent_inputs == 0


def test_latent_messages_reach_the_answerer(tiny_system):
    """Changing only the planner's private context changes what the solver receives in latent mode."""
    solver = tiny_system.agents["solver"]
    seen = []
    original = solver.decode

    def spy(batch, *args, **kwargs):
        seen.append(batch)
        return original(batch, *args, **kwargs)

    base = {"question": QUESTIONS[0]}
    with_ctx = {"question": QUESTIONS[0], "context": {"planner": "The secret code is 4417."}}
    solver.decode = spy
    try:
        a, b = tiny_system.run([base, with_ctx], generation=GEN, batch_size=1)
    finally:
        del solver.decode
    assert a.trace[0].prompt_tokens < b.trace[0].prompt_tokens
    assert a.trace[-1].prompt_tokens == b.trace[-1].prompt_tokens  # the solver never sees the context
    ea, eb = seen[0].embeds[0], seen[1].embeds[0]  # (T, d): same text, different latents
    differs = (ea - eb).abs().amax(-1) > 1e-3  # (T,)
    m = a.trace[-1].latent_inputs
    assert differs.sum() == m  # exactly the m spliced latent positions carry the difference


def test_backbones_never_change(tiny_system):
    before = {n: [p.clone() for p in a.model.parameters()] for n, a in tiny_system.agents.items()}
    tiny_system.run(QUESTIONS[:2], generation=GEN)
    tiny_system.run(QUESTIONS[:2], mode="text", generation=GEN)
    for name, agent in tiny_system.agents.items():
        assert not any(p.requires_grad for p in agent.model.parameters())
        for old, new in zip(before[name], agent.model.parameters(), strict=True):
            assert torch.equal(old, new)
    assert all(p.requires_grad for p in tiny_system.parameters())
    assert sum(p.numel() for p in tiny_system.parameters()) == sum(
        p.numel() for p in tiny_system.links.parameters()
    )


def test_last_round_runs_only_agents_that_feed_the_answerer():
    cfg = SystemConfig(
        order=["a", "b", "c"],
        answerer="b",
        edges=[Edge("a", "b", "x"), Edge("b", "c", "y"), Edge("c", "a", "z")],
    )
    assert cfg.schedule(1, 2) == ["a", "b", "c"]
    assert cfg.schedule(2, 2) == ["a", "b"]


@pytest.mark.parametrize(
    "edges, match",
    [
        ([Edge("planner", "nobody", "x")], "not in"),
        ([Edge("planner", "critic", "planner"), Edge("solver", "critic", "planner")], "two edges"),
    ],
)
def test_bad_graphs(edges, match):
    with pytest.raises(ConfigError, match=match):
        SystemConfig(order=["planner", "critic", "solver"], answerer="solver", edges=edges)


def test_unknown_slot_in_graph(tiny_system):
    config = SystemConfig(
        order=["planner", "critic", "solver"], answerer="solver", edges=[Edge("planner", "critic", "plan")]
    )
    with pytest.raises(ConfigError, match="unknown slot 'plan' for agent 'critic'"):
        RecursiveMAS(list(tiny_system.agents.values()), config)


@pytest.mark.parametrize(
    "inputs, match",
    [
        (["   "], "empty"),
        ([{"question": "hi", "context": {"ghost": "x"}}], "unknown agents"),
        ([{"prompt": "hi"}], "question"),
    ],
)
def test_bad_inputs(tiny_system, inputs, match):
    with pytest.raises(InputError, match=match):
        tiny_system.run(inputs, generation=GEN)


def test_bad_run_settings(tiny_system):
    with pytest.raises(ConfigError, match="mode"):
        tiny_system.run(["hi"], mode="telepathy")
    with pytest.raises(ConfigError, match="rounds"):
        tiny_system.run(["hi"], rounds=0)


def test_a_mixture_graph_is_plain_data(tiny_agents):
    """Specialists in parallel -> summarizer, which feeds back to each: no new code, just a config."""
    specialist = PromptTemplate(system="Specialist.", user="{question}[[\nSummary so far: {slot:summary}]]")
    summarizer = PromptTemplate(
        system="Summarizer.", user="{question}[[\nMath: {slot:math}]][[\nScience: {slot:science}]]"
    )
    agents = [
        dataclasses.replace(tiny_agents["llama"], name="math", template=specialist),
        dataclasses.replace(tiny_agents["gemma3"], name="science", template=specialist),
        dataclasses.replace(tiny_agents["qwen3"], name="summarizer", template=summarizer),
    ]
    config = SystemConfig(
        order=["math", "science", "summarizer"],
        answerer="summarizer",
        rounds=2,
        latent_steps=3,
        edges=[
            Edge("math", "summarizer", "math"),
            Edge("science", "summarizer", "science"),
            Edge("summarizer", "math", "summary"),
            Edge("summarizer", "science", "summary"),
        ],
    )
    system = RecursiveMAS(agents, config).init_links("training-free")
    [result] = system.run(QUESTIONS[:1], generation=GEN)
    assert [(s.agent, s.round, s.kind, s.latent_inputs) for s in result.trace] == [
        ("math", 1, "latent", 0),
        ("science", 1, "latent", 0),
        ("summarizer", 1, "latent", 6),
        ("math", 2, "latent", 3),
        ("science", 2, "latent", 3),
        ("summarizer", 2, "text", 6),
    ]


def test_bfloat16_agents_run_in_every_mode():
    system = build_preset("tiny-random", dtype=torch.bfloat16, rounds=2, latent_steps=3)
    for mode in ("latent", "text", "single"):
        [result] = system.run(QUESTIONS[:1], mode=mode, generation=GEN)
        assert result.usage["decoded_tokens"] > 0


def test_links_live_on_their_agents_device(tiny_system):
    for config in tiny_system.link_configs():
        link = tiny_system.links[config.kind][config.name]
        assert all(p.device == tiny_system.link_device(config) for p in link.parameters())
    assert tiny_system.link_device(tiny_system.links["outer"]["critic->solver"].config) == torch.device("cpu")


def test_stage_seeds_differ_by_agent_and_round():
    seeds = {stage_seed(0, agent, r) for agent in ("planner", "critic", "solver") for r in (1, 2)}
    assert len(seeds) == 6 and stage_seed(0, "planner", 1) == stage_seed(0, "planner", 1)


def test_reserved_names_and_duplicate_edge_pairs(tiny_agents):
    agent = dataclasses.replace(tiny_agents["llama"], name="to")
    with pytest.raises(ConfigError, match="clash"):
        RecursiveMAS([agent], SystemConfig(order=["to"], answerer="to", edges=[]))
    with pytest.raises(ConfigError, match="one edge per sender and receiver"):
        SystemConfig(order=["a", "b"], answerer="b", edges=[Edge("a", "b", "x"), Edge("a", "b", "y")])


def test_context_cannot_smuggle_slot_markers(tiny_system):
    with pytest.raises(InputError, match="reserved characters"):
        tiny_system.run([{"question": "hi", "context": {"planner": "\ue0000\ue001"}}], generation=GEN)
