"""OpenAI response bodies and Server-Sent-Event chunks built from a ``RunResult``.

Streaming note: ``RecursiveMAS.run`` has no per-token hook, so a streamed answer is sent once the run
has finished: the role chunk, then the answering agent's final text as word-sized content deltas, then
``finish_reason``, an optional usage chunk and ``data: [DONE]``. The chunk format is OpenAI's, so any
streaming client works; only the time to first token equals the whole run's.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from recursivemas.trace import RunResult

PIECE = re.compile(r"\s*\S+|\s+")


@dataclass(frozen=True)
class Reply:
    """What a response needs besides the result: its kind, model name, token limit and options."""

    chat: bool
    model: str
    max_new_tokens: int
    trace: bool
    id: str = ""
    created: int = 0

    @classmethod
    def new(cls, chat: bool, model: str, max_new_tokens: int, trace: bool) -> Reply:
        prefix = "chatcmpl" if chat else "cmpl"
        return cls(chat, model, max_new_tokens, trace, f"{prefix}-{uuid.uuid4().hex}", int(time.time()))

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"


def usage(result: RunResult) -> dict:
    """OpenAI usage: every agent's prompt and decoded tokens, plus the latent thoughts of the run."""
    prompt, completion = result.usage["prompt_tokens"], result.usage["decoded_tokens"]
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "latent_steps": result.usage["latent_steps"],
    }


def finish_reason(result: RunResult, max_new_tokens: int) -> str:
    """``length`` if the final decode used every allowed token, else ``stop``."""
    final = [s for s in result.trace if s.final and s.kind == "text"]
    return "length" if final and final[-1].decoded_tokens >= max_new_tokens else "stop"


def extension(result: RunResult, trace: bool) -> dict:
    """Our ``recursivemas`` field: mode, extracted answer, full usage, timings and, if asked, the trace."""
    out = {"mode": result.mode, "answer": result.answer, "usage": result.usage, "timings": result.timings}
    if trace:
        out["trace"] = [asdict(stage) for stage in result.trace]
    return out


def body(result: RunResult, reply: Reply) -> dict:
    """The non-streaming response."""
    reason = finish_reason(result, reply.max_new_tokens)
    if reply.chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": result.text},
            "logprobs": None,
            "finish_reason": reason,
        }
    else:
        choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": reason}
    return {
        "id": reply.id,
        "object": reply.object,
        "created": reply.created,
        "model": reply.model,
        "choices": [choice],
        "usage": usage(result),
        "recursivemas": extension(result, reply.trace),
    }


def chunks(result: RunResult, reply: Reply, include_usage: bool) -> Iterator[str]:
    """The streamed response as SSE ``data:`` lines (see the module docstring)."""
    if reply.chat:
        yield _chunk(reply, {"role": "assistant", "content": ""}, None)
    for piece in PIECE.findall(result.text):
        yield _chunk(reply, {"content": piece}, None)
    yield _chunk(reply, {}, finish_reason(result, reply.max_new_tokens), extension(result, reply.trace))
    if include_usage:
        yield sse({**_head(reply), "choices": [], "usage": usage(result)})
    yield "data: [DONE]\n\n"


def _head(reply: Reply) -> dict:
    kind = "chat.completion.chunk" if reply.chat else "text_completion"
    return {"id": reply.id, "object": kind, "created": reply.created, "model": reply.model}


def _chunk(reply: Reply, delta: dict, reason: str | None, ext: dict | None = None) -> str:
    if reply.chat:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
    else:
        choice = {"index": 0, "text": delta.get("content", ""), "logprobs": None, "finish_reason": reason}
    out = {**_head(reply), "choices": [choice]}
    if ext is not None:
        out["recursivemas"] = ext
    return sse(out)


def sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"
