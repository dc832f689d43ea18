"""``recursivemas serve``: an OpenAI-compatible HTTP server with request batching (needs the ``serve``
extra: FastAPI and uvicorn).

``add_serve_parser`` defines the sub-command's flags and ``serve_command`` runs it; ``create_app`` (in
``recursivemas.serve.app``) builds the app for embedding or tests.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import FrameType

from recursivemas.errors import ConfigError
from recursivemas.loading import AUTO, COMPILE_HELP, DTYPE_CHOICES, DTYPE_HELP, load_system, resolve_device
from recursivemas.presets import DEFAULT_PRESET, PRESETS
from recursivemas.serve.config import LOG, ServeConfig
from recursivemas.system import RecursiveMAS

API_KEY_ENV = "RECURSIVEMAS_API_KEY"


def add_serve_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``serve`` sub-command and its flags to ``sub`` (the CLI's sub-parsers)."""
    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with batching (extra: serve)")
    source = serve.add_mutually_exclusive_group()
    source.add_argument(
        "--preset", choices=sorted(PRESETS), help=f"built-in system (default {DEFAULT_PRESET})"
    )
    source.add_argument("--checkpoint", metavar="DIR", help="a directory written by save_pretrained")
    serve.add_argument(
        "--allow-hub", action="store_true", help="let --checkpoint name models by Hugging Face Hub id"
    )
    serve.add_argument("--init", choices=["trained", "training-free", "identity"], help="a preset's links")
    serve.add_argument(
        "--model-name", help="the model id clients send (default: the preset or checkpoint name)"
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)"
    )
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--api-key",
        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}; prefer it, ps shows arguments)",
    )
    serve.add_argument(
        "--insecure-no-auth", action="store_true", help="allow a non-local --host without an API key"
    )
    serve.add_argument("--max-batch-size", type=int, default=8, help="most requests per batch")
    serve.add_argument("--max-wait-ms", type=float, default=20.0, help="how long a batch waits to fill")
    serve.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    serve.add_argument(
        "--max-input-tokens", type=int, help="most question+context tokens (default: smallest context window)"
    )
    serve.add_argument(
        "--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask"
    )
    serve.add_argument(
        "--default-max-tokens", type=int, default=256, help="max_tokens when a request gives none"
    )
    serve.add_argument("--max-rounds", type=int, default=8, help="largest rounds a request may ask")
    serve.add_argument(
        "--max-latent-steps", type=int, default=256, help="largest latent_steps a request may ask"
    )
    serve.add_argument("--max-body-bytes", type=int, default=1_000_000, help="larger request bodies get 413")
    serve.add_argument("--log-prompts", action="store_true", help="write questions to the log")
    serve.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    serve.add_argument("--dtype", choices=DTYPE_CHOICES, default=AUTO, help=DTYPE_HELP)
    serve.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    return serve


def serve_command(
    preset: str | None = None,
    checkpoint: str | None = None,
    init: str | None = None,
    allow_hub: bool = False,
    model_name: str | None = None,
    api_key: str | None = None,
    device: str = "cpu",
    dtype: str = AUTO,
    compile: bool = False,
    **settings: object,
) -> int:
    """``recursivemas serve``: load the system in the background and serve until SIGTERM/SIGINT.

    The system loads as ``recursivemas run`` loads it: ``dtype`` may be ``int8`` and ``compile`` compiles
    every agent's latent and decode steps (see ``load_system``). ``settings`` are the remaining
    ``ServeConfig`` fields (host, port, limits, ...). Returns 0 after a graceful stop (in-flight requests
    answered), 1 if the models could not be loaded.
    """
    config = ServeConfig(
        model_name=model_name or default_model_name(preset, checkpoint),
        api_key=api_key or os.environ.get(API_KEY_ENV) or None,
        **settings,
    )
    config.check_bind()
    resolve_device(device)
    load = partial(load_system, preset, checkpoint, dtype, device, init, allow_hub, compile)
    return run_server(config, load)


def default_model_name(preset: str | None, checkpoint: str | None) -> str:
    if checkpoint:
        return Path(checkpoint).resolve().name
    return preset or DEFAULT_PRESET


def run_server(config: ServeConfig, load: Callable[[], RecursiveMAS]) -> int:
    """Serve ``create_app(config, load)`` with uvicorn on ``config.host:config.port``."""
    try:
        import uvicorn

        from recursivemas.serve.app import create_app
    except ImportError as err:
        raise ConfigError(
            f"recursivemas serve needs FastAPI and uvicorn ({err.name} is missing): "
            "pip install 'recursivemas[serve]'"
        ) from None
    _log_to_stderr()
    failed: list[str] = []

    def on_fatal(reason: str) -> None:
        failed.append(reason)
        server.should_exit = True

    app = create_app(config, load, on_fatal)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="info"))
    # uvicorn restores this handler after its graceful shutdown and re-raises SIGTERM into it: a clean exit.
    signal.signal(signal.SIGTERM, _stopped)
    server.run()
    return 1 if failed else 0


def _stopped(signum: int, frame: FrameType | None) -> None:
    LOG.info("stopped by signal %d after answering the requests in flight", signum)


def _log_to_stderr() -> None:
    if not LOG.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
