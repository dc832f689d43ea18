"""Agent invariants on all three tiny architectures (Llama, Qwen3, Gemma3)."""

import copy
import dataclasses

import pytest
import torch

from recursivemas.agent import GenerationConfig, left_pad, position_ids
from recursivemas.errors import ConfigError, NonFiniteLatentError, PromptTooLongError
from recursivemas.links import InnerLink, LinkConfig, init_default
from recursivemas.tools import ToolBox

from .conftest import QUESTIONS

ARCHS = ["llama", "qwen3", "gemma3"]


def _batch(agent, questions):
    return agent.encode([agent.fill(agent.render(q, None, set()), {}) for q in questions])


def _link(agent, seed=0):
    torch.manual_seed(seed)
    link = InnerLink(LinkConfig(agent.name, "inner", agent.hidden_size, agent.hidden_size))
    init_default(link)  # a non-trivial link, so the test exercises the feedback path
    return link


def _float64(agent, link):
    """A float64 copy of ``agent`` (its model deep-copied) and of ``link``."""
    twin = dataclasses.replace(agent, model=copy.deepcopy(agent.model).double())
    return twin, copy.deepcopy(link).double()


def assert_close_to_reference(fast, ref, rel=1e-4):
    """float32 check of a cached rollout against its reference: the max error is at most ``rel`` times the
    reference's max magnitude. The two paths add in different orders and the latent recurrence amplifies
    that rounding step by step, so an absolute bound depends on the machine and thread count (1.1e-5 on
    values of ~4 here); rounding stays within ~5e-6 of the magnitude, a real bug (position, mask, cache)
    shows at order 0.1-1."""
    assert fast.shape == ref.shape and fast.dtype == ref.dtype
    err = float((fast - ref).abs().max())
    scale = float(ref.abs().max())
    assert err <= rel * scale, f"max |fast - ref| = {err:.3g} > {rel:g} * max |ref| = {rel * scale:.3g}"


@pytest.mark.parametrize("arch", ARCHS)
def test_inputs_embeds_equal_input_ids(tiny_agents, arch):
    agent = tiny_agents[arch]
    ids = agent.tokenizer(QUESTIONS[:1], return_tensors="pt").input_ids
    with torch.no_grad():
        a = agent.model(input_ids=ids).logits
        b = agent.model(inputs_embeds=agent.embed(ids)).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_cached_rollout_equals_reencode_reference(tiny_agents, arch):
    """In float64 the two paths agree to rounding (<= 1e-10 on values of order 1); in float32, relatively."""
    agent = tiny_agents[arch]
    link = _link(agent)
    agent64, link64 = _float64(agent, link)
    questions = QUESTIONS[:4]  # different lengths: left padding exercised
    with torch.no_grad():
        fast = agent.think(_batch(agent, questions), 12, link)
        ref = agent.think_reference(_batch(agent, questions), 12, link)
        fast64 = agent64.think(_batch(agent64, questions), 12, link64)
        ref64 = agent64.think_reference(_batch(agent64, questions), 12, link64)
    assert fast.hidden.shape == (4, 12, agent.hidden_size)
    assert fast64.hidden.dtype == fast64.embeds.dtype == torch.float64
    torch.testing.assert_close(fast64.hidden, ref64.hidden, atol=1e-10, rtol=0)
    torch.testing.assert_close(fast64.embeds, ref64.embeds, atol=1e-10, rtol=0)
    assert_close_to_reference(fast.hidden, ref.hidden)
    assert_close_to_reference(fast.embeds, ref.embeds)


@pytest.mark.parametrize("arch", ARCHS)
def test_latent_rollout_does_not_depend_on_padding(tiny_agents, arch):
    agent = tiny_agents[arch]
    link = _link(agent)
    with torch.no_grad():
        together = agent.think(_batch(agent, QUESTIONS), 8, link).hidden
        alone = torch.cat([agent.think(_batch(agent, [q]), 8, link).hidden for q in QUESTIONS])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_decode_is_batch_invariant(tiny_agents, arch):
    agent = tiny_agents[arch]
    gen = GenerationConfig(max_new_tokens=16)
    with torch.no_grad():
        together = agent.decode(_batch(agent, QUESTIONS), gen)
        alone = [agent.decode(_batch(agent, [q]), gen) for q in QUESTIONS]
    assert together.texts == [d.texts[0] for d in alone]
    assert together.num_tokens == [d.num_tokens[0] for d in alone]


