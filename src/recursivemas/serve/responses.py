"""OpenAI response bodies and Server-Sent-Event chunks built from a ``RunResult``.

A streamed answer is sent as the answering agent's final decode runs: the role chunk (chat), content
deltas as tokens are decoded (``TextStream`` turns the answer so far into deltas that never have to be
taken back), then the rest of the final text, ``finish_reason`` with our ``recursivemas`` field, an
optional usage chunk and ``data: [DONE]``. The chunk format is OpenAI's, so any streaming client works.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from recursivemas.trace import RunResult

LOG = logging.getLogger("recursivemas.serve")
UNSETTLED_END = re.compile(r"[\s\ufffd]+\Z")  # trailing whitespace and U+FFFD (a partial character)
LAST_WORD = re.compile(r"\S+\Z")
DONE = "data: [DONE]\n\n"


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


class TextStream:
    """One streamed answer: turns its successive texts so far into deltas that never need taking back.

    The end of a text is held back while the next tokens may still change it: trailing U+FFFD (the
    bytes of a character not all decoded yet) and trailing whitespace (answers are stripped); with
    ``whole_words`` (for a tokenizer that cleans up spaces before punctuation, which rewrites the text
    before a new token) the last word too. ``sent`` is everything sent so far.
    """

    def __init__(self, whole_words: bool = False) -> None:
        self.whole_words = whole_words
        self.sent = ""

    def update(self, text: str) -> str:
        """The new settled part of ``text`` (the answer so far), ``""`` if none."""
        settled = UNSETTLED_END.sub("", text)
        if self.whole_words:
            settled = UNSETTLED_END.sub("", LAST_WORD.sub("", settled))
        return self._advance(settled)

    def finish(self, text: str) -> str:
        """The rest of the final ``text``."""
        if not text.startswith(self.sent):
            LOG.warning("a streamed answer changed after it was sent; the stream differs from the answer")
        return self._advance(text)

    def _advance(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta


def opening(reply: Reply) -> list[str]:
    """The chunks that open a stream: the assistant role for a chat completion, none for a completion."""
    return [_chunk(reply, {"role": "assistant", "content": ""}, None)] if reply.chat else []


def delta(reply: Reply, text: str) -> str:
    """One content chunk."""
    return _chunk(reply, {"content": text}, None)


def closing(result: RunResult, reply: Reply, include_usage: bool) -> Iterator[str]:
    """The chunks that close a stream: ``finish_reason`` (with our field), usage if asked, ``[DONE]``."""
    yield _chunk(reply, {}, finish_reason(result, reply.max_new_tokens), extension(result, reply.trace))
    if include_usage:
        yield sse({**_head(reply), "choices": [], "usage": usage(result)})
    yield DONE


def failure(error: dict) -> Iterator[str]:
    """The end of a stream whose run failed after it started: the OpenAI error object, then ``[DONE]``."""
    yield sse(error)
    yield DONE


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
