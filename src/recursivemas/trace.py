"""Per-question run records: one ``StageTrace`` per agent turn, totals in ``RunResult``."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from recursivemas.tools import ToolCall


@dataclass(frozen=True)
class StageTrace:
    """One agent turn for one question.

    Attributes:
        agent, round: who acted and in which round (1-based).
        kind: ``"latent"`` (latent thoughts) or ``"text"`` (decoded text).
        latent_steps: latent thoughts produced (0 for text stages).
        decoded_tokens: text tokens generated (0 for latent stages).
        prompt_tokens: text tokens in this agent's prompt.
        latent_inputs: latent vectors spliced into the prompt.
        seconds: wall time of the stage for the whole batch the question ran in.
        final: whether this stage wrote the final answer.
        lens: latent stages run with a lens only: agent name -> per latent thought, its nearest
            vocabulary tokens under that agent's input-embedding table (the sender's own, and each
            receiver's after the outer link).
        text: text stages only: what the agent decoded (its message, or the final answer).
        tool_call: ``kind == "tool"`` only: one call run while the agent decoded (tool, input, output
            cut to the tool box's ``result_chars``, seconds, error); the agent's text stage follows it.
    """

    agent: str
    round: int
    kind: str
    latent_steps: int
    decoded_tokens: int
    prompt_tokens: int
    latent_inputs: int
    seconds: float
    final: bool
    lens: dict[str, list[list[str]]] | None = None
    text: str | None = None
    tool_call: ToolCall | None = None


@dataclass(frozen=True)
class RunResult:
    """The answer to one question, its usage totals and its trace (the JSON Lines contract of the CLI)."""

    question: str
    mode: str
    text: str
    answer: str | None
    usage: dict
    timings: dict
    trace: list[StageTrace]

    @classmethod
    def build(
        cls,
        question: str,
        mode: str,
        text: str,
        answer: str | None,
        trace: list[StageTrace],
        total_s: float,
        batch_size: int,
    ) -> RunResult:
        usage = {
            "prompt_tokens": sum(s.prompt_tokens for s in trace),
            "decoded_tokens": sum(s.decoded_tokens for s in trace),
            "latent_steps": sum(s.latent_steps for s in trace),
            "latent_inputs": sum(s.latent_inputs for s in trace),
            "tool_calls": sum(s.kind == "tool" for s in trace),
            "stages": sum(s.kind != "tool" for s in trace),
        }
        timings = {"total_s": total_s, "batch_size": batch_size}
        return cls(question, mode, text, answer, usage, timings, list(trace))

    def to_dict(self) -> dict:
        return asdict(self)