def test_greedy_decode_matches_transformers_generate(tiny_agents):
    agent = tiny_agents["llama"]
    batch = _batch(agent, QUESTIONS[:1])
    with torch.no_grad():
        ours = agent.decode(batch, GenerationConfig(max_new_tokens=10))
        ids = agent.model.generate(
            inputs_embeds=batch.embeds,
            attention_mask=batch.mask,
            max_new_tokens=10,
            do_sample=False,
            eos_token_id=agent.eos_ids,
            pad_token_id=agent.pad_id,
        )
    n = ours.num_tokens[0]
    assert ours.token_ids[0] == ids[0, :n].tolist()
    assert ours.texts[0] == agent.tokenizer.decode(ids[0, :n], skip_special_tokens=True).strip()


def test_decoded_token_ids_with_and_without_tools(tiny_agents):
    """Without calls, a decode with tools generates the ids of a plain decode; counts are their lengths."""
    agent = tiny_agents["qwen3"]
    batch = _batch(agent, QUESTIONS[:3])
    gen = GenerationConfig(max_new_tokens=12)
    with torch.no_grad():
        plain = agent.decode(batch, gen)
        with_tools, _ = agent.decode_with_tools(batch, gen, ToolBox())
    assert with_tools.token_ids == plain.token_ids
    assert [len(ids) for ids in plain.token_ids] == plain.num_tokens == with_tools.num_tokens


def test_sampling_is_seeded_per_row(tiny_agents):
    agent = tiny_agents["qwen3"]
    gen = GenerationConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=5)
    with torch.no_grad():
        a = agent.decode(_batch(agent, QUESTIONS[:3]), gen, seeds=[5, 6, 7])
        b = agent.decode(_batch(agent, QUESTIONS[1:2]), gen, seeds=[6])
        c = agent.decode(_batch(agent, QUESTIONS[:3]), gen, seeds=[8, 9, 10])
    assert a.texts[1] == b.texts[0]
    assert a.texts != c.texts


def test_left_pad_and_positions():
    rows = [torch.ones(2, 3), torch.ones(4, 3)]
    embeds, mask = left_pad(rows)
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert torch.equal(embeds[0, :2], torch.zeros(2, 3))
    assert position_ids(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


def test_prompt_longer_than_context_is_a_clear_error(tiny_agents):
    agent = tiny_agents["llama"]
    batch = _batch(agent, ["seven " * 1200])
    with pytest.raises(PromptTooLongError, match="context window of 1024"):
        agent.think(batch, 4, _link(agent))
    with pytest.raises(PromptTooLongError, match="max-new-tokens"):
        agent.decode(batch, GenerationConfig(max_new_tokens=4))


def test_nan_in_latents_names_agent_and_round(tiny_agents):
    agent = tiny_agents["gemma3"]
    link = _link(agent)
    with torch.no_grad():
        link.proj2.bias.fill_(float("nan"))
        with pytest.raises(NonFiniteLatentError, match=r"agent 'gemma3' in round 3"):
            agent.think(_batch(agent, QUESTIONS[:2]), 3, link, round_=3)


def test_rollout_beyond_the_sliding_window(tiny_agents):
    """Gemma3's sliding-window layers (window 64) with a long, left-padded batch and a growing cache."""
    agent = tiny_agents["gemma3"]
    assert agent.model.config.sliding_window == 64
    batch = _batch(agent, ["seven apples " * 40, QUESTIONS[0]])
    assert max(batch.lengths) > 64
    link = _link(agent)
    agent64, link64 = _float64(agent, link)
    batch64 = _batch(agent64, ["seven apples " * 40, QUESTIONS[0]])
    with torch.no_grad():
        fast = agent.think(batch, 30, link)
        ref = agent.think_reference(batch, 30, link)
        alone = agent.think(_batch(agent, [QUESTIONS[0]]), 30, link)
        fast64 = agent64.think(batch64, 30, link64)
        ref64 = agent64.think_reference(batch64, 30, link64)
    torch.testing.assert_close(fast64.hidden, ref64.hidden, atol=1e-10, rtol=0)
    assert_close_to_reference(fast.hidden, ref.hidden)
    torch.testing.assert_close(fast.hidden[1:], alone.hidden, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=1e-40), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(seed=10**30), "seed"),
        (dict(max_new_tokens=0), "max_new_tokens"),
    ],
)
def test_bad_generation_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        GenerationConfig(**kwargs)


def test_cpu_agents_flush_denormals(tiny_agents):
    """Denormal floats make CPU matmuls 20x slower on dequantised GGUF weights; agents turn them off."""
    assert tiny_agents["llama"].device.type == "cpu"
    assert torch.tensor([1e-39], dtype=torch.float32).mul(1.0).item() == 0.0
