"""The OpenAI-compatible HTTP API over one ``RecursiveMAS`` system (FastAPI; run by uvicorn).

Routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /health``,
``GET /metrics`` and ``GET /`` (a page to ask questions and see the run's trace). Requests are checked
on the event loop (cheap), queued to the model worker (``batcher.Batcher``) and answered when their batch
finishes; a streaming request gets its answer token by token as the final decode runs. Every error is an
OpenAI error object; nothing a client sends reaches the worker unchecked.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from recursivemas.agent import GenerationConfig
from recursivemas.errors import PromptTooLongError, RecursiveMASError
from recursivemas.serve import responses
from recursivemas.serve.batcher import BatchConfig, Batcher, ClosedError, Job, QueueFullError, RunKey
from recursivemas.serve.config import ServeConfig
from recursivemas.serve.metrics import Metrics
from recursivemas.serve.schemas import (
    APIError,
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    SamplingRequest,
    parse_body,
)
from recursivemas.system import MASInput, RecursiveMAS
from recursivemas.trace import RunResult

LOG = logging.getLogger("recursivemas.serve")
LENS_TOP_K = 3  # nearest tokens per latent thought in a traced run's lens
DISCONNECT_POLL_S = 0.25
KNOWN_PATHS = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")
INSTRUCTION_ROLES = ("system", "developer")


class ClientGoneError(Exception):
    """The client disconnected while its request waited."""


@dataclass
class Service:
    """Shared state of one server: settings, metrics, the batcher and copies of the agents' tokenizers
    (for counting input tokens off the worker thread)."""

    config: ServeConfig
    metrics: Metrics
    batcher: Batcher | None = None
    tokenizers: list[Any] = field(default_factory=list)
    context_limit: int = 0
    whole_words: bool = False
    closing: bool = False

    def attach(self, system: RecursiveMAS) -> RecursiveMAS:
        """Called by the worker once the system is loaded, before it reports ready."""
        distinct = {id(a.tokenizer): a.tokenizer for a in system.agents.values()}
        self.tokenizers = [copy.deepcopy(tok) for tok in distinct.values()]
        self.context_limit = min(a.max_context for a in system.agents.values())
        answerer = system.agents[system.config.answerer].tokenizer
        self.whole_words = bool(getattr(answerer, "clean_up_tokenization_spaces", False))  # TextStream
        return system

    @property
    def input_limit(self) -> int:
        return self.config.max_input_tokens or self.context_limit

    def system(self) -> RecursiveMAS:
        """The loaded system, or a 503 while it loads, after it failed to load, or while shutting down."""
        batcher = self.batcher
        if self.closing:
            raise APIError(503, "the server is shutting down", "shutting_down", kind="server_error")
        if batcher is None or not batcher.ready.is_set() or batcher.system is None:
            why = (
                batcher.load_error if batcher is not None and batcher.load_error else "the models are loading"
            )
            raise APIError(503, f"not ready: {why}", "not_ready", kind="server_error")
        return batcher.system

    def authorized(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header carries the API key (constant-time compare)."""
        key = self.config.api_key
        if key is None:
            return True
        scheme, _, given = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())

    def count_error(self, code: str) -> None:
        self.metrics.inc("recursivemas_errors_total", code=code)


def question_from(messages: list[ChatMessage]) -> str:
    """The last user message, after the system/developer messages (the user's instructions, which so
    reach every agent's prompt)."""
    if not messages:
        raise APIError(400, "messages is empty: send at least one user message", "invalid_value", "messages")
    users = [m for m in messages if m.role == "user"]
    if not users:
        raise APIError(
            400,
            "messages has no user message; the last user message is the question",
            "invalid_value",
            "messages",
        )
    question = users[-1].text()
    if not question.strip():
        raise APIError(400, "the last user message is empty", "invalid_value", "messages")
    instructions = [m.text() for m in messages if m.role in INSTRUCTION_ROLES and m.text().strip()]
    return "\n\n".join([*instructions, question])


