"""Prometheus text-format metrics, hand-written (no client library): counters, gauges and histograms.

Updated from the event loop and from the model worker thread, so every change takes one lock.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

Labels = tuple[tuple[str, str], ...]


@dataclass
class _Histogram:
    buckets: Sequence[float]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def observe(self, value: float) -> None:
        if not self.counts:
            self.counts = [0] * len(self.buckets)
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.n += 1


@dataclass(frozen=True)
class _Family:
    name: str
    kind: str  # counter | gauge | histogram
    help: str
    buckets: Sequence[float] = ()


FAMILIES = {
    f.name: f
    for f in (
        _Family("recursivemas_requests_total", "counter", "HTTP requests answered, by endpoint and status."),
        _Family("recursivemas_errors_total", "counter", "Error responses, by error code."),
        _Family("recursivemas_ready", "gauge", "1 once the models are loaded and requests are served."),
        _Family("recursivemas_queue_depth", "gauge", "Requests waiting for the model worker."),
        _Family("recursivemas_running_rows", "gauge", "Requests in the batch the worker is running."),
        _Family("recursivemas_batches_total", "counter", "Batches run by the model worker."),
        _Family("recursivemas_dropped_total", "counter", "Queued requests dropped: their client left."),
        _Family("recursivemas_batch_size", "histogram", "Requests per batch run.", SIZE_BUCKETS),
        _Family("recursivemas_latent_steps_total", "counter", "Latent thoughts produced, all agents."),
        _Family("recursivemas_decoded_tokens_total", "counter", "Text tokens decoded, all agents."),
        _Family("recursivemas_prompt_tokens_total", "counter", "Prompt tokens read, all agents."),
        _Family(
            "recursivemas_request_seconds",
            "histogram",
            "Time from a request's arrival to its answer.",
            LATENCY_BUCKETS,
        ),
        _Family(
            "recursivemas_queue_wait_seconds",
            "histogram",
            "Time a request waited in the queue.",
            LATENCY_BUCKETS,
        ),
        _Family("recursivemas_batch_seconds", "histogram", "Wall time of one batch run.", LATENCY_BUCKETS),
    )
}


class Metrics:
    """The server's metrics; ``render()`` gives the Prometheus text exposition."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, dict[Labels, float]] = {
            n: {} for n, f in FAMILIES.items() if f.kind != "histogram"
        }
        self._histograms: dict[str, _Histogram] = {
            n: _Histogram(f.buckets) for n, f in FAMILIES.items() if f.kind == "histogram"
        }

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._values[name]
            series[key] = series.get(key, 0.0) + amount

    def set(self, name: str, value: float) -> None:
        with self._lock:
            self._values[name][()] = value

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            self._histograms[name].observe(value)

    def value(self, name: str, **labels: str) -> float:
        """The current value of a counter or gauge series (0 if never set)."""
        with self._lock:
            return self._values[name].get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            for name, family in FAMILIES.items():
                lines += [f"# HELP {name} {family.help}", f"# TYPE {name} {family.kind}"]
                if family.kind == "histogram":
                    lines += _histogram_lines(name, self._histograms[name])
                else:
                    series = self._values[name] or ({(): 0.0} if family.kind == "gauge" else {})
                    lines += [f"{name}{_labels(key)} {_number(v)}" for key, v in sorted(series.items())]
        return "\n".join(lines) + "\n"


def _histogram_lines(name: str, hist: _Histogram) -> list[str]:
    counts = hist.counts or [0] * len(hist.buckets)
    lines = [
        f'{name}_bucket{{le="{_number(bound)}"}} {count}'
        for bound, count in zip(hist.buckets, counts, strict=True)
    ]
    return [
        *lines,
        f'{name}_bucket{{le="+Inf"}} {hist.n}',
        f"{name}_sum {hist.total}",
        f"{name}_count {hist.n}",
    ]


def _labels(key: Labels) -> str:
    if not key:
        return ""
    escaped = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for _, v in key)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(key, escaped, strict=True)) + "}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def parse_metric(text: str, name: str) -> float:
    """The summed value of every series of ``name`` in a rendered exposition (for clients and tests)."""
    total = 0.0
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        if series == name or series.startswith(name + "{"):
            total += float(value)
    return total
