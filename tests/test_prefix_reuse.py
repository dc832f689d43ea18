"""``cache.PromptPrefixes``: a prompt pass that starts with the columns of the agent's previous one runs only
the rest, over a cache holding theirs, with the outputs of a whole pass (float64 to rounding); it is used
only where that holds (gradients off, a dynamic cache of key/value layers, no sliding window that dropped
positions, a rotary embedding independent of the length, int8 layers on the same kernel), and
``RecursiveMAS.run`` uses it across rounds."""

import copy
import dataclasses

import pytest
import torch
from transformers import AutoConfig, DynamicCache

from recursivemas.agent import GenerationConfig, StepConfig
from recursivemas.cache import (
    PREFIX_LAYERS,
    PromptPrefixes,
    cache_kwargs,
    cache_layers,
    new_cache,
    prefix_reusable,
)
from recursivemas.quantize import INT8_MAX_ROWS, quantize_module
from recursivemas.tools import ToolBox

from .conftest import QUESTIONS
from .test_agent import ARCHS, _float64, _link

SLOT = "critic"  # the solver template's slot


def _with(agent, **step):
    return dataclasses.replace(agent, step_config=StepConfig(**step))


def _slotted(agent, questions, message: torch.Tensor):
    """A batch of ``questions`` with the (B, m, d) ``message`` spliced into the solver's slot (left padded:
    the questions differ in length)."""
    rows = [agent.fill(agent.render(q, None, {SLOT}), {SLOT: message[i]}) for i, q in enumerate(questions)]
    return agent.encode(rows)


def _counted(monkeypatch, named: bool = False) -> list:
    """The ``shared`` column counts of every prompt pass from now on (``named``: with the agent's name)."""
    counts: list = []
    shared = PromptPrefixes.shared

    def record(self, key, embeds, mask, *rest):
        n = shared(self, key, embeds, mask, *rest)
        counts.append((key, n) if named else n)
        return n

    monkeypatch.setattr(PromptPrefixes, "shared", record)
    return counts


@pytest.mark.parametrize("arch", ARCHS)
def test_rollout_after_a_shared_prefix_equals_a_whole_pass(tiny_agents, arch, monkeypatch):
    agent, link = _float64(tiny_agents[arch], _link(tiny_agents[arch]))
    _widen_window(agent, 256)  # the prompts outgrow the tiny Gemma-3's window of 64, which stops reuse
    questions, d = QUESTIONS[:3], agent.hidden_size
    first, second = (torch.randn(3, 4, d, dtype=torch.float64) for _ in range(2))
    counts = _counted(monkeypatch)
    prefixes = PromptPrefixes()
    with torch.no_grad():
        agent.think(_slotted(agent, questions, first), 6, link, prefixes=prefixes)
        batch = _slotted(agent, questions, second)
        reused = agent.think(batch, 6, link, prefixes=prefixes)
        whole = agent.think(batch, 6, link)
    slot_column = batch.mask.shape[1] - 4 - _tail(agent)  # the first column of the message
    assert counts == [0, slot_column]  # everything before the message was reused
    torch.testing.assert_close(reused.hidden, whole.hidden, atol=1e-10, rtol=0)
    torch.testing.assert_close(reused.embeds, whole.embeds, atol=1e-10, rtol=0)


def _widen_window(agent, window: int) -> None:
    """Give a (copied) model's sliding-window layers, if any, a ``window`` of positions."""
    if getattr(agent.model.config, "sliding_window", None) is None:
        return
    agent.model.config.sliding_window = window
    for layer in agent.backbone.layers:
        if layer.self_attn.sliding_window is not None:
            layer.self_attn.sliding_window = window


def _tail(agent) -> int:
    """Tokens of the solver's prompt after its slot."""
    segments = agent.render(QUESTIONS[0], None, {SLOT})
    after = segments[next(i for i, s in enumerate(segments) if not isinstance(s, str)) + 1 :]
    return agent.encode([after]).mask.shape[1]


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_after_a_think_reuses_its_prefix(tiny_agents, arch, monkeypatch):
    agent, link = _float64(tiny_agents[arch], _link(tiny_agents[arch]))
    _widen_window(agent, 256)
    d = agent.hidden_size
    gen = GenerationConfig(max_new_tokens=8)
    counts = _counted(monkeypatch)
    prefixes = PromptPrefixes()
    with torch.no_grad():
        agent.think(
            _slotted(agent, QUESTIONS[:2], torch.randn(2, 3, d, dtype=torch.float64)), 4, link, 0, prefixes
        )
        batch = _slotted(agent, QUESTIONS[:2], torch.randn(2, 3, d, dtype=torch.float64))
        reused = agent.decode(batch, gen, prefixes=prefixes)
        whole = agent.decode(batch, gen)
    assert counts[1] > 0
    assert reused.token_ids == whole.token_ids and reused.texts == whole.texts