def prepare(
    service: Service, system: RecursiveMAS, req: SamplingRequest, question: str
) -> tuple[RunKey, MASInput, GenerationConfig]:
    """Check a request against the server's limits and the system; its run key, input and decoding
    settings (seed included)."""
    cfg, opts = service.config, req.recursivemas
    if req.model != cfg.model_name:
        raise APIError(
            404,
            f"the model {req.model!r} does not exist; this server serves {cfg.model_name!r}",
            "model_not_found",
            "model",
        )
    if req.n not in (None, 1):
        raise APIError(400, f"n must be 1 (one answer per request), got {req.n}", "invalid_value", "n")
    limits = (
        ("rounds", opts.rounds, cfg.max_rounds),
        ("latent_steps", opts.latent_steps, cfg.max_latent_steps),
    )
    for name, value, limit in limits:
        if value is not None and value > limit:
            raise APIError(
                400,
                f"recursivemas.{name} is {value}, the most is {limit}",
                "invalid_value",
                f"recursivemas.{name}",
            )
    max_new = req.max_completion_tokens or req.max_tokens or cfg.default_max_tokens
    if max_new > cfg.max_tokens_limit:
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        raise APIError(
            400, f"{param} is {max_new}, the most is {cfg.max_tokens_limit}", "invalid_value", param
        )
    seed = req.seed if req.seed is not None else secrets.randbelow(2**62)
    try:
        gen = GenerationConfig(max_new, req.temperature or 0.0, 1.0 if req.top_p is None else req.top_p, seed)
        item = MASInput.parse({"question": question, "context": opts.context}, "request")
    except RecursiveMASError as err:
        raise APIError(400, str(err), "invalid_value") from None
    unknown = sorted(set(item.context) - set(system.agents))
    if unknown:
        raise APIError(
            400,
            f"recursivemas.context names unknown agents {unknown}; the agents are {list(system.agents)}",
            "invalid_value",
            "recursivemas.context",
        )
    return RunKey(opts.mode, opts.rounds, opts.latent_steps, LENS_TOP_K if opts.trace else 0), item, gen


