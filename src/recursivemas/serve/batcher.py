"""Dynamic batching: one worker thread owns the model and runs queued requests in batches.

Requests that arrive within ``max_wait_ms`` of the oldest waiting one and share its ``RunKey`` (mode,
rounds, latent steps, lens: ``RecursiveMAS.run`` takes one of each per call) run as one
``RecursiveMAS.run`` call of up to ``max_batch_size`` rows, each row with its own decoding settings
(max tokens, temperature, top-p) and sampling seed. The engine is batch-invariant, so a row's answer
does not depend on what it ran with. A batch that fails is re-run row by row, so a bad row fails alone.
Results, and a streaming request's answer so far after each token, reach the event loop through
``loop.call_soon_threadsafe``: the loop never waits on the model.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from recursivemas.agent import GenerationConfig
from recursivemas.serve.metrics import Metrics
from recursivemas.system import MASInput, RecursiveMAS
from recursivemas.trace import RunResult

LOG = logging.getLogger("recursivemas.serve")
Outcome = RunResult | BaseException


@dataclass(frozen=True)
class RunKey:
    """The settings ``RecursiveMAS.run`` takes once per call: requests batch together only if equal
    (decoding settings are per row and do not split batches)."""

    mode: str
    rounds: int | None
    latent_steps: int | None
    lens_top_k: int

    def run_kwargs(self) -> dict:
        return {
            "mode": self.mode,
            "rounds": self.rounds,
            "latent_steps": self.latent_steps,
            "lens_top_k": self.lens_top_k,
        }


@dataclass(eq=False)
class Job:
    """One request waiting for (or in) a batch, decoded under ``generation`` (its seed included);
    ``future`` and ``updates`` live on the event loop ``loop``.

    A streaming request has ``updates``: its answer so far after each token of the final decode, then
    ``None`` once ``future`` holds the outcome.
    """

    key: RunKey
    item: MASInput
    generation: GenerationConfig
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    updates: asyncio.Queue[str | None] | None = None
    enqueued: float = field(default_factory=time.perf_counter)

    def progress(self, text: str) -> None:
        """Hand the answer so far to a streaming request (from any thread)."""
        if self.updates is not None:
            self.loop.call_soon_threadsafe(self.updates.put_nowait, text)

    def settle(self, outcome: Outcome) -> None:
        """Hand ``outcome`` to the waiting request (from any thread); ignored if it gave up."""
        self.loop.call_soon_threadsafe(_settle, self.future, outcome, self.updates)


def _settle(future: asyncio.Future, outcome: Outcome, updates: asyncio.Queue[str | None] | None) -> None:
    if updates is not None:
        updates.put_nowait(None)
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class QueueFullError(Exception):
    """The queue holds ``max_queue`` requests; ``retry_after`` is a guess, in seconds, of when to retry."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the queue is full; retry in {retry_after}s")
        self.retry_after = retry_after


class ClosedError(Exception):
    """The server is shutting down (or never loaded its models) and takes no new requests."""


def run_jobs(system: RecursiveMAS, jobs: list[Job]) -> list[Outcome]:
    """One ``RecursiveMAS.run`` over ``jobs`` (all of one key, each with its own decoding settings); if it
    fails, each job runs alone. Streaming jobs get their answer so far after each token."""
    streaming = any(job.updates is not None for job in jobs)
    try:
        return list(
            system.run(
                [job.item for job in jobs],
                generation=[job.generation for job in jobs],
                seeds=[job.generation.seed for job in jobs],
                batch_size=len(jobs),
                on_token=partial(_progress, jobs) if streaming else None,
                **jobs[0].key.run_kwargs(),
            )
        )
    except Exception as err:  # a row the engine refuses, or a fault: isolate it
        if len(jobs) == 1:
            return [err]
        return [run_jobs(system, [job])[0] for job in jobs]


def _progress(jobs: list[Job], row: int, text: str) -> None:
    """``RecursiveMAS.run``'s ``on_token`` for a batch of ``jobs``: row ``row`` is ``jobs[row]``."""
    jobs[row].progress(text)