def test_decode_with_tools_reuses_each_rows_own_prefix(tiny_agents, monkeypatch):
    agent = _float64(tiny_agents["qwen3"], _link(tiny_agents["qwen3"]))[0]
    d, gen = agent.hidden_size, GenerationConfig(max_new_tokens=6)
    counts = _counted(monkeypatch, named=True)
    prefixes = PromptPrefixes()
    with torch.no_grad():
        for _ in range(2):  # two rounds of the same two questions, with new messages
            batch = _slotted(agent, QUESTIONS[:2], torch.randn(2, 3, d, dtype=torch.float64))
            reused, _ = agent.decode_with_tools(batch, gen, ToolBox(), prefixes=prefixes)
    whole, _ = agent.decode_with_tools(batch, gen, ToolBox())
    names = [(agent.name, 0), (agent.name, 1)]  # each row under its own key
    assert [k for k, _ in counts] == names * 2
    assert [n for _, n in counts[:2]] == [0, 0] and all(n > 0 for _, n in counts[2:])
    assert reused.token_ids == whole.token_ids


def test_shared_columns_are_exact_and_leave_the_last_one(tiny_agents):
    agent = tiny_agents["llama"]
    prefixes = PromptPrefixes()
    with torch.no_grad():
        batch = agent.encode([[QUESTIONS[0]], [QUESTIONS[1]]])  # left padded
        assert prefixes.shared("a", batch.embeds, batch.mask) == 0  # nothing kept yet
        prefixes.keep("a", batch.embeds, batch.mask, _cache_of(agent, batch))
    width = batch.mask.shape[1]
    assert prefixes.shared("a", batch.embeds, batch.mask) == width - 1  # the same prompt: all but the last
    assert prefixes.shared("b", batch.embeds, batch.mask) == 0  # another agent's
    longer = torch.cat([batch.embeds, batch.embeds[:, -3:]], 1)  # (2, width + 3, d)
    assert prefixes.shared("a", longer, torch.cat([batch.mask, batch.mask[:, -3:]], 1)) == width
    changed = batch.embeds.clone()
    changed[1, 7, 0] += 1e-6  # one value of one row
    assert prefixes.shared("a", changed, batch.mask) == 7
    unmasked = batch.mask.clone()
    unmasked[0, 2] = 1 - unmasked[0, 2]
    assert prefixes.shared("a", batch.embeds, unmasked) == 2
    assert prefixes.shared("a", batch.embeds[:1], batch.mask[:1]) == 0  # another batch size
    assert prefixes.shared("a", batch.embeds.double(), batch.mask) == 0  # another dtype


def test_prompts_past_the_byte_budget_are_not_kept(tiny_agents):
    agent = tiny_agents["llama"]
    with torch.no_grad():
        batch = agent.encode([[QUESTIONS[0]], [QUESTIONS[1]]])
        cache = _cache_of(agent, batch)
    size = sum(t.numel() * t.element_size() for k, v, _ in cache_layers(cache) for t in (k, v))
    roomy, tight = PromptPrefixes(max_bytes=2 * size - 1), PromptPrefixes(max_bytes=size - 1)
    for prefixes in (roomy, tight):
        prefixes.keep("a", batch.embeds, batch.mask, cache)
    assert roomy.shared("a", batch.embeds, batch.mask) > 0
    assert tight.shared("a", batch.embeds, batch.mask) == 0
    roomy.keep("b", batch.embeds, batch.mask, cache)  # a second one would pass the budget: not kept
    assert roomy.shared("b", batch.embeds, batch.mask) == 0
    roomy.keep("a", batch.embeds, batch.mask, cache)  # replacing a kept one frees its bytes first
    assert roomy.shared("a", batch.embeds, batch.mask) > 0


def test_a_pass_over_more_rows_than_the_int8_kernel_takes_stays_over_them(tiny_agents):
    agent = tiny_agents["llama"]
    prefixes = PromptPrefixes()
    with torch.no_grad():
        batch = agent.encode([[QUESTIONS[0]], [QUESTIONS[1]]])  # 2 rows
        prefixes.keep("a", batch.embeds, batch.mask, _cache_of(agent, batch))
    width = batch.mask.shape[1]
    assert prefixes.shared("a", batch.embeds, batch.mask, kernel_rows=8) == width - 5  # 2 x 5 rows > 8
    assert prefixes.shared("a", batch.embeds[:, :4], batch.mask[:, :4], kernel_rows=8) == 3  # 8 rows: any


