"""Request bodies (strict pydantic models of the OpenAI fields we accept) and the OpenAI error object."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An error answered as an OpenAI error object: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    """Strict types (no ``"16"`` for 16, no ``true`` for 1); unknown OpenAI fields are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(_Strict):
    include_usage: bool = False


class MASOptions(BaseModel):
    """Our own settings, sent as ``recursivemas`` (the openai client: ``extra_body={"recursivemas": ...}``).

    Attributes:
        mode: ``latent`` (RecursiveMAS), ``text`` (Recursive-TextMAS) or ``single`` (answerer alone).
        rounds, latent_steps: override the system's (bounded by the server's limits).
        context: agent name -> private text for that agent's prompt.
        trace: return the run's trace (stages, tool calls, latent lens) in the ``recursivemas`` field.
    """

    model_config = ConfigDict(strict=True, extra="forbid")

    mode: Literal["latent", "text", "single"] = "latent"
    rounds: int | None = Field(default=None, ge=1)
    latent_steps: int | None = Field(default=None, ge=1)
    context: dict[str, str] = Field(default_factory=dict)
    trace: bool = False


class SamplingRequest(_Strict):
    """Fields shared by chat and text completions."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, lt=2**62)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    recursivemas: MASOptions = Field(default_factory=MASOptions)

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage]


class CompletionRequest(SamplingRequest):
    prompt: str


def parse_body(model: type[SamplingRequest], raw: bytes) -> SamplingRequest:
    """Validate a JSON body; malformed JSON or a wrong field becomes a 400 ``APIError`` naming it."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as err:
        first = err.errors()[0]
        if first["type"] == "json_invalid":
            raise APIError(400, f"the body is not valid JSON: {first['msg']}", "invalid_json") from None
        if first["type"] == "model_type":
            raise APIError(400, "the body must be a JSON object", "invalid_type") from None
        param = ".".join(str(part) for part in first["loc"])
        raise APIError(400, f"{param}: {first['msg']}", _code(first["type"]), param) from None


def _code(error_type: str) -> str:
    """An OpenAI-style error code for a pydantic error type."""
    if error_type == "missing":
        return "missing_required_parameter"
    if error_type == "extra_forbidden":
        return "unknown_parameter"
    if error_type.endswith(("_type", "_parsing")):
        return "invalid_type"
    return "invalid_value"
