"""Per-row decoding settings in one batch, and token-by-token text callbacks, on tiny random models.

A row decoded next to rows with other lengths, temperatures, top-p values and seeds gets exactly the
text and token count it gets alone; ``on_token`` reports each row's text as it grows, ending with the
returned text."""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import pytest

from recursivemas import GenerationConfig, build_preset
from recursivemas.errors import ConfigError
from recursivemas.tools import Tool, ToolBox

from .conftest import QUESTIONS

MIXED = [
    GenerationConfig(max_new_tokens=4),
    GenerationConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3),
    GenerationConfig(max_new_tokens=7, temperature=0.7, seed=11),
    GenerationConfig(max_new_tokens=10, top_p=0.5),  # greedy: top_p is ignored
]


def _batch(agent, questions, suffix=""):
    return agent.encode([[*agent.fill(agent.render(q, None, set()), {}), suffix] for q in questions])


class Collector:
    """An ``on_token`` callback that keeps every text it is given, per row."""

    def __init__(self) -> None:
        self.texts: dict[int, list[str]] = defaultdict(list)

    def __call__(self, row: int, text: str) -> None:
        self.texts[row].append(text)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_mixed_settings_decode_as_each_row_alone(tiny_agents, arch):
    agent = tiny_agents[arch]
    questions = QUESTIONS[: len(MIXED)]
    together = agent.decode(_batch(agent, questions), MIXED)
    alone = [agent.decode(_batch(agent, [q]), gen) for q, gen in zip(questions, MIXED, strict=True)]
    assert together.texts == [d.texts[0] for d in alone]
    assert together.num_tokens == [d.num_tokens[0] for d in alone]
    assert all(n <= gen.max_new_tokens for n, gen in zip(together.num_tokens, MIXED, strict=True))
    greedy = agent.decode(_batch(agent, questions[3:]), GenerationConfig(max_new_tokens=10))
    assert together.texts[3] == greedy.texts[0]


def test_per_row_settings_must_match_the_rows(tiny_agents):
    agent = tiny_agents["llama"]
    with pytest.raises(ConfigError, match="got 2 generation configs for 3 rows: pass one GenerationConfig"):
        agent.decode(_batch(agent, QUESTIONS[:3]), MIXED[:2])
    with pytest.raises(ConfigError, match="got 2 seeds for 3 rows"):
        agent.decode(_batch(agent, QUESTIONS[:3]), MIXED[:3], seeds=[1, 2])
    with pytest.raises(ConfigError, match="a sequence of them"):
        agent.decode(_batch(agent, QUESTIONS[:1]), [{"max_new_tokens": 4}])


def test_on_token_reports_each_rows_text_as_it_grows(tiny_agents):
    agent = tiny_agents["qwen3"]
    collect = Collector()
    decoded = agent.decode(_batch(agent, QUESTIONS[:4]), MIXED, on_token=collect)
    for row, (text, n) in enumerate(zip(decoded.texts, decoded.num_tokens, strict=True)):
        assert collect.texts[row][-1] == text
        assert len(collect.texts[row]) in (n, n - 1)  # one call per token, none for an EOS


@pytest.fixture(scope="module")
def toolcaller():
    return build_preset("tiny-random-deliberation", rounds=1, latent_steps=2).agents["toolcaller"]


def test_tool_decoding_takes_per_row_settings(toolcaller):
    agent, questions = toolcaller, QUESTIONS[: len(MIXED)]
    together, calls = agent.decode_with_tools(_batch(agent, questions), MIXED, ToolBox())
    alone = [
        agent.decode_with_tools(_batch(agent, [q]), g, ToolBox())[0]
        for q, g in zip(questions, MIXED, strict=True)
    ]
    assert together.texts == [d.texts[0] for d in alone]
    assert together.num_tokens == [d.num_tokens[0] for d in alone]
    assert together.texts == agent.decode(_batch(agent, questions), MIXED).texts
    assert calls == [[]] * len(MIXED)


def test_tool_decoding_streams_calls_and_results(toolcaller):
    agent, prefix = toolcaller, "<lookup>the number</lookup>"
    tools = ToolBox.of([Tool("lookup", "look up", lambda q: "seven")])
    collect = Collector()
    decoded, calls = agent.decode_with_tools(
        _batch(agent, QUESTIONS[:2], prefix), MIXED[1:3], tools, prefix=prefix, on_token=collect
    )
    assert [len(c) for c in calls] == [1, 1]
    for row, text in enumerate(decoded.texts):
        assert text.startswith(f"{prefix}\n<result>\nseven\n</result>")
        assert collect.texts[row][-1] == text


@pytest.fixture(scope="module")
def system():
    """tiny-random, one quick round, with an answerer whose reply starts with a response prefix."""
    mas = build_preset("tiny-random", rounds=1, latent_steps=2)
    solver = mas.agents["solver"]
    template = dataclasses.replace(solver.template, response_prefix="Answer:")
    mas.agents["solver"] = dataclasses.replace(solver, template=template)
    return mas


@pytest.mark.parametrize("mode", ["latent", "text"])
def test_a_run_mixing_settings_answers_each_input_as_alone(system, mode):
    questions = QUESTIONS[: len(MIXED)]
    together = system.run(questions, mode=mode, generation=MIXED, batch_size=3)
    alone = [system.run([q], mode=mode, generation=g)[0] for q, g in zip(questions, MIXED, strict=True)]
    assert [r.text for r in together] == [r.text for r in alone]
    assert [r.usage for r in together] == [r.usage for r in alone]
    with pytest.raises(ConfigError, match="got 4 generation configs for 2 inputs"):
        system.run(questions[:2], generation=MIXED)


@pytest.mark.parametrize("mode", ["latent", "text"])
def test_a_run_streams_the_final_answer_of_each_input(system, mode):
    collect = Collector()
    results = system.run(QUESTIONS[:3], mode=mode, generation=MIXED[1:], batch_size=2, on_token=collect)
    assert sorted(collect.texts) == [0, 1, 2]
    for i, result in enumerate(results):
        assert result.text.startswith("Answer:")
        assert collect.texts[i][-1] == result.text
        [final] = [s for s in result.trace if s.final]
        assert len(collect.texts[i]) in (final.decoded_tokens, final.decoded_tokens - 1)
