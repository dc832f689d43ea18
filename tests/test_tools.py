"""Tools: the python sandbox tool, offline and HTTP search, call parsing and errors as observations, and
tool calls inside a real tiny model's decode (results enter the KV cache and the trace)."""

from __future__ import annotations

import dataclasses
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from recursivemas import GenerationConfig, build_preset
from recursivemas.errors import ConfigError
from recursivemas.tools import HttpSearch, SearchIndex, Tool, ToolBox, python_tool, search_tool, toolbox
from recursivemas.tools.search import default_corpus

from .conftest import QUESTIONS

GREEDY = GenerationConfig(max_new_tokens=12)


def test_python_tool_runs_code_and_reports_failures():
    tool = python_tool(timeout_s=3)
    assert tool.run("print(6 * 7)") == "42"
    assert tool.run("print(math.sqrt(16))") == "4.0"  # math is pre-imported
    assert "ZeroDivisionError" in tool.run("print(1 / 0)")
    assert "timed out" in tool.run("while True: pass")
    assert "network access is disabled" in tool.run(
        "import socket\nsocket.create_connection(('1.1.1.1', 80))"
    )
    assert tool.run("x = 1") == "(no output; print what you need)"


def test_offline_search_ranks_the_relevant_passage_first(tmp_path):
    index = SearchIndex.from_folder(default_corpus())
    [top, *_] = index.search("boiling point of water Celsius", k=4)
    assert "100 degrees Celsius" in top.text and top.title == "water"
    assert index.search("???") == []
    (tmp_path / "notes.jsonl").write_text(json.dumps({"title": "Zorblat", "text": "Zorblat is blue."}) + "\n")
    assert SearchIndex.from_folder(tmp_path).search("zorblat")[0].text == "Zorblat is blue."
    with pytest.raises(ConfigError, match="is not a folder"):
        SearchIndex.from_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"holds no \.txt, \.md or \.jsonl"):
        SearchIndex.from_folder(tmp_path / "empty")


def test_http_search_backend_against_a_local_server():
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            body = {
                "results": [{"title": "echo", "text": f"you asked {request['query']} (k={request['k']})"}]
            }
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        tool = search_tool(HttpSearch(f"http://127.0.0.1:{server.server_port}/search"), k=2)
        assert tool.run("moons of Mars") == "[1] echo: you asked moons of Mars (k=2)"
    finally:
        server.shutdown()
    with pytest.raises(ConfigError, match="must start with http"):
        HttpSearch("ftp://example.org")


def test_calls_are_found_and_every_failure_is_an_observation():
    def crash(text: str) -> str:
        raise RuntimeError("disk on fire")

    box = ToolBox.of([Tool("echo", "echo", str.upper), Tool("crash", "crash", crash)], max_tool_calls=2)
    assert box.find_call("I will run <echo>hi</echo> now") == ("echo", "hi")
    assert box.find_call("<echo>not finished") is None
    assert box.find_call("<result>\nold\n</result>") is None
    assert box.find_call("<echo>\nprint(1)\n```\nThis prints 1.") == ("echo", "print(1)")
    assert box.find_call("<echo>\n```python\nprint(2)\n```") == ("echo", "print(2)")
    assert box.find_call("<echo>\n```python\nprint(2)") is None
    assert box.call("echo", "hi", 0).output == "HI"
    unknown = box.call("calculator", "1+1", 0)
    assert unknown.error and "unknown tool 'calculator'; available: crash, echo" in unknown.output
    assert "empty <echo> call" in box.call("echo", "  ", 0).output
    crashed = box.call("crash", "x", 0)
    assert crashed.error == "RuntimeError: disk on fire" and crashed.output.startswith("error:")
    assert "limit (2) reached" in box.call("echo", "hi", 2).output
    with pytest.raises(ConfigError, match="already registered"):
        box.register(Tool("echo", "again", str))
    with pytest.raises(ConfigError, match="lowercase letters"):
        Tool("Bad Name", "x", str)
    with pytest.raises(ConfigError, match="no built-in tool named"):
        toolbox(["calculator"])


@pytest.fixture(scope="module")
def deliberation():
    return build_preset("tiny-random-deliberation", rounds=1, latent_steps=2)


def test_decoding_with_tools_but_no_call_equals_plain_decoding(deliberation):
    agent = deliberation.agents["toolcaller"]
    batch = agent.encode([agent.render(q, None, set()) for q in QUESTIONS[:3]])
    plain = agent.decode(batch, GREEDY)
    with_tools, calls = agent.decode_with_tools(batch, GREEDY, ToolBox())
    assert with_tools.texts == plain.texts and with_tools.num_tokens == plain.num_tokens
    assert calls == [[], [], []]


def _forced_call(system, answer: str):
    """Run the tool-caller with its reply forced to start with a call to a tool that returns ``answer``."""
    agent = system.agents["toolcaller"]
    forced = dataclasses.replace(agent.template, response_prefix="<lookup>the number</lookup>")
    system.agents["toolcaller"] = dataclasses.replace(agent, template=forced)
    system.tools["toolcaller"] = ToolBox.of([Tool("lookup", "look up", lambda q: answer)])
    try:
        [result] = system.run(QUESTIONS[:1], generation=GREEDY)
    finally:
        system.agents["toolcaller"] = agent
        system.tools["toolcaller"] = toolbox(["python", "search"])
    return result


def test_a_tool_result_enters_the_cache_and_the_trace(deliberation):
    first = _forced_call(deliberation, "7 7 7 7 7 7")
    second = _forced_call(deliberation, "banana split")
    for result, output in ((first, "7 7 7 7 7 7"), (second, "banana split")):
        [tool_stage] = [s for s in result.trace if s.kind == "tool"]
        assert tool_stage.tool_call.tool == "lookup" and tool_stage.tool_call.input == "the number"
        assert tool_stage.tool_call.output == output and tool_stage.tool_call.error is None
        assert result.text.startswith(f"<lookup>the number</lookup>\n<result>\n{output}\n</result>")
        assert result.usage["tool_calls"] == 1
    continuation = [r.text.split("</result>", 1)[1] for r in (first, second)]
    assert continuation[0] != continuation[1]  # the model read the result from its cache


def test_tools_run_in_every_text_turn_and_optionally_before_latent_turns():
    system = build_preset("tiny-random-deliberation", rounds=2, latent_steps=2)
    agent = system.agents["toolcaller"]
    forced = dataclasses.replace(agent.template, response_prefix="<python>print(2 + 3)</python>")
    system.agents["toolcaller"] = dataclasses.replace(agent, template=forced)
    [text] = system.run(QUESTIONS[:1], mode="text", generation=GREEDY)
    assert [s.tool_call.output for s in text.trace if s.kind == "tool"] == ["5", "5"]
    [latent] = system.run(QUESTIONS[:1], generation=GREEDY)
    assert [(s.round, s.kind) for s in latent.trace if s.agent == "toolcaller"] == [
        (1, "latent"),
        (2, "tool"),
        (2, "text"),
    ]
    system.config.tools_in_latent_turns = True
    [phased] = system.run(QUESTIONS[:1], generation=GREEDY)
    stages = [(s.round, s.kind) for s in phased.trace if s.agent == "toolcaller"]
    assert stages == [(1, "tool"), (1, "latent"), (2, "tool"), (2, "text")]
    assert phased.trace[2].decoded_tokens > 0  # the tool phase's tokens are counted on the latent turn