def test_int8_layers_keep_their_kernel_and_their_outputs(tiny_agents):
    agent = dataclasses.replace(tiny_agents["llama"], model=copy.deepcopy(tiny_agents["llama"].model))
    quantize_module(agent.model)  # Int8Linear: up to 8 rows through the int8 kernel, more through float32
    assert agent.kernel_rows() == INT8_MAX_ROWS
    link, d = _link(agent), agent.hidden_size
    prefixes = PromptPrefixes()
    rows = [[QUESTIONS[0], torch.randn(3, d), "."]]  # one row, 4 columns after the shared ones
    with torch.no_grad():
        agent.think(agent.encode(rows), 3, link, prefixes=prefixes)
        rows[0][1] = torch.randn(3, d)
        batch = agent.encode(rows)
        assert prefixes.shared(agent.name, batch.embeds, batch.mask, agent.kernel_rows()) == (
            batch.mask.shape[1] - INT8_MAX_ROWS - 1
        )
        reused = agent.think(batch, 3, link, prefixes=prefixes)
        whole = agent.think(batch, 3, link)
    torch.testing.assert_close(reused.hidden, whole.hidden, atol=1e-4, rtol=0)  # float32 rounding


def test_no_reuse_with_a_rotary_embedding_that_depends_on_the_length(tiny_agents):
    agent = dataclasses.replace(tiny_agents["llama"], model=copy.deepcopy(tiny_agents["llama"].model))
    agent.model.config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    assert not prefix_reusable(agent.model) and agent.reusing(PromptPrefixes()) is None
    assert prefix_reusable(tiny_agents["gemma3"].model)  # one table per layer type, none dynamic


def test_caches_with_more_state_than_keys_and_values_are_not_kept():
    config = AutoConfig.for_model(
        "lfm2", vocab_size=32, hidden_size=16, intermediate_size=32, num_attention_heads=2,
        num_key_value_heads=1, num_hidden_layers=2, layer_types=["conv", "full_attention"],
    )  # fmt: skip
    cache = DynamicCache(config=config)  # a convolution-state layer, then a key/value one
    assert [type(layer) in PREFIX_LAYERS for layer in cache.layers] == [False, True]
    prefixes, embeds = PromptPrefixes(), torch.randn(1, 4, 16)
    prefixes.keep("a", embeds, torch.ones(1, 4, dtype=torch.long), cache)
    assert prefixes.shared("a", embeds, torch.ones(1, 4, dtype=torch.long)) == 0


def _cache_of(agent, batch):
    """The dynamic cache of a prompt pass of ``batch`` through ``agent``'s backbone."""
    cache = new_cache(agent.model)
    agent.backbone(
        inputs_embeds=batch.embeds, attention_mask=batch.mask, **cache_kwargs(agent.backbone, cache)
    )
    return cache


def test_a_sliding_window_that_dropped_positions_is_not_kept(tiny_agents, monkeypatch):
    agent, link = tiny_agents["gemma3"], _link(tiny_agents["gemma3"])
    window = agent.model.config.sliding_window
    long = "seven apples " * window  # past the window: its sliding layers keep only window - 1 positions
    counts = _counted(monkeypatch)
    prefixes = PromptPrefixes()
    d = agent.hidden_size
    with torch.no_grad():
        for _ in range(2):
            agent.think(_slotted(agent, [long], torch.randn(1, 2, d)), 3, link, prefixes=prefixes)
    assert counts == [0, 0]


def test_no_reuse_with_gradients_a_static_cache_or_when_turned_off(tiny_agents, monkeypatch):
    base = tiny_agents["qwen3"]
    link, d = _link(base), base.hidden_size
    counts = _counted(monkeypatch)
    for agent, grad in (
        (base, True),
        (_with(base, static_cache=True), False),
        (_with(base, reuse_prefixes=False), False),
    ):
        prefixes = PromptPrefixes()
        with torch.set_grad_enabled(grad):
            for _ in range(2):
                agent.think(_slotted(agent, QUESTIONS[:2], torch.randn(2, 2, d)), 3, link, prefixes=prefixes)
    assert counts == []


def test_run_reuses_prefixes_across_rounds_with_the_same_answers(tiny_system, monkeypatch):
    gen = GenerationConfig(max_new_tokens=6)
    questions = QUESTIONS[:3]
    counts = _counted(monkeypatch, named=True)
    reused = tiny_system.run(questions, generation=gen, batch_size=3)
    used = list(counts)
    try:
        whole = tiny_system.set_step_config(StepConfig(reuse_prefixes=False)).run(
            questions, generation=gen, batch_size=3
        )
    finally:
        tiny_system.set_step_config(StepConfig())
    names = list(tiny_system.agents)  # planner (Llama), critic (Gemma-3), solver (Qwen3)
    assert [name for name, _ in used] == names * 2  # two rounds, every agent once a round
    first, second = dict(used[:3]), dict(used[3:])
    assert set(first.values()) == {0}
    # the critic's prompts outgrow the tiny Gemma-3's sliding window (64), which is never reused from
    assert second["planner"] > 0 and second["solver"] > 0 and second["critic"] == 0
    assert [r.text for r in reused] == [r.text for r in whole]
    reference = tiny_system.run(questions, generation=gen, batch_size=3, use_cache=False)
    assert len(counts) == len(used)  # the re-encode reference never reuses
    assert len(reference) == 3