@dataclass(frozen=True)
class BatchConfig:
    max_batch_size: int = 8
    max_wait_ms: float = 20.0
    max_queue: int = 64


class Batcher:
    """The queue and the model worker thread. The worker first calls ``load`` (the system is ``ready``
    after), then runs batches until ``close``; a failed load calls ``on_fatal`` with the reason."""

    def __init__(
        self,
        load: Callable[[], RecursiveMAS],
        config: BatchConfig,
        metrics: Metrics,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        self.config, self.metrics = config, metrics
        self.system: RecursiveMAS | None = None
        self.ready = threading.Event()
        self.load_error: str | None = None
        self._load, self._on_fatal = load, on_fatal
        self._queue: list[Job] = []
        self._cond = threading.Condition()
        self._closing = False
        self._batch_seconds = 0.0
        self._thread = threading.Thread(target=self._work, name="recursivemas-model", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``; raise ``QueueFullError`` or ``ClosedError`` instead when it cannot wait."""
        with self._cond:
            if self._closing or not self.ready.is_set():
                raise ClosedError()
            if len(self._queue) >= self.config.max_queue:
                raise QueueFullError(self._retry_after())
            self._queue.append(job)
            self.metrics.set("recursivemas_queue_depth", len(self._queue))
            self._cond.notify()

    def withdraw(self, job: Job) -> None:
        """Drop ``job`` if it still waits (its client left); a job already running finishes its batch."""
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
                self.metrics.inc("recursivemas_dropped_total")
                self.metrics.set("recursivemas_queue_depth", len(self._queue))

    def close(self, timeout: float | None = None) -> None:
        """Take no new requests, let the worker finish every queued one, and wait for it."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _retry_after(self) -> int:
        batches_ahead = len(self._queue) / self.config.max_batch_size + 1
        return max(1, math.ceil(self._batch_seconds * batches_ahead))

    def _work(self) -> None:
        try:
            self.system = self._load()
        except Exception as err:
            self.load_error = f"{type(err).__name__}: {err}"
            LOG.error("could not load the system: %s", self.load_error)
            if self._on_fatal is not None:
                self._on_fatal(self.load_error)
            return
        self.ready.set()
        self.metrics.set("recursivemas_ready", 1)
        while (batch := self._take()) is not None:
            if batch:
                self._run(batch)
        self.metrics.set("recursivemas_ready", 0)

    def _take(self) -> list[Job] | None:
        """The next batch (the oldest job and later ones of its key), or ``None`` once closed and empty."""
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            first = self._queue[0]
            deadline = first.enqueued + self.config.max_wait_ms / 1000
            while True:
                batch = [job for job in self._queue if job.key == first.key][: self.config.max_batch_size]
                left = deadline - time.perf_counter()
                if len(batch) >= self.config.max_batch_size or left <= 0 or self._closing:
                    break
                self._cond.wait(left)
            for job in batch:
                self._queue.remove(job)
            self.metrics.set("recursivemas_queue_depth", len(self._queue))
        return [job for job in batch if not job.future.done()]

    def _run(self, batch: list[Job]) -> None:
        start = time.perf_counter()
        for job in batch:
            self.metrics.observe("recursivemas_queue_wait_seconds", start - job.enqueued)
        self.metrics.set("recursivemas_running_rows", len(batch))
        outcomes = run_jobs(self.system, batch)
        seconds = time.perf_counter() - start
        self._batch_seconds = (
            seconds if not self._batch_seconds else 0.8 * self._batch_seconds + 0.2 * seconds
        )
        self.metrics.set("recursivemas_running_rows", 0)
        self.metrics.inc("recursivemas_batches_total")
        self.metrics.observe("recursivemas_batch_size", len(batch))
        self.metrics.observe("recursivemas_batch_seconds", seconds)
        for job, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, RunResult):
                self.metrics.inc("recursivemas_latent_steps_total", outcome.usage["latent_steps"])
                self.metrics.inc("recursivemas_decoded_tokens_total", outcome.usage["decoded_tokens"])
                self.metrics.inc("recursivemas_prompt_tokens_total", outcome.usage["prompt_tokens"])
            job.settle(outcome)
