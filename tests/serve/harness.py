"""Test harness: a real ``recursivemas serve`` app on 127.0.0.1 (uvicorn in a thread, a free port) over
tiny-random. Test modules import it after checking that the serve extra is installed."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

import httpx
import uvicorn

from recursivemas import RecursiveMAS
from recursivemas.serve.app import create_app
from recursivemas.serve.config import ServeConfig
from recursivemas.serve.metrics import parse_metric
from recursivemas.serve.responses import TextStream

KEY = "test-key-0123456789"
MODEL = "tiny-random"
SMALL = {"rounds": 1, "latent_steps": 2}  # a quick run: one round, two latent thoughts per agent
MAX_TOKENS = 8
CONFIG = ServeConfig(
    model_name=MODEL,
    api_key=KEY,
    max_batch_size=8,
    max_wait_ms=100,
    max_input_tokens=200,
    max_tokens_limit=64,
    default_max_tokens=MAX_TOKENS,
    max_latent_steps=1000,
    max_body_bytes=20_000,
)


class ThreadServer:
    """uvicorn serving ``app`` on 127.0.0.1 in a daemon thread; ``url`` once ``start`` returns."""

    def __init__(self, app: object) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, timeout: float = 30.0) -> None:
        """Start and wait until ``/health`` says the models are loaded."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError("the server did not become ready")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


class GatedSystem:
    """A system whose runs wait for ``gate`` (tests hold the worker busy with it); ``entered`` is set
    once a run has started."""

    def __init__(self, system: RecursiveMAS) -> None:
        self._system = system
        self.gate = threading.Event()
        self.entered = threading.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(self._system, name)

    def run(self, *args: object, **kwargs: object) -> list:
        self.entered.set()
        self.gate.wait(30)
        return self._system.run(*args, **kwargs)


class PausingSystem:
    """A system whose final decode, at the first token that gives its answer text a client can be sent,
    waits (up to 10 s) for ``received`` before it decodes on. ``received_in_time`` says whether
    ``received`` came during that wait; ``tokens_after`` counts the tokens decoded after it."""

    def __init__(self, system: RecursiveMAS) -> None:
        self._system = system
        self.received = threading.Event()
        self.received_in_time: bool | None = None
        self.tokens_after = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._system, name)

    def run(
        self, *args: object, on_token: Callable[[int, str], None] | None = None, **kwargs: object
    ) -> list:
        def pausing(row: int, text: str) -> None:
            on_token(row, text)
            if self.received_in_time is not None:
                self.tokens_after += 1
            elif TextStream().update(text):
                self.received_in_time = self.received.wait(10)

        return self._system.run(*args, on_token=None if on_token is None else pausing, **kwargs)


class FailingSystem:
    """A system whose runs report ``text`` as the answer so far (unless empty), then fail."""

    def __init__(self, system: RecursiveMAS, text: str) -> None:
        self._system, self.text = system, text

    def __getattr__(self, name: str) -> object:
        return getattr(self._system, name)

    def run(
        self, *args: object, on_token: Callable[[int, str], None] | None = None, **kwargs: object
    ) -> list:
        if on_token is not None and self.text:
            on_token(0, self.text)
        raise RuntimeError("the model fell over")


@contextmanager
def serving(system: object, **changes: object) -> Iterator[ThreadServer]:
    """A server over ``system`` with ``CONFIG`` changed by ``changes``, stopped on exit."""
    server = ThreadServer(create_app(replace(CONFIG, **changes), lambda: system))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def metric(server: ThreadServer, name: str) -> float:
    """One metric's value (all its series summed) from ``/metrics``."""
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return parse_metric(text, name)