def count_input_tokens(tokenizers: list[Any], item: MASInput) -> int:
    """Tokens of the question and context under the tokenizer that makes the most of them."""
    texts = [item.question, *(t for t in item.context.values() if t)]
    return max(
        sum(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]) for tok in tokenizers
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or a 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    too_large = APIError(413, f"the request body exceeds {limit} bytes", "request_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise too_large
        parts.append(part)
    return b"".join(parts)


async def wait_for(job: Job, request: Request, batcher: Batcher) -> RunResult:
    """The job's result; a client that disconnects first has its job withdrawn from the queue."""
    try:
        while not job.future.done():
            await asyncio.wait({job.future}, timeout=DISCONNECT_POLL_S)
            if not job.future.done() and await request.is_disconnected():
                raise ClientGoneError()
    finally:
        if not job.future.done():
            job.future.cancel()
            batcher.withdraw(job)
    return job.future.result()


async def first_update(job: Job, request: Request, batcher: Batcher) -> str | None:
    """A streaming job's first answer so far, or ``None`` if its outcome came first; a client that
    disconnects before has its job withdrawn from the queue."""
    try:
        while True:
            try:
                return await asyncio.wait_for(job.updates.get(), DISCONNECT_POLL_S)
            except TimeoutError:
                if await request.is_disconnected():
                    raise ClientGoneError() from None
    except (ClientGoneError, asyncio.CancelledError):
        job.future.cancel()
        batcher.withdraw(job)
        raise


def engine_error(err: BaseException) -> APIError:
    """The client-facing error of a failed run; faults are logged with their traceback, never returned."""
    if isinstance(err, PromptTooLongError):
        return APIError(400, str(err), "context_length_exceeded")
    if isinstance(err, RecursiveMASError):
        return APIError(400, str(err), "invalid_value")
    LOG.error("the run failed", exc_info=err)
    return APIError(
        500, "the run failed inside the server (see its log)", "internal_error", kind="server_error"
    )


async def answer(
    service: Service, request: Request, req: SamplingRequest, question: str, chat: bool
) -> Response:
    """Queue one request, wait for its batch, and answer it (JSON or an SSE stream)."""
    system = service.system()
    key, item, gen = prepare(service, system, req, question)
    used = await asyncio.to_thread(count_input_tokens, service.tokenizers, item)
    if used > service.input_limit:
        raise APIError(
            400,
            f"the question and context hold {used} tokens, the most is {service.input_limit}",
            "context_length_exceeded",
            "messages" if chat else "prompt",
        )
    loop = asyncio.get_running_loop()
    job = Job(key, item, gen, loop, loop.create_future(), asyncio.Queue() if req.stream else None)
    try:
        service.batcher.submit(job)
    except QueueFullError as full:
        raise APIError(
            429,
            str(full),
            "queue_full",
            kind="rate_limit_error",
            headers={"Retry-After": str(full.retry_after)},
        ) from None
    except ClosedError:
        raise APIError(503, "the server is shutting down", "shutting_down", kind="server_error") from None
    reply = responses.Reply.new(chat, service.config.model_name, gen.max_new_tokens, req.recursivemas.trace)
    if req.stream:
        return await stream(service, request, job, reply, req.include_usage(), question)
    try:
        result = await wait_for(job, request, service.batcher)
    except ClientGoneError:
        service.count_error("client_closed")
        return Response(status_code=499)
    except Exception as err:
        raise engine_error(err) from None
    _log(service, reply, result, question)
    return JSONResponse(responses.body(result, reply))


async def stream(
    service: Service, request: Request, job: Job, reply: responses.Reply, include_usage: bool, question: str
) -> Response:
    """Answer a streaming request once its final decode has produced text (or its run has ended): a run
    that fails before is an HTTP error, one that fails later ends the stream with an error chunk."""
    try:
        first = await first_update(job, request, service.batcher)
    except ClientGoneError:
        service.count_error("client_closed")
        return Response(status_code=499)
    if first is None and job.future.exception() is not None:
        raise engine_error(job.future.exception())
    return StreamingResponse(
        _events(service, job, first, reply, include_usage, question),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _events(
    service: Service,
    job: Job,
    update: str | None,
    reply: responses.Reply,
    include_usage: bool,
    question: str,
) -> AsyncIterator[str]:
    """The SSE chunks of a streaming job whose first update is ``update``: a content delta each time its
    answer grows, then the rest of the final text and the closing chunks."""
    text = responses.TextStream(service.whole_words)
    for chunk in responses.opening(reply):
        yield chunk
    while update is not None:
        if piece := text.update(update):
            yield responses.delta(reply, piece)
        update = await job.updates.get()
    try:
        result = job.future.result()
    except Exception as err:
        error = engine_error(err)
        service.count_error(error.code)
        for chunk in responses.failure(error.body()):
            yield chunk
        return
    _log(service, reply, result, question)
    if piece := text.finish(result.text):
        yield responses.delta(reply, piece)
    for chunk in responses.closing(result, reply, include_usage):
        yield chunk


def _log(service: Service, reply: responses.Reply, result: RunResult, question: str) -> None:
    u = result.usage
    LOG.info(
        "%s mode=%s batch=%d prompt_tokens=%d decoded_tokens=%d latent_steps=%d run_s=%.3f%s",
        reply.id,
        result.mode,
        result.timings["batch_size"],
        u["prompt_tokens"],
        u["decoded_tokens"],
        u["latent_steps"],
        result.timings["total_s"],
        f" question={question!r}" if service.config.log_prompts else "",
    )


class Gate:
    """ASGI middleware: the API key for ``/v1/*`` and ``/metrics``; counts and times every request."""

    def __init__(self, app: Any, service: Service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, start, status = scope["path"], time.perf_counter(), 500
        endpoint = path if path in KNOWN_PATHS else "other"

        async def record(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            headers = dict(scope["headers"])
            protected = path.startswith("/v1/") or path == "/metrics"
            if protected and not self.service.authorized(
                headers.get(b"authorization", b"").decode("latin-1")
            ):
                error = APIError(
                    401, "incorrect or missing API key: send Authorization: Bearer KEY", "invalid_api_key"
                )
                self.service.count_error(error.code)
                await JSONResponse(error.body(), 401, {"WWW-Authenticate": "Bearer"})(scope, receive, record)
                return
            await self.app(scope, receive, record)
        finally:
            self.service.metrics.inc("recursivemas_requests_total", endpoint=endpoint, status=str(status))
            if path.startswith("/v1/"):
                self.service.metrics.observe("recursivemas_request_seconds", time.perf_counter() - start)


def create_app(
    config: ServeConfig, load: Callable[[], RecursiveMAS], on_fatal: Callable[[str], None] | None = None
) -> FastAPI:
    """The app; its startup starts the model worker, which calls ``load`` (``/health`` is 200 once it
    returns); its shutdown lets the worker finish every queued request. ``on_fatal(reason)`` is called if
    ``load`` fails."""
    service = Service(config, Metrics())
    batch = BatchConfig(config.max_batch_size, config.max_wait_ms, config.max_queue)
    service.batcher = Batcher(lambda: service.attach(load()), batch, service.metrics, on_fatal)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.batcher.start()
        yield
        service.closing = True
        await asyncio.to_thread(service.batcher.close)

    app = FastAPI(title="recursivemas", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.add_middleware(Gate, service=service)
    _add_error_handlers(app, service)
    _add_routes(app, service)
    return app


def _add_error_handlers(app: FastAPI, service: Service) -> None:
    def reply(error: APIError) -> JSONResponse:
        service.count_error(error.code)
        return JSONResponse(error.body(), error.status, error.headers)

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return reply(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = (
            "not_found"
            if error.status_code == 404
            else "method_not_allowed"
            if error.status_code == 405
            else "http_error"
        )
        return reply(
            APIError(error.status_code, f"{request.method} {request.url.path}: {error.detail}", code)
        )

    @app.exception_handler(Exception)
    async def fault(_: Request, error: Exception) -> JSONResponse:
        LOG.error("unexpected error", exc_info=error)
        return reply(
            APIError(500, "internal server error (see the server log)", "internal_error", kind="server_error")
        )


def _add_routes(app: FastAPI, service: Service) -> None:
    page = resources.files("recursivemas.serve").joinpath("page.html").read_text(encoding="utf-8")
    limit = service.config.max_body_bytes

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> JSONResponse:
        batcher = service.batcher
        if service.closing:
            return JSONResponse({"status": "shutting_down"}, 503)
        if batcher.load_error:
            return JSONResponse({"status": "error", "error": batcher.load_error}, 503)
        if not batcher.ready.is_set():
            return JSONResponse({"status": "loading"}, 503)
        return JSONResponse({"status": "ok", "model": service.config.model_name})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [_model_card(service)]})

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> JSONResponse:
        if name != service.config.model_name:
            raise APIError(404, f"the model {name!r} does not exist", "model_not_found", "model")
        return JSONResponse(_model_card(service))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = parse_body(ChatRequest, await read_body(request, limit))
        return await answer(service, request, req, question_from(req.messages), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = parse_body(CompletionRequest, await read_body(request, limit))
        if not req.prompt.strip():
            raise APIError(400, "prompt is empty", "invalid_value", "prompt")
        return await answer(service, request, req, req.prompt, chat=False)


def _model_card(service: Service) -> dict:
    return {"id": service.config.model_name, "object": "model", "created": 0, "owned_by": "recursivemas"}
