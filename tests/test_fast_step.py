"""``fast_step.FastSteps``: the eager one-position steps equal transformers' forward on every tiny
architecture (float64 to rounding), in latent and decode steps, across a sliding window, and are used
exactly where they should be."""

import copy
import dataclasses

import pytest
import torch
from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

from recursivemas.agent import Agent, GenerationConfig, StepConfig, _Forwards, _last_hidden, _last_logits
from recursivemas.fast_step import FastSteps
from recursivemas.models.tiny import seeded_model, tiny_model, tiny_tokenizer
from recursivemas.prompts import ROLE_TEMPLATES
from recursivemas.quantize import (
    Int4Linear,
    Int8Linear,
    LowBitLinear,
    int4_dequantized,
    quantize_module,
    quantize_weight_int4,
)

from .conftest import QUESTIONS
from .test_agent import ARCHS, _batch, _float64, _link

LONG = ["seven apples " * 40, QUESTIONS[0], QUESTIONS[5]]  # left padding, and past Gemma3's window of 64


def _with(agent, **step):
    return dataclasses.replace(agent, step_config=StepConfig(**step))


def four_bit_weights(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every decoder Linear weight rounded to 4-bit groups in place, as a Q4_1 GGUF stores
    them (SmolLM2's layers): ``--dtype int4`` gives such layers ``Int4Linear``s."""
    with torch.no_grad():
        for m in model.model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(int4_dequantized(*quantize_weight_int4(m.weight)))
    return model


def teacher_forced_logits(agent, batch, ids: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(B, 1 + N, V) float32 logits of ``agent``'s prompt pass over ``batch`` and then of one decode step
    per column of the (B, N) token ``ids``, and whether ``FastSteps`` ran the steps."""
    with torch.no_grad():
        forwards = _Forwards(agent, agent.model, batch, ids.shape[1], _last_logits, logits_to_keep=1)
        rows = [forwards.prompt(batch.embeds)]
        rows += [forwards.step(input_ids=ids[:, i : i + 1]) for i in range(ids.shape[1])]
    return torch.stack(rows, 1), forwards.fast is not None


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
    for fast in (True, False):
        logits[fast], used = teacher_forced_logits(_with(agent64, fast=fast), batch, ids)  # (B, 41, V)
        assert used == fast
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


def _built(config, seed: int = 4):
    """A float64 agent of a tiny random model from ``config`` (byte-level tokenizer)."""
    tok = tiny_tokenizer("bytelevel")
    config.update(dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    model = seeded_model(config, seed)
    noise = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():  # biases start at zero: make them count
        if name.endswith(".bias"):
            param.data.normal_(0, 0.1, generator=noise)
    return Agent(name="a", model=model.double().eval(), tokenizer=tok, template=ROLE_TEMPLATES["solver"])


COMMON = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1)
FEATURES = {
    # a full and a sliding layer (two rotary tables), and a final logit softcap
    "gemma3-mixed": lambda: Gemma3TextConfig(
        hidden_size=96,
        intermediate_size=192,
        head_dim=24,
        sliding_window=16,
        query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention"],
        final_logit_softcapping=3.0,
        **COMMON,
    ),
    # projection biases and a sliding layer
    "qwen2-bias": lambda: Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        use_sliding_window=True,
        sliding_window=16,
        max_window_layers=1,
        **COMMON,
    ),
    # Llama ignores sliding_window in attention, but its DynamicCache keeps only the last 15 positions
    "llama-cropped-cache": lambda: LlamaConfig(
        hidden_size=64, intermediate_size=128, sliding_window=16, attention_bias=True, mlp_bias=True, **COMMON
    ),
}


@pytest.mark.parametrize("name", FEATURES)
def test_features_beyond_the_tiny_models(name):
    """Configurations the shared tiny models lack: both Gemma-3 rotary tables, a softcap, Qwen2's biases and
    sliding layers, a cache that drops positions the attention would see; latent and decode steps."""
    agent = _built(FEATURES[name]())
    if name != "llama-cropped-cache":
        assert len(set(agent.model.config.layer_types)) == 2
    batch = _batch(agent, LONG)
    assert max(batch.lengths) > 16
    seed = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(agent.tokenizer), (len(LONG), 12), generator=seed)
    out = {}
    for fast in (True, False):
        logits, used = teacher_forced_logits(_with(agent, fast=fast), batch, ids)
        assert used == fast
        with torch.no_grad():
            thoughts = _with(agent, fast=fast).think(batch, 12, _link(agent).double())
        out[fast] = (logits, thoughts.hidden)
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out[True][1], out[False][1], atol=1e-10, rtol=0)


def test_hooks_turn_the_fast_path_off():
    model, _ = tiny_model("llama")
    handle = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda *args: None)
    assert not FastSteps.supports(model)
    handle.remove()
    assert FastSteps.supports(model)


@pytest.mark.parametrize(
    "arch, form",
    # the tiny Qwen3's width (80) is no multiple of the int4 group (32): its layers stay int8
    [
        (arch, form)
        for arch in ARCHS
        for form in ("bfloat16", "int8", "int4", "int8-float32", "int4-float32")
        if (arch, form.split("-")[0]) != ("qwen3", "int4")
    ],
)
def test_low_precision_steps_follow_transformers(arch, form):
    """bfloat16, int8 and int4 (``Int8Linear`` / ``Int4Linear.step_op``) decode steps, over bfloat16 agents
    or (``-float32``, as on AVX2-only CPUs) float32 ones, teacher-forced: FastSteps rotates and softcaps in
    float32 where transformers rounds to bfloat16, so they agree to about 1% of the logits' scale (measured:
    0.7-1.2%); a real error (a dropped bias, a wrong rotary table) shows at 15% and more."""
    low_bit, _, agents_dtype = form.partition("-")
    model, tok = tiny_model(arch, torch.float32 if agents_dtype else torch.bfloat16)
    if low_bit == "int4":
        four_bit_weights(model)
    if low_bit != "bfloat16":
        quantize_module(model, int4=low_bit == "int4")
        kinds = {type(m) for m in model.model.modules() if isinstance(m, LowBitLinear)}
        assert kinds == {Int4Linear if low_bit == "int4" else Int8Linear}
    agent = Agent(name="a", model=model, tokenizer=tok, template=ROLE_TEMPLATES["solver"])
    batch = _batch(agent, QUESTIONS[:3])
    ids = torch.randint(3, len(tok), (3, 12), generator=torch.Generator().manual_seed(0))
    logits = {}
    for fast in (True, False):
        logits[fast] = teacher_forced_logits(_with(agent, fast=fast), batch, ids)[0][:, 1:]  # steps only
    assert float((logits[True] - logits[False]).abs().max()) <= 0.04 * float(logits[False].abs().max())
