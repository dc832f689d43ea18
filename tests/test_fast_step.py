"""``fast_step.FastSteps``: the eager one-position steps equal transformers' forward on every tiny
architecture (float64 to rounding), in latent and decode steps, across a sliding window, and are used
exactly where they should be."""

import copy
import dataclasses

import pytest
import torch

from recursivemas.agent import GenerationConfig, StepConfig, _Forwards, _last_hidden, _last_logits
from recursivemas.fast_step import FastSteps
from recursivemas.models.tiny import tiny_model

from .conftest import QUESTIONS
from .test_agent import ARCHS, _batch, _float64, _link

LONG = ["seven apples " * 40, QUESTIONS[0], QUESTIONS[5]]  # left padding, and past Gemma3's window of 64


def _with(agent, **step):
    return dataclasses.replace(agent, step_config=StepConfig(**step))


def _count_fast_steps(monkeypatch) -> list[int]:
    calls = [0]
    step = FastSteps.step

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return step(self, *args, **kwargs)

    monkeypatch.setattr(FastSteps, "step", counted)
    return calls


@pytest.mark.parametrize("arch", ARCHS)
def test_latent_steps_equal_transformers_forward(tiny_agents, arch, monkeypatch):
    agent64, link64 = _float64(tiny_agents[arch], _link(tiny_agents[arch]))
    calls = _count_fast_steps(monkeypatch)
    with torch.no_grad():
        fast = _with(agent64).think(_batch(agent64, LONG), 40, link64)
        assert calls[0] == 39  # every step after the prompt pass
        slow = _with(agent64, fast=False).think(_batch(agent64, LONG), 40, link64)
    assert calls[0] == 39
    torch.testing.assert_close(fast.hidden, slow.hidden, atol=1e-10, rtol=0)
    torch.testing.assert_close(fast.embeds, slow.embeds, atol=1e-10, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_steps_equal_transformers_forward(tiny_agents, arch):
    """Token ids in (the embedding, scaled in Gemma3), logits out, step by step on the same tokens."""
    agent64, _ = _float64(tiny_agents[arch], _link(tiny_agents[arch]))
    batch = _batch(agent64, LONG)
    ids = torch.randint(
        3, len(agent64.tokenizer), (len(LONG), 40), generator=torch.Generator().manual_seed(0)
    )
    logits = {}
    with torch.no_grad():
        for fast in (True, False):
            forwards = _Forwards(
                _with(agent64, fast=fast), agent64.model, batch, 40, _last_logits, logits_to_keep=1
            )
            rows = [forwards.prompt(batch.embeds)]
            rows += [forwards.step(input_ids=ids[:, i : i + 1]) for i in range(40)]
            assert (forwards.fast is not None) == fast
            logits[fast] = torch.stack(rows, 1)  # (B, 41, V)
    assert logits[True].dtype == torch.float32  # decode steps return float32 logits
    # float64 paths that agree to ~1e-15, each rounded to float32 (a real bug shows at 0.1-1)
    torch.testing.assert_close(logits[True], logits[False], atol=1e-6, rtol=1e-6)


def test_greedy_decode_is_unchanged(tiny_agents):
    agent = tiny_agents["llama"]
    gen = GenerationConfig(max_new_tokens=12)
    with torch.no_grad():
        fast = _with(agent).decode(_batch(agent, QUESTIONS), gen)
        slow = _with(agent, fast=False).decode(_batch(agent, QUESTIONS), gen)
    assert fast.token_ids == slow.token_ids


def test_used_only_without_gradients_and_without_a_static_cache(tiny_agents):
    agent = tiny_agents["llama"]
    batch = _batch(agent, QUESTIONS[:2])

    def forwards(agent):
        f = _Forwards(agent, agent.backbone, batch, 3, _last_hidden)
        f.prompt(batch.embeds)
        return f

    with torch.no_grad():
        assert forwards(_with(agent)).fast is not None
        assert forwards(_with(agent, fast=False)).fast is None
        assert forwards(_with(agent, static_cache=True)).fast is None
    assert forwards(_with(agent)).fast is None  # gradients on: in-place buffers would break backward


def test_unsupported_models_fall_back():
    model, _ = tiny_model("llama")
    assert FastSteps.supports(model)
    other = copy.deepcopy(model.config)
    other.model_type = "mistral"
    assert not FastSteps.supports(type(model)(other))


def test_more_steps_than_sized_is_an_error(tiny_agents):
    agent = tiny_agents["llama"]
    batch = _batch(agent, QUESTIONS[:1])
    with torch.no_grad():
        f = _Forwards(agent, agent.backbone, batch, 1, _last_hidden)
        h = f.prompt(batch.embeds)
        f.step(inputs_embeds=h[:, None])
        with pytest.raises(RuntimeError, match="does not fit"):
            f.step(inputs_embeds=h[:, None])
