"""The round loop: the one place that walks a system's graph over rounds, for inference and training.

Per round ``k = 1..r``, the agents of ``SystemConfig.schedule(k, r)`` act in order. Each agent's prompt
is rendered with the messages that reached it (an edge ``src -> dst`` fills ``dst``'s slot with the
latest message of ``src``: this round's if ``src`` acted earlier in the round, the previous round's
otherwise), and then the agent takes one *turn*. What a turn does is the caller's ``Turns``:

* inference (``RecursiveMAS.run``): a latent turn is a KV-cached rollout of ``m`` thoughts; the final
  turn (the answerer in round ``r``), and every turn in text mode, decodes text;
* training (``recursivemas.train.objectives``): a latent turn is the same rollout with gradients (or a
  teacher-forced read of reference text), and the final turn returns the answer loss.

A latent message is ``R_in(H)`` in the sender's embedding space: a (B, m, d_src) tensor, or one
(m_i, d_src) tensor per row when rows differ in length; the receiving edge's outer link maps it to the
receiver's space (``R_out``) when the receiver's prompt is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from recursivemas.agent import Agent, Piece, PromptBatch

if TYPE_CHECKING:
    from recursivemas.system import RecursiveMAS


class Item(Protocol):
    """One question and its per-agent private context (``MASInput``, a training row, ...)."""

    question: str
    context: dict[str, str]


@dataclass
class Message:
    """What an agent last produced: latent vectors ``R_in(H)`` (a (B, m, d_src) tensor or one
    (m_i, d_src) tensor per row), or one text per row."""

    latent: torch.Tensor | list[torch.Tensor] | None = None
    texts: list[str] | None = None


@dataclass(frozen=True)
class Stage:
    """One agent's turn: who, in which round, and whether it is the final answer."""

    name: str
    round: int
    final: bool


class Turns(Protocol):
    """What an agent does with its prompt (``rows``, spliced; ``batch``, their embedding). ``speak``
    returns the message (text) and whatever the caller wants from the final stage (a decode, a loss);
    ``think`` returns a latent message."""

    def speak(
        self, stage: Stage, agent: Agent, batch: PromptBatch, rows: list[list[Piece]]
    ) -> tuple[Message, Any]: ...

    def think(self, stage: Stage, agent: Agent, batch: PromptBatch, rows: list[list[Piece]]) -> Message: ...


def render_rows(
    agent: Agent, items: Sequence[Item], values: dict[str, list[Piece]], round_: int = 1
) -> list[list[Piece]]:
    """Each item's spliced prompt for ``agent`` in round ``round_``: slots with a value (one piece per
    item) are filled, optional blocks of the others dropped."""
    rows = []
    for i, item in enumerate(items):
        segments = agent.render(item.question, item.context.get(agent.name), set(values), round_)
        rows.append(agent.fill(segments, {slot: v[i] for slot, v in values.items()}))
    return rows


class RoundLoop:
    """Runs ``items`` through ``system``'s graph for ``rounds`` rounds with the given ``turns``.

    ``text`` makes every stage speak (the Recursive-TextMAS baseline); ``single`` runs only the answerer,
    once, with no slots. ``run()`` returns what the final stage's ``speak`` returned.
    """

    def __init__(
        self,
        system: RecursiveMAS,
        items: Sequence[Item],
        rounds: int,
        turns: Turns,
        text: bool = False,
        single: bool = False,
    ) -> None:
        self.system, self.items, self.rounds, self.turns = system, items, rounds, turns
        self.text, self.single = text, single
        self.messages: dict[str, Message] = {}

    def run(self) -> Any:
        cfg = self.system.config
        if self.single:
            return self.stage(Stage(cfg.answerer, 1, True))
        result = None
        for round_ in range(1, self.rounds + 1):
            for name in cfg.schedule(round_, self.rounds):
                final = round_ == self.rounds and name == cfg.answerer
                out = self.stage(Stage(name, round_, final))
                if final:
                    result = out
        return result

    def stage(self, stage: Stage) -> Any:
        """Build ``stage.name``'s prompt from the messages so far and take its turn; a speaking agent's
        prompt ends with its template's ``response_prefix``."""
        agent = self.system.agents[stage.name]
        values = {} if self.single else self.slot_values(stage.name)
        rows = render_rows(agent, self.items, values, stage.round)
        if stage.final or self.text:
            prefix = agent.template.response_prefix if agent.template is not None else ""
            rows = [[*row, prefix] for row in rows] if prefix else rows
            message, out = self.turns.speak(stage, agent, agent.encode(rows), rows)
            self.messages[stage.name] = message
            return out
        self.messages[stage.name] = self.turns.think(stage, agent, agent.encode(rows), rows)
        return None

    def slot_values(self, name: str) -> dict[str, list[Piece]]:
        """Per incoming edge with a message, one piece per row: the sender's text, or its latent vectors
        mapped by the edge's outer link, (m, d_dst) on the receiver's device and dtype."""
        agent = self.system.agents[name]
        values: dict[str, list[Piece]] = {}
        for edge in self.system.config.incoming(name):
            message = self.messages.get(edge.src)
            if message is None or (message.latent is None and message.texts is None):
                continue  # not acted yet, or acted without a message (a final answer's loss)
            if message.texts is not None:
                values[edge.slot] = list(message.texts)
                continue
            link = self.system.outer(edge)
            latent = message.latent
            mapped = list(link(latent)) if isinstance(latent, torch.Tensor) else [link(t) for t in latent]
            values[edge.slot] = [m.to(device=agent.device, dtype=agent.dtype) for m in mapped]
        return values
