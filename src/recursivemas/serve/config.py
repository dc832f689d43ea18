"""Server settings (``recursivemas serve`` flags) and the bind-address safety check."""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

from recursivemas.errors import ConfigError

LOG = logging.getLogger("recursivemas.serve")
LOCAL_NAMES = ("localhost",)


@dataclass(frozen=True)
class ServeConfig:
    """What ``recursivemas serve`` serves and how.

    Attributes:
        model_name: the id clients pass as ``model`` (``GET /v1/models`` lists it).
        host, port: where to listen (127.0.0.1 by default: only this machine can connect).
        api_key: clients must send ``Authorization: Bearer <key>`` to ``/v1/*`` and ``/metrics``.
        insecure_no_auth: allow a non-local ``host`` without an API key (warned about).
        max_batch_size: most requests run together in one batch.
        max_wait_ms: how long the first request of a batch waits for others to join it.
        max_queue: most requests waiting for the model; past it, 429 with ``Retry-After``.
        max_input_tokens: most tokens in a request's question and context (counted with every agent's
            tokenizer, the largest count); ``None``: the smallest agent context window.
        max_tokens_limit: the largest ``max_tokens`` a request may ask for.
        default_max_tokens: ``max_tokens`` of a request that gives none.
        max_rounds, max_latent_steps: the largest ``rounds`` / ``latent_steps`` a request may ask for.
        max_body_bytes: request bodies past this size get 413.
        log_prompts: write questions to the log (off: logs hold ids, sizes and timings only).
    """

    model_name: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    insecure_no_auth: bool = False
    max_batch_size: int = 8
    max_wait_ms: float = 20.0
    max_queue: int = 64
    max_input_tokens: int | None = None
    max_tokens_limit: int = 1024
    default_max_tokens: int = 256
    max_rounds: int = 8
    max_latent_steps: int = 256
    max_body_bytes: int = 1_000_000
    log_prompts: bool = False

    def __post_init__(self) -> None:
        for name in (
            "max_batch_size",
            "max_queue",
            "max_tokens_limit",
            "default_max_tokens",
            "max_rounds",
            "max_latent_steps",
            "max_body_bytes",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.max_input_tokens is not None and self.max_input_tokens < 1:
            raise ConfigError(f"--max-input-tokens must be a positive integer, got {self.max_input_tokens}")
        if not 0 <= self.max_wait_ms <= 10_000:
            raise ConfigError(f"--max-wait-ms must be from 0 to 10000, got {self.max_wait_ms}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be from 0 to 65535, got {self.port}")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ConfigError(
                f"the default max_tokens {self.default_max_tokens} exceeds --max-tokens-limit "
                f"{self.max_tokens_limit}"
            )
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("--api-key is empty; give a key or leave it out")

    def check_bind(self) -> None:
        """Refuse a non-local ``host`` without an API key unless ``insecure_no_auth`` (then warn)."""
        if is_local(self.host) or self.api_key:
            return
        if not self.insecure_no_auth:
            raise ConfigError(
                f"--host {self.host} lets other machines connect, and no API key is set: pass --api-key KEY "
                "(or set RECURSIVEMAS_API_KEY), or --insecure-no-auth to serve without one"
            )
        LOG.warning(
            "serving on %s without an API key (--insecure-no-auth): anyone who can reach it can use it",
            self.host,
        )


def is_local(host: str) -> bool:
    """Whether ``host`` is a loopback address or ``localhost`` (only this machine can connect)."""
    if host in LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
