"""Static KV cache and ``torch.compile`` for latent and decode steps (``StepConfig``), on tiny random models.

With a static cache, and with compiled steps, latent thoughts equal the eager dynamic-cache path up to float
rounding and greedy tokens are the same. Compiled checks use the ``aot_eager`` backend (dynamo traces the
same graph, with the static cache's in-place updates, and runs it with eager kernels: seconds to compile);
one ``heavy`` check compiles with inductor (about half a minute on a CPU). Nothing here imports the
evaluation stack, so the file runs where only the library's core dependencies are installed (the CUDA
test on a GPU machine); the CLI's ``--compile`` flag is tested in ``test_cli.py``.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

from recursivemas import GenerationConfig, StepConfig, build_preset
from recursivemas.errors import ConfigError
from recursivemas.loading import compile_tip

from .conftest import QUESTIONS
from .test_agent import ARCHS, _batch, _link, assert_close_to_reference
from .test_generation_rows import MIXED, Collector

STATIC = StepConfig(static_cache=True, cache_bucket=16)
COMPILED = StepConfig(compile=True, compile_backend="aot_eager")


def _questions(arch: str) -> list[str]:
    """Left-padded rows; for Gemma3 one of them longer than its sliding window (64)."""
    return (["seven apples " * 40] if arch == "gemma3" else []) + QUESTIONS[:3]


def _with(agent, config: StepConfig):
    return dataclasses.replace(agent, step_config=config)


@pytest.mark.parametrize("arch", ARCHS)
def test_static_cache_steps_equal_dynamic_in_float64(tiny_agents, arch):
    """In float64 the static cache (keys padded to the cache length, masked) agrees to rounding."""
    agent = dataclasses.replace(tiny_agents[arch], model=copy.deepcopy(tiny_agents[arch].model).double())
    link = _link(agent).double()
    batch = _batch(agent, _questions(arch))
    static = _with(agent, STATIC)
    with torch.no_grad():
        eager, fast = agent.think(batch, 24, link), static.think(batch, 24, link)
        tokens = static.decode(batch, GenerationConfig(max_new_tokens=24))
    torch.testing.assert_close(fast.hidden, eager.hidden, atol=1e-10, rtol=0)
    torch.testing.assert_close(fast.embeds, eager.embeds, atol=1e-10, rtol=0)
    assert tokens.token_ids == agent.decode(batch, GenerationConfig(max_new_tokens=24)).token_ids


@pytest.mark.parametrize("arch", ARCHS)
def test_static_cache_keeps_per_row_settings_and_streaming(tiny_agents, arch):
    """float32: mixed per-row settings decode as eagerly, and ``on_token`` streams the same texts."""
    agent = tiny_agents[arch]
    batch = _batch(agent, QUESTIONS[: len(MIXED)])
    eager_stream, static_stream = Collector(), Collector()
    with torch.no_grad():
        eager = agent.decode(batch, MIXED, on_token=eager_stream)
        static = _with(agent, STATIC).decode(batch, MIXED, on_token=static_stream)
    assert static.token_ids == eager.token_ids
    assert static.texts == eager.texts
    assert static_stream.texts == eager_stream.texts


@pytest.mark.parametrize("arch", ARCHS)
def test_compiled_steps_equal_eager(tiny_agents, arch):
    agent = tiny_agents[arch]
    link = _link(agent)
    batch = _batch(agent, _questions(arch))
    gen = GenerationConfig(max_new_tokens=20)
    compiled = _with(agent, COMPILED)
    with torch.no_grad():
        eager, fast = agent.think(batch, 12, link), compiled.think(batch, 12, link)
        decoded = compiled.decode(batch, gen)
        assert decoded.token_ids == agent.decode(batch, gen).token_ids
    assert_close_to_reference(fast.hidden, eager.hidden)
    assert_close_to_reference(fast.embeds, eager.embeds)


def test_a_compiled_system_answers_as_eager_and_compiles_once():
    """``RecursiveMAS.set_step_config``: a latent run and a text run (inference mode) give the eager answers;
    running again with the same shapes compiles nothing new."""
    mas = build_preset("tiny-random", rounds=2, latent_steps=4)
    gen = GenerationConfig(max_new_tokens=10)
    eager = {mode: mas.run(QUESTIONS[:3], mode=mode, generation=gen) for mode in ("latent", "text")}
    mas.set_step_config(COMPILED)
    assert all(agent.step_config == COMPILED for agent in mas.agents.values())
    for mode, results in eager.items():
        compiled = mas.run(QUESTIONS[:3], mode=mode, generation=gen)
        assert [r.text for r in compiled] == [r.text for r in results]
    graphs = counters["stats"]["unique_graphs"]
    mas.run(QUESTIONS[:3], mode="latent", generation=gen)
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.heavy
def test_inductor_compiled_decode_equals_eager(tiny_agents):
    agent = tiny_agents["llama"]
    batch = _batch(agent, QUESTIONS[:2])
    gen = GenerationConfig(max_new_tokens=12)
    with torch.no_grad():
        compiled = _with(agent, StepConfig(compile=True)).decode(batch, gen)
        assert compiled.token_ids == agent.decode(batch, gen).token_ids


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype, rel", [(torch.float32, 1e-3), (torch.bfloat16, 1e-1)])
def test_compiled_steps_on_cuda_with_cuda_graphs(tiny_agents, dtype, rel):
    """On CUDA, compile means mode reduce-overhead (CUDA graphs): thoughts close to eager in the same dtype
    (fused kernels round differently, bfloat16 at ~4e-3 a step), and in float32 the same greedy tokens."""
    agent = tiny_agents["llama"]
    agent = dataclasses.replace(agent, model=copy.deepcopy(agent.model).to("cuda", dtype))
    link = _link(agent).to("cuda")
    batch = _batch(agent, QUESTIONS[:3])
    gen = GenerationConfig(max_new_tokens=16)
    compiled = _with(agent, StepConfig(compile=True))
    with torch.no_grad():
        eager, fast = agent.think(batch, 12, link), compiled.think(batch, 12, link)
        tokens, eager_tokens = compiled.decode(batch, gen).token_ids, agent.decode(batch, gen).token_ids
    assert_close_to_reference(fast.hidden.float(), eager.hidden.float(), rel)
    if dtype == torch.float32:
        assert tokens == eager_tokens


@pytest.mark.parametrize(
    "device, compile, tip",
    [("cuda", False, True), ("cuda:1", False, True), ("cuda", True, False), ("cpu", False, False)],
)
def test_loading_on_cuda_without_compile_suggests_it(device, compile, tip):
    advice = compile_tip(device, compile)
    assert (advice is not None) == tip
    assert advice is None or "--compile" in advice


def test_step_config_settings():
    assert [StepConfig(**kw).static for kw in ({}, {"static_cache": True}, {"compile": True})] == [0, 1, 1]
    assert [StepConfig(cache_bucket=16).cache_length(n) for n in (1, 16, 17)] == [16, 16, 32]
    assert StepConfig().compile_config(torch.device("cuda")).mode == "reduce-overhead"
    assert StepConfig().compile_config(torch.device("cpu")).mode == "default"
    assert StepConfig(compile_mode="max-autotune").compile_config(torch.device("cuda")).mode == "max-autotune"
    aot = StepConfig(compile_backend="aot_eager").compile_config(torch.device("cuda"))
    assert (aot.backend, aot.mode) == ("aot_eager", None)
    with pytest.raises(ConfigError, match="cache_bucket"):
        StepConfig(cache_bucket=0)
