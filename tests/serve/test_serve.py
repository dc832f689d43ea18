"""``recursivemas serve`` end to end: a real server on 127.0.0.1, the real ``openai`` client, tiny-random."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
openai = pytest.importorskip("openai", reason="the openai client is not installed: pip install -e '.[dev]'")

import httpx  # noqa: E402

import recursivemas.serve  # noqa: E402
from recursivemas import GenerationConfig, RecursiveMAS, build_preset  # noqa: E402
from recursivemas.errors import ConfigError, PromptTooLongError  # noqa: E402
from recursivemas.loading import load_system  # noqa: E402
from recursivemas.serve import serve_command  # noqa: E402
from recursivemas.serve.app import create_app  # noqa: E402
from recursivemas.serve.batcher import Job, RunKey, run_jobs  # noqa: E402
from recursivemas.serve.config import ServeConfig  # noqa: E402
from recursivemas.serve.responses import TextStream  # noqa: E402
from recursivemas.system import MASInput  # noqa: E402
from tests.conftest import QUESTIONS  # noqa: E402
from tests.serve.harness import (  # noqa: E402
    CONFIG,
    KEY,
    MAX_TOKENS,
    MODEL,
    SMALL,
    FailingSystem,
    GatedSystem,
    PausingSystem,
    ThreadServer,
    metric,
    serving,
)

GREEDY = GenerationConfig(MAX_TOKENS)


@pytest.fixture(scope="module")
def serve_system() -> RecursiveMAS:
    """The system the servers run (its own instance: servers and references never share one)."""
    return build_preset("tiny-random")


@pytest.fixture(scope="module")
def reference() -> Callable[..., object]:
    """The engine's own answer to one question alone: ``reference(question, mode=..., **settings)``
    (greedy, ``MAX_TOKENS`` unless ``generation`` says otherwise)."""
    system = build_preset("tiny-random")

    def run(
        question: str,
        mode: str = "latent",
        generation: GenerationConfig = GREEDY,
        **settings: int,
    ) -> object:
        [result] = system.run([question], mode=mode, generation=generation, **settings)
        return result

    return run


@pytest.fixture(scope="module")
def server(serve_system: RecursiveMAS) -> Iterator[ThreadServer]:
    with serving(serve_system) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: ThreadServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=30)


def ask(client: openai.OpenAI, question: str, mode: str = "latent", **kwargs: object) -> object:
    """A greedy chat completion with the quick settings."""
    return client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": question}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"recursivemas": {"mode": mode, **SMALL}},
        **kwargs,
    )


def post(
    server: ThreadServer, body: object, path: str = "/v1/chat/completions", timeout: float = 30
) -> httpx.Response:
    """A raw POST with the API key: ``body`` is sent as JSON, or as is if it is ``bytes``."""
    payload = {"content": body} if isinstance(body, bytes) else {"json": body}
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    return httpx.post(f"{server.url}{path}", headers=headers, timeout=timeout, **payload)


def good_chat(**changes: object) -> dict:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": QUESTIONS[0]}],
        "max_tokens": MAX_TOKENS,
        "recursivemas": dict(SMALL),
    }
    return {**body, **changes}


def test_models_lists_the_system(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


@pytest.mark.parametrize("mode", ["latent", "text", "single"])
def test_answers_equal_the_engine(client: openai.OpenAI, reference: Callable, mode: str) -> None:
    expected = reference(QUESTIONS[1], mode, **SMALL)
    plain = ask(client, QUESTIONS[1], mode)
    assert plain.choices[0].message.content == expected.text
    assert plain.usage.prompt_tokens == expected.usage["prompt_tokens"]
    assert plain.usage.completion_tokens == expected.usage["decoded_tokens"]
    assert plain.usage.total_tokens == expected.usage["prompt_tokens"] + expected.usage["decoded_tokens"]
    assert plain.usage.model_extra["latent_steps"] == expected.usage["latent_steps"]
    chunks = list(ask(client, QUESTIONS[1], mode, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == expected.usage["decoded_tokens"]


def test_completions_equal_the_engine(client: openai.OpenAI, reference: Callable) -> None:
    expected = reference(QUESTIONS[2], **SMALL)
    settings = {"model": MODEL, "prompt": QUESTIONS[2], "max_tokens": MAX_TOKENS, "temperature": 0}
    plain = client.completions.create(**settings, extra_body={"recursivemas": SMALL})
    assert plain.choices[0].text == expected.text
    streamed = list(client.completions.create(**settings, stream=True, extra_body={"recursivemas": SMALL}))
    assert "".join(c.choices[0].text for c in streamed) == expected.text
    assert sum(bool(c.choices[0].text) for c in streamed) > 1  # token by token, not one piece
    assert streamed[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_trace_and_system_message(client: openai.OpenAI, reference: Callable) -> None:
    response = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": QUESTIONS[3]},
        ],
        max_tokens=MAX_TOKENS,
        extra_body={"recursivemas": {**SMALL, "trace": True}},
    )
    expected = reference(f"Answer briefly.\n\n{QUESTIONS[3]}", **SMALL)
    assert response.choices[0].message.content == expected.text
    trace = response.model_extra["recursivemas"]["trace"]
    assert [(s["agent"], s["kind"]) for s in trace] == [(s.agent, s.kind) for s in expected.trace]
    assert all(s["lens"] for s in trace if s["kind"] == "latent")


def test_sixteen_concurrent_requests_batch_and_match_alone(
    server: ThreadServer, client: openai.OpenAI, reference: Callable
) -> None:
    questions = [f"{QUESTIONS[i % len(QUESTIONS)]} ({'again ' * i}{i})" for i in range(16)]
    expected = [reference(q, **SMALL).text for q in questions]
    before = metric(server, "recursivemas_batches_total")
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda q: ask(client, q).choices[0].message.content, questions))
    batches = metric(server, "recursivemas_batches_total") - before
    assert answers == expected
    assert batches < len(questions)


def test_mixed_sampling_settings_share_a_batch_and_match_alone(
    serve_system: RecursiveMAS, reference: Callable
) -> None:
    """A greedy request and a sampled, longer, streamed one run as one batch; each gets its answer alone."""
    settings = [
        GenerationConfig(max_new_tokens=5, seed=1),
        GenerationConfig(max_new_tokens=16, temperature=0.9, top_p=0.8, seed=7),
    ]
    expected = [reference(QUESTIONS[i], generation=g, **SMALL) for i, g in enumerate(settings)]

    def send(client: openai.OpenAI, i: int) -> tuple[str, dict]:
        gen = settings[i]
        request = {
            "model": MODEL,
            "messages": [{"role": "user", "content": QUESTIONS[i]}],
            "max_tokens": gen.max_new_tokens,
            "temperature": gen.temperature,
            "top_p": gen.top_p,
            "seed": gen.seed,
            "extra_body": {"recursivemas": SMALL},
        }
        if i == 0:
            response = client.chat.completions.create(**request)
            return response.choices[0].message.content, response.model_extra["recursivemas"]
        chunks = list(client.chat.completions.create(**request, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        return text, chunks[-1].model_extra["recursivemas"]

    with serving(serve_system, max_batch_size=2, max_wait_ms=5000) as server, ThreadPoolExecutor(2) as pool:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=30)
        answers = list(pool.map(lambda i: send(client, i), range(2)))
        assert metric(server, "recursivemas_batches_total") == 1
    for (text, extra), result in zip(answers, expected, strict=True):
        assert text == result.text
        assert extra["usage"] == result.usage
        assert extra["timings"]["batch_size"] == 2
    assert expected[0].usage["decoded_tokens"] <= 5 < expected[1].usage["decoded_tokens"]


def test_streamed_text_arrives_while_the_decode_runs(serve_system: RecursiveMAS, reference: Callable) -> None:
    generation = GenerationConfig(max_new_tokens=24)
    expected = reference(QUESTIONS[4], generation=generation, **SMALL)
    pausing = PausingSystem(serve_system)
    with serving(pausing) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=30)
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": QUESTIONS[4]}],
            max_tokens=generation.max_new_tokens,
            stream=True,
            extra_body={"recursivemas": SMALL},
        )
        pieces = []
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
                pausing.received.set()
    assert pausing.received_in_time is True  # the first piece reached the client mid-decode
    assert pausing.tokens_after > 0 and len(pieces) > 1
    assert "".join(pieces) == expected.text


@pytest.mark.parametrize("reported", ["", "an answer so far"])
def test_a_run_that_fails_while_streaming(serve_system: RecursiveMAS, reported: str) -> None:
    """Before any text: an HTTP error. After some: the stream ends with an OpenAI error chunk."""
    with serving(FailingSystem(serve_system, reported)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=30)
        pieces = []
        with pytest.raises(openai.APIError, match="the run failed inside the server") as failure:
            for chunk in ask(client, QUESTIONS[0], stream=True):
                pieces.append(chunk.choices[0].delta.content or "")
        assert "".join(pieces) == reported
        assert isinstance(failure.value, openai.InternalServerError) == (not reported)
        assert post(server, good_chat()).status_code == 500  # every run fails, the server still answers


def test_a_bad_row_fails_alone(serve_system: RecursiveMAS) -> None:
    key = RunKey("latent", 1, 2, 0)
    rows = [MASInput(QUESTIONS[0]), MASInput("word " * 1200), MASInput(QUESTIONS[1])]
    gen = GenerationConfig(MAX_TOKENS)
    loop = asyncio.new_event_loop()
    try:
        outcomes = run_jobs(serve_system, [Job(key, row, gen, loop, loop.create_future()) for row in rows])
    finally:
        loop.close()
    assert isinstance(outcomes[1], PromptTooLongError)
    assert [o.question for o in (outcomes[0], outcomes[2])] == [QUESTIONS[0], QUESTIONS[1]]


def test_auth(server: ThreadServer) -> None:
    for key in ("wrong-key", None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        for path in ("/v1/models", "/metrics"):
            response = httpx.get(f"{server.url}{path}", headers=headers)
            assert response.status_code == 401, path
            assert response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong-key", max_retries=0).models.list()
    assert httpx.get(f"{server.url}/health").status_code == 200


LONG = "word " * 400  # over max_input_tokens (200), under the body limit
BAD_INPUTS = {
    "malformed_json": (b'{"model": ', 400, "invalid_json"),
    "body_not_an_object": (b"[1, 2]", 400, "invalid_type"),
    "messages_not_a_list": (good_chat(messages="hi"), 400, "invalid_type"),
    "temperature_wrong_type": (good_chat(temperature="hot"), 400, "invalid_type"),
    "max_tokens_a_string": (good_chat(max_tokens="8"), 400, "invalid_type"),
    "stream_wrong_type": (good_chat(stream="yes"), 400, "invalid_type"),
    "missing_model": ({"messages": [{"role": "user", "content": "hi"}]}, 400, "missing_required_parameter"),
    "empty_messages": (good_chat(messages=[]), 400, "invalid_value"),
    "no_user_message": (good_chat(messages=[{"role": "system", "content": "hi"}]), 400, "invalid_value"),
    "blank_question": (good_chat(messages=[{"role": "user", "content": "  "}]), 400, "invalid_value"),
    "unknown_role": (good_chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "invalid_value"),
    "reserved_characters": (
        good_chat(messages=[{"role": "user", "content": "a\ue000b"}]),
        400,
        "invalid_value",
    ),
    "unknown_model": (good_chat(model="gpt-4"), 404, "model_not_found"),
    "too_many_input_tokens": (
        good_chat(messages=[{"role": "user", "content": LONG}]),
        400,
        "context_length_exceeded",
    ),
    "max_tokens_over_limit": (good_chat(max_tokens=10_000), 400, "invalid_value"),
    "max_completion_tokens_over_limit": (good_chat(max_completion_tokens=65), 400, "invalid_value"),
    "max_tokens_zero": (good_chat(max_tokens=0), 400, "invalid_value"),
    "n_two": (good_chat(n=2), 400, "invalid_value"),
    "negative_temperature": (good_chat(temperature=-1), 400, "invalid_value"),
    "tiny_temperature": (good_chat(temperature=1e-9), 400, "invalid_value"),
    "top_p_zero": (good_chat(top_p=0), 400, "invalid_value"),
    "unknown_agent_in_context": (good_chat(recursivemas={"context": {"oracle": "x"}}), 400, "invalid_value"),
    "context_not_a_map": (good_chat(recursivemas={"context": ["x"]}), 400, "invalid_type"),
    "unknown_mode": (good_chat(recursivemas={"mode": "telepathy"}), 400, "invalid_value"),
    "unknown_setting": (good_chat(recursivemas={"latent_step": 3}), 400, "unknown_parameter"),
    "rounds_zero": (good_chat(recursivemas={"rounds": 0}), 400, "invalid_value"),
    "rounds_over_limit": (good_chat(recursivemas={"rounds": 99}), 400, "invalid_value"),
    "exceeds_context_window": (
        good_chat(recursivemas={"rounds": 1, "latent_steps": 1000}),
        400,
        "context_length_exceeded",
    ),
    "body_too_large": (
        good_chat(messages=[{"role": "user", "content": "x" * 30_000}]),
        413,
        "request_too_large",
    ),
    "completions_empty_prompt": ({"model": MODEL, "prompt": " "}, 400, "invalid_value"),
    "completions_prompt_list": ({"model": MODEL, "prompt": ["a", "b"]}, 400, "invalid_type"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_an_openai_error_and_the_server_keeps_serving(server: ThreadServer, case: str) -> None:
    body, status, code = BAD_INPUTS[case]
    path = "/v1/completions" if case.startswith("completions") else "/v1/chat/completions"
    response = post(server, body, path)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code and error["message"]
    assert "Traceback" not in response.text
    assert post(server, good_chat()).status_code == 200


def test_unknown_route_and_method_are_openai_errors(server: ThreadServer) -> None:
    assert (
        httpx.get(f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}).status_code
        == 405
    )
    response = httpx.get(f"{server.url}/nowhere")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_queue_full_is_429_and_health_answers_during_a_batch(serve_system: RecursiveMAS) -> None:
    gated = GatedSystem(serve_system)
    with (
        serving(gated, max_batch_size=1, max_queue=2, max_wait_ms=0) as server,
        ThreadPoolExecutor(3) as pool,
    ):
        running = pool.submit(post, server, good_chat())
        assert gated.entered.wait(10)
        queued = [pool.submit(post, server, good_chat()) for _ in range(2)]
        deadline = time.monotonic() + 10
        while metric(server, "recursivemas_queue_depth") < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        full = post(server, good_chat())
        assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
        assert int(full.headers["Retry-After"]) >= 1
        assert httpx.get(f"{server.url}/health", timeout=2).status_code == 200  # the worker is busy
        gated.gate.set()
        assert [f.result().status_code for f in [running, *queued]] == [200, 200, 200]
        assert post(server, good_chat()).status_code == 200


def test_a_client_that_leaves_is_dropped_without_breaking_others(serve_system: RecursiveMAS) -> None:
    gated = GatedSystem(serve_system)
    with serving(gated, max_batch_size=1, max_wait_ms=0) as server, ThreadPoolExecutor(1) as pool:
        running = pool.submit(post, server, good_chat())
        assert gated.entered.wait(10)
        with pytest.raises(httpx.ReadTimeout):
            post(server, good_chat(), timeout=0.5)
        deadline = time.monotonic() + 10
        while metric(server, "recursivemas_dropped_total") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric(server, "recursivemas_dropped_total") == 1
        gated.gate.set()
        assert running.result().status_code == 200
        assert post(server, good_chat()).status_code == 200


def test_non_local_bind_needs_a_key() -> None:
    with pytest.raises(ConfigError, match="--api-key"):
        ServeConfig(model_name=MODEL, host="0.0.0.0").check_bind()
    ServeConfig(model_name=MODEL, host="0.0.0.0", api_key="k").check_bind()
    ServeConfig(model_name=MODEL, host="0.0.0.0", insecure_no_auth=True).check_bind()
    ServeConfig(model_name=MODEL, host="::1").check_bind()
    with pytest.raises(ConfigError, match="--api-key"):  # refused before any model loads
        serve_command(preset="tiny-random", host="10.1.2.3", port=0)


def test_a_failed_load_is_reported_and_fatal() -> None:
    reasons: list[str] = []

    def broken() -> RecursiveMAS:
        raise ConfigError("no such checkpoint")

    server = ThreadServer(create_app(replace(CONFIG, api_key=None), broken, reasons.append))
    server.thread.start()
    try:
        assert wait_until(lambda: bool(reasons), 10)
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503 and "no such checkpoint" in health.json()["error"]
        response = post(server, good_chat())
        assert response.status_code == 503 and response.json()["error"]["code"] == "not_ready"
    finally:
        server.stop()


def test_an_int8_server_answers_as_the_int8_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """``serve --dtype int8``: the server runs the system ``serve_command``'s factory loads, int8 weights
    and all, and answers as that system does alone."""
    factories: list[Callable[[], RecursiveMAS]] = []
    monkeypatch.setattr(recursivemas.serve, "run_server", lambda config, load: factories.append(load) or 0)
    assert serve_command(preset="tiny-random", dtype="int8") == 0
    server = ThreadServer(create_app(CONFIG, factories[0]))
    server.start()
    try:
        response = post(server, good_chat())
    finally:
        server.stop()
    [expected] = load_system("tiny-random", None, "int8", "cpu").run(
        [QUESTIONS[0]], generation=GREEDY, **SMALL
    )
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == expected.text


def test_text_stream_never_sends_what_may_change() -> None:
    """Trailing whitespace and U+FFFD (a partial character) wait for the next text; with whole words, the
    last word waits too, so a clean-up of spaces before punctuation never rewrites sent text."""
    stream = TextStream()
    texts = [
        "",
        "Hi",
        "Hi \ufffd",
        "Hi \u00e9",
        "Hi \u00e9\ufffd\ufffd",
        "Hi \u00e9\ufffdx",
        "Hi \u00e9\ufffdx  ",
    ]
    assert [stream.update(t) for t in texts] == ["", "Hi", "", " \u00e9", "", "\ufffdx", ""]
    assert stream.finish("Hi \u00e9\ufffdx") == "" and stream.sent == "Hi \u00e9\ufffdx"
    words = TextStream(whole_words=True)
    texts = ["do", "do n", "do n'", "don't", "don't stop", "don't stop ."]
    assert [words.update(t) for t in texts] == ["", "do", "", "", "n't", " stop"]
    assert words.finish("don't stop.") == "."


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(ready: Callable[[], bool], timeout: float) -> bool:
    """Poll ``ready`` (transport errors count as not yet) until it holds or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ready():
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.02)
    return False


def test_sigterm_answers_the_request_in_flight_and_exits_0() -> None:
    port = free_port()
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {KEY}"}
    command = [sys.executable, "-m", "recursivemas.serve", "--preset", "tiny-random", "--port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RECURSIVEMAS_API_KEY": KEY}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: httpx.get(f"{url}/health").status_code == 200, 60)
        slow = good_chat(max_tokens=64, recursivemas={"mode": "text", "rounds": 2})
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(
                httpx.post, f"{url}/v1/chat/completions", json=slow, timeout=60, headers=auth
            )
            running = "recursivemas_running_rows 1"
            assert wait_until(lambda: running in httpx.get(f"{url}/metrics", headers=auth).text, 10)
            proc.send_signal(signal.SIGTERM)
            response = in_flight.result()
        assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"]
        assert proc.wait(30) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
