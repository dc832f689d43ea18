"""Load test of ``recursivemas serve`` on 127.0.0.1: batching vs ``--max-batch-size 1``.

For each server setting (a fresh ``python -m recursivemas.serve`` per setting) and each concurrency, an
asyncio + httpx client keeps ``concurrency`` requests in flight until ``--requests`` have been answered
(greedy, the same questions for every setting) and reports requests/s, decoded tokens/s (all agents'
decoded tokens, ``usage.completion_tokens``), p50/p95/p99 latency and errors. ``--soak-seconds`` then
runs one more server at concurrency ``--soak-concurrency`` for that long and reports its resident memory
(``VmRSS``) at the start and the end.

    python benchmarks/serve_load.py [--preset smollm2-gemma3] [--concurrency 1,4,16] [--requests 48]
                                    [--batch-sizes 8,1] [--max-tokens 64] [--mode latent]
                                    [--rounds R] [--latent-steps M] [--soak-seconds 600] [--dtype float32]

Writes benchmarks/results/serve_load-<preset>.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

RESULTS = Path(__file__).parent / "results"
KEY = "serve-load-key"


@dataclass
class Level:
    """One (server setting, concurrency) measurement."""

    max_batch_size: int
    concurrency: int
    requests: int
    errors: int
    seconds: float
    requests_per_s: float
    decoded_tokens_per_s: float
    p50_s: float
    p95_s: float
    p99_s: float
    batches: float
    error_samples: list[str] = field(default_factory=list)


def questions(n: int) -> list[str]:
    """``n`` distinct arithmetic questions of a few lengths (the same for every setting)."""
    return [f"What is {7 * i + 3} plus {11 * i + 5}?" + " Answer with a number." * (i % 3) for i in range(n)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Server:
    """``python -m recursivemas.serve`` as a child process on a free port, stopped with SIGTERM."""

    def __init__(
        self, preset: str, max_batch_size: int, max_wait_ms: float, max_tokens: int, dtype: str = "float32"
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable, "-m", "recursivemas.serve", "--preset", preset, "--port", str(self.port),
            "--max-batch-size", str(max_batch_size), "--max-wait-ms", str(max_wait_ms),
            "--max-queue", "1024", "--max-tokens-limit", str(max(max_tokens, 1024)),
            "--dtype", dtype,  # float32 by default, as the committed figures ran (the server's is auto)
        ]  # fmt: skip
        env = {**os.environ, "RECURSIVEMAS_API_KEY": KEY}
        self.proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} before it was ready")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError("the server did not become ready")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)


async def drive(
    url: str, prompts: list[str], concurrency: int, body: dict, duration: float | None = None
) -> tuple[list[float], int, list[str], float]:
    """Keep ``concurrency`` requests in flight over ``prompts`` (cycled for ``duration`` seconds if
    given). Returns latencies, decoded tokens, error descriptions and elapsed seconds."""
    latencies: list[float] = []
    errors: list[str] = []
    tokens = 0
    next_index = 0
    start = time.perf_counter()

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal tokens, next_index
        while True:
            if duration is None and next_index >= len(prompts):
                return
            if duration is not None and time.perf_counter() - start >= duration:
                return
            question = prompts[next_index % len(prompts)]
            next_index += 1
            sent = time.perf_counter()
            try:
                response = await client.post(
                    "/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": question}]}
                )
            except httpx.HTTPError as err:
                errors.append(type(err).__name__)
                continue
            if response.status_code != 200:
                errors.append(f"{response.status_code} {response.text[:120]}")
                continue
            latencies.append(time.perf_counter() - sent)
            tokens += response.json()["usage"]["completion_tokens"]

    headers = {"Authorization": f"Bearer {KEY}"}
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return latencies, tokens, errors, time.perf_counter() - start


def measure(server: Server, prompts: list[str], concurrency: int, body: dict, max_batch_size: int) -> Level:
    batches = server.metric("recursivemas_batches_total")
    latencies, tokens, errors, seconds = asyncio.run(drive(server.url, prompts, concurrency, body))
    return Level(
        max_batch_size=max_batch_size,
        concurrency=concurrency,
        requests=len(latencies),
        errors=len(errors),
        seconds=seconds,
        requests_per_s=len(latencies) / seconds,
        decoded_tokens_per_s=tokens / seconds,
        p50_s=percentile(latencies, 0.50),
        p95_s=percentile(latencies, 0.95),
        p99_s=percentile(latencies, 0.99),
        batches=server.metric("recursivemas_batches_total") - batches,
        error_samples=errors[:3],
    )


def soak(args: argparse.Namespace, body: dict) -> dict:
    """Concurrency ``--soak-concurrency`` for ``--soak-seconds`` on a batching server: errors and RSS."""
    server = Server(args.preset, args.batch_sizes[0], args.max_wait_ms, args.max_tokens, args.dtype)
    try:
        server.wait_ready()
        asyncio.run(drive(server.url, questions(4), args.soak_concurrency, body))  # warm up
        start_rss = server.rss_mib()
        prompts = questions(args.requests)
        latencies, _, errors, seconds = asyncio.run(
            drive(server.url, prompts, args.soak_concurrency, body, args.soak_seconds)
        )
        end_rss = server.rss_mib()
    finally:
        exit_code = server.stop()
    return {
        "concurrency": args.soak_concurrency,
        "seconds": seconds,
        "requests": len(latencies),
        "errors": len(errors),
        "rss_start_mib": start_rss,
        "rss_end_mib": end_rss,
        "exit_code": exit_code,
    }


def markdown(levels: list[Level]) -> str:
    header = ("max batch", "concurrency", "requests", "errors", "req/s", "decoded tok/s", "p50 s", "p95 s")
    lines = ["| " + " | ".join([*header, "p99 s", "batches"]) + " |", "|---" * 10 + "|"]
    for x in levels:
        lines.append(
            f"| {x.max_batch_size} | {x.concurrency} | {x.requests} | {x.errors} | {x.requests_per_s:.2f} | "
            f"{x.decoded_tokens_per_s:.1f} | {x.p50_s:.3f} | {x.p95_s:.3f} | {x.p99_s:.3f} | "
            f"{x.batches:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smollm2-gemma3")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated client concurrencies")
    parser.add_argument("--requests", type=int, default=48, help="answered requests per concurrency")
    parser.add_argument("--batch-sizes", default="8,1", help="server --max-batch-size values, compared")
    parser.add_argument("--max-wait-ms", type=float, default=20.0)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--mode", default="latent", choices=["latent", "text", "single"])
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--latent-steps", type=int)
    parser.add_argument("--soak-seconds", type=float, default=0.0, help="0: no soak")
    parser.add_argument("--soak-concurrency", type=int, default=4)
    parser.add_argument("--dtype", default="float32", help="the servers' --dtype (their own default: auto)")
    parser.add_argument("--output", type=Path, help="default: results/serve_load-<preset>.json")
    args = parser.parse_args()
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    settings = {"mode": args.mode}
    settings.update({k: v for k, v in (("rounds", args.rounds), ("latent_steps", args.latent_steps)) if v})
    body = {"model": args.preset, "max_tokens": args.max_tokens, "temperature": 0, "recursivemas": settings}
    prompts = questions(args.requests)
    levels: list[Level] = []
    exit_codes = {}
    for max_batch_size in args.batch_sizes:
        server = Server(args.preset, max_batch_size, args.max_wait_ms, args.max_tokens, args.dtype)
        try:
            server.wait_ready()
            asyncio.run(drive(server.url, questions(2), 1, body))  # warm up
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                levels.append(measure(server, prompts, concurrency, body, max_batch_size))
                print(markdown(levels[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
        finally:
            exit_codes[max_batch_size] = server.stop()
    report = {
        "preset": args.preset,
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "levels": [asdict(x) for x in levels],
        "server_exit_codes": exit_codes,
        "soak": soak(args, body) if args.soak_seconds > 0 else None,
    }
    output = args.output or RESULTS / f"serve_load-{args.preset}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(levels))
    if report["soak"]:
        print(f"\nsoak: {json.dumps(report['soak'])}")


if __name__ == "__main__":
    main()
