"""RecursiveMAS: frozen agents, trainable links, a graph of latent edges, run for r rounds (SPEC §5).

The graph is an ordered list of agents (the order they act in within a round), the answering agent,
and edges ``src -> dst`` that fill a named slot of ``dst``'s prompt. An edge whose source acts earlier
in the round carries this round's message; one whose source acts later (a feedback edge, e.g.
solver -> planner) carries the previous round's message and is absent in round 1. In the last round
only the agents that feed the answerer run, and the answerer decodes text.

Three modes over the same graph, prompts and rounds:

* ``latent`` (RecursiveMAS): agents think ``m`` latent steps; an edge carries ``R_out(R_in(H))``.
* ``text`` (Recursive-TextMAS): every agent decodes text, and the text fills the slots.
* ``single``: the answering agent alone, its prompt without slots, one round.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from recursivemas import realign
from recursivemas.agent import (
    Agent,
    Decoded,
    GenerationConfig,
    GenerationSettings,
    Piece,
    PromptBatch,
    StepConfig,
    TokenCallback,
    per_row,
    row_seeds,
)
from recursivemas.answers import extract_answer
from recursivemas.cache import PromptPrefixes
from recursivemas.errors import ConfigError, InputError
from recursivemas.executor import Message, RoundLoop, Stage
from recursivemas.links import InnerLink, LinkConfig, OuterLink, build_link, init_default, init_identity
from recursivemas.prompts import validate_question
from recursivemas.tools import ToolBox, ToolCall, toolbox
from recursivemas.trace import RunResult, StageTrace

Mode = Literal["latent", "text", "single"]
MODES: tuple[str, ...] = ("latent", "text", "single")
INITS: tuple[str, ...] = ("training-free", "identity", "default")


@dataclass(frozen=True)
class Edge:
    """A message from ``src`` into the ``slot`` of ``dst``'s prompt."""

    src: str
    dst: str
    slot: str

    @property
    def key(self) -> str:
        return f"{self.src}->{self.dst}"


@dataclass
class SystemConfig:
    """The collaboration graph and its defaults.

    Attributes:
        order: agent names in the order they act within a round.
        answerer: the agent that decodes the final answer in the last round.
        edges: latent/text messages between agents.
        rounds: number of recursion rounds r (>= 1).
        latent_steps: latent thoughts m per agent and round (>= 1).
        agent_latent_steps: per-agent overrides of ``latent_steps`` (e.g. a larger expert thinks longer).
        tools: agent -> names of built-in tools (``recursivemas.tools.TOOL_FACTORIES``) it may call
            while it writes text; ``RecursiveMAS.tools`` holds the live tool boxes.
        max_tool_calls: tool calls per decode of one agent.
        tools_in_latent_turns: a tool agent first decodes with its tools before a latent turn, and
            thinks on its prompt followed by that transcript (off by default, as in the release).
        variant: link form, ``"paper"`` or ``"release"``.
        pattern: name of the builder that made the graph (informational).
    """

    order: list[str]
    answerer: str
    edges: list[Edge]
    rounds: int = 3
    latent_steps: int = 32
    variant: str = "paper"
    pattern: str = "custom"
    agent_latent_steps: dict[str, int] = field(default_factory=dict)
    tools: dict[str, list[str]] = field(default_factory=dict)
    max_tool_calls: int = 5
    tools_in_latent_turns: bool = False

    def __post_init__(self) -> None:
        self.edges = [e if isinstance(e, Edge) else Edge(**e) for e in self.edges]
        if len(set(self.order)) != len(self.order) or not self.order:
            raise ConfigError(f"order must list each agent once, got {self.order}")
        if self.answerer not in self.order:
            raise ConfigError(f"answerer {self.answerer!r} is not in order {self.order}")
        check_positive(rounds=self.rounds, latent_steps=self.latent_steps)
        for name, steps in self.agent_latent_steps.items():
            if name not in self.order:
                raise ConfigError(f"agent_latent_steps names agent {name!r}, which is not in {self.order}")
            check_positive(**{f"agent_latent_steps[{name!r}]": steps})
        for name in self.tools:
            if name not in self.order:
                raise ConfigError(f"tools names agent {name!r}, which is not in {self.order}")
        check_positive(max_tool_calls=self.max_tool_calls)
        seen: set[tuple[str, str]] = set()
        for edge in self.edges:
            for end in (edge.src, edge.dst):
                if end not in self.order:
                    raise ConfigError(f"edge {edge.key} names agent {end!r}, which is not in {self.order}")
            if (edge.dst, edge.slot) in seen:
                raise ConfigError(f"two edges fill slot {edge.slot!r} of agent {edge.dst!r}")
            seen.add((edge.dst, edge.slot))
        keys = [e.key for e in self.edges]
        if len(keys) != len(set(keys)):
            raise ConfigError(f"at most one edge per sender and receiver (each has its own link), got {keys}")

    def steps(self, name: str) -> int:
        """Latent thoughts per turn of agent ``name``: its override, else ``latent_steps``."""
        return self.agent_latent_steps.get(name, self.latent_steps)

    def incoming(self, name: str) -> list[Edge]:
        return [e for e in self.edges if e.dst == name]

    def schedule(self, round_: int, rounds: int) -> list[str]:
        """Agents acting in ``round_``: all; in the last round only those that feed the answerer."""
        if round_ < rounds:
            return list(self.order)
        needed = {self.answerer}
        index = {name: i for i, name in enumerate(self.order)}
        for name in reversed(self.order):
            if name in needed:
                needed |= {e.src for e in self.incoming(name) if index[e.src] < index[name]}
        return [n for n in self.order if n in needed]

    def to_dict(self) -> dict:
        return {
            "order": self.order,
            "answerer": self.answerer,
            "edges": [{"src": e.src, "dst": e.dst, "slot": e.slot} for e in self.edges],
            "rounds": self.rounds,
            "latent_steps": self.latent_steps,
            "variant": self.variant,
            "pattern": self.pattern,
            "agent_latent_steps": dict(self.agent_latent_steps),
            "tools": {k: list(v) for k, v in self.tools.items()},
            "max_tool_calls": self.max_tool_calls,
            "tools_in_latent_turns": self.tools_in_latent_turns,
        }


def check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class MASInput:
    """One question with optional per-agent private context."""

    question: str
    context: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, item: str | dict | MASInput, where: str = "input") -> MASInput:
        """Accept a string, ``{"question": ..., "context": {agent: text}}`` or a ``MASInput``."""
        if isinstance(item, MASInput):
            return item
        if isinstance(item, str):
            return cls(validate_question(item, where))
        if not isinstance(item, dict) or "question" not in item:
            raise InputError(f"{where} must be a string or an object with a 'question' field")
        context = item.get("context") or {}
        if not isinstance(context, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in context.items()
        ):
            raise InputError(f"{where}: 'context' must map agent names to strings")
        for name, text in context.items():
            validate_question(text, f"{where} context for {name!r}", allow_empty=True)
        return cls(validate_question(item["question"], f"{where} question"), dict(context))


class RecursiveMAS(nn.Module):
    """Agents + links + graph. Only ``self.links`` holds parameters; the agents stay frozen outside it.

    ``links["inner"][agent]`` is each agent's ``InnerLink``; ``links["outer"]["src->dst"]`` each edge's
    ``OuterLink``.
    """

    def __init__(self, agents: Sequence[Agent], config: SystemConfig) -> None:
        super().__init__()
        self.agents: dict[str, Agent] = {a.name: a for a in agents}
        if len(self.agents) != len(agents):
            raise ConfigError(f"agent names must be unique, got {[a.name for a in agents]}")
        reserved = sorted(set(self.agents) & set(dir(nn.ModuleDict)))
        if reserved:
            raise ConfigError(f"agent names {reserved} clash with torch.nn.Module attributes; rename them")
        if set(self.agents) != set(config.order):
            raise ConfigError(f"order {config.order} must name exactly the agents {sorted(self.agents)}")
        self.config = config
        for edge in config.edges:
            template = self.agents[edge.dst].template
            if template is None:
                raise ConfigError(f"agent {edge.dst!r} has no prompt template")
            template.check_slot(edge.slot, edge.dst)
        inner = {
            name: InnerLink(LinkConfig(name, "inner", a.hidden_size, a.hidden_size, config.variant))
            for name, a in self.agents.items()
        }
        outer = {
            e.key: OuterLink(
                LinkConfig(
                    e.key,
                    "outer",
                    self.agents[e.src].hidden_size,
                    self.agents[e.dst].hidden_size,
                    config.variant,
                )
            )
            for e in config.edges
        }
        self.links = nn.ModuleDict({"inner": nn.ModuleDict(inner), "outer": nn.ModuleDict(outer)})
        for link in [*inner.values(), *outer.values()]:
            link.to(self.link_device(link.config))
        self.tools: dict[str, ToolBox] = {
            name: toolbox(names, max_tool_calls=config.max_tool_calls) for name, names in config.tools.items()
        }

    def models(self) -> dict[str, Any]:
        """Each distinct model once, under the name of the first agent using it (agents may share one)."""
        out: dict[str, Any] = {}
        for name, agent in self.agents.items():
            if all(agent.model is not m for m in out.values()):
                out[name] = agent.model
        return out

    def set_step_config(self, config: StepConfig) -> RecursiveMAS:
        """Run every agent's latent and decode steps as ``config`` says (``StepConfig``: eager over a
        dynamic cache by default; a static KV cache and ``torch.compile`` for GPUs). Returns ``self``."""
        for agent in self.agents.values():
            agent.step_config = config
        return self

    # --- links -----------------------------------------------------------------------------------

    def inner(self, agent: str) -> InnerLink:
        return self.links["inner"][agent]

    def outer(self, edge: Edge) -> OuterLink:
        return self.links["outer"][edge.key]

    def link_device(self, config: LinkConfig) -> torch.device:
        """Links sit with the agent whose states they read: inner with its agent, outer with the sender."""
        name = config.name if config.kind == "inner" else config.name.split("->")[0]
        return self.agents[name].device

    def link_configs(self) -> list[LinkConfig]:
        return [link.config for group in self.links.values() for link in group.values()]

    def set_link(self, link: InnerLink | OuterLink) -> None:
        """Replace the link of the same name (its config may differ, e.g. a residual projection)."""
        group = self.links[link.config.kind]
        if link.name not in group:
            raise ConfigError(
                f"this system has no {link.config.kind} link named {link.name!r}; it has {list(group)}"
            )
        old = group[link.name].config
        if (old.src_dim, old.dst_dim) != (link.config.src_dim, link.config.dst_dim):
            raise ConfigError(
                f"link {link.name!r} maps {link.config.src_dim}->{link.config.dst_dim}, "
                f"but this system needs {old.src_dim}->{old.dst_dim}"
            )
        group[link.name] = link.to(self.link_device(link.config))

    def init_links(self, method: str = "training-free") -> RecursiveMAS:
        """(Re)initialise every link: ``training-free`` (ridge / bridge), ``identity`` or ``default``."""
        if method not in INITS:
            raise ConfigError(f"unknown link init {method!r}; choose one of {', '.join(INITS)}")
        for cfg in self.link_configs():
            fresh = build_link(LinkConfig(cfg.name, cfg.kind, cfg.src_dim, cfg.dst_dim, cfg.variant))
            if method == "default":
                init_default(fresh)
            elif method == "identity":
                init_identity(fresh)
            self.set_link(fresh)
        if method == "training-free":
            fitter = realign.TrainingFreeLinks(self.config.variant)
            for agent in self.agents.values():
                self.set_link(fitter.inner(agent))
            for edge in self.config.edges:
                self.set_link(fitter.outer(edge.key, self.agents[edge.src], self.agents[edge.dst]))
        return self

    # --- checkpoints (implemented in recursivemas.checkpoint, which imports this module) ----------

    def save_pretrained(self, directory: str, command: str | None = None, **kwargs: Any) -> None:
        """Write links, graph and agent records to ``directory`` (see ``recursivemas.checkpoint``)."""
        from recursivemas.checkpoint import save_pretrained

        save_pretrained(self, directory, command, **kwargs)

    @classmethod
    def from_pretrained(
        cls, directory: str, agents: Sequence[Agent] | None = None, **kwargs: Any
    ) -> RecursiveMAS:
        """Load a system saved by ``save_pretrained`` (see ``recursivemas.checkpoint.from_pretrained``)."""
        from recursivemas.checkpoint import from_pretrained

        return from_pretrained(directory, list(agents) if agents is not None else None, **kwargs)

    # --- running ---------------------------------------------------------------------------------

    def run(
        self,
        inputs: Iterable[str | dict | MASInput],
        mode: Mode = "latent",
        generation: GenerationSettings | None = None,
        rounds: int | None = None,
        latent_steps: int | None = None,
        batch_size: int = 8,
        use_cache: bool = True,
        lens_top_k: int = 0,
        seeds: Sequence[int] | None = None,
        on_batch: Callable[[int], None] | None = None,
        on_token: TokenCallback | None = None,
    ) -> list[RunResult]:
        """Answer every input; one ``RunResult`` per input, in order.

        ``latent_steps`` sets every agent's number of thoughts; by default each agent uses
        ``config.steps(name)``. ``generation`` is one ``GenerationConfig`` for every input or a sequence
        of them, one per input (inputs with different settings share batches; each decodes under its own).
        An input's ``max_new_tokens`` bounds each of its decodes (text-mode intermediate stages included).
        Question ``i`` samples with seed ``seeds[i]`` if given, else ``generation.seed + i`` (one config)
        or ``generation[i].seed`` (one per input), so results do not depend on ``batch_size`` or on the
        other inputs. ``use_cache=False`` runs the re-encode reference rollout.
        ``lens_top_k > 0`` records, for every latent stage, the ``k`` nearest vocabulary tokens of each
        latent thought under the sender's and each receiver's embedding table (``StageTrace.lens``).
        ``on_batch(n)`` is called after each batch of ``n`` inputs (progress). ``on_token(i, text)`` is
        called after each token of the answering agent's final decode of input ``i`` with its answer so
        far: what ``RunResult.text`` would be if the decode stopped there (tool calls included).
        """
        if mode not in MODES:
            raise ConfigError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        settings = _Settings(
            mode=mode,
            rounds=self.config.rounds if rounds is None else rounds,
            latent_steps=latent_steps,
            use_cache=use_cache,
            lens_top_k=lens_top_k,
        )
        check_positive(rounds=settings.rounds, batch_size=batch_size)
        if latent_steps is not None:
            check_positive(latent_steps=latent_steps)
        items = [MASInput.parse(x, f"input {i + 1}") for i, x in enumerate(inputs)]
        generation = GenerationConfig() if generation is None else generation
        gens = per_row(generation, len(items), "inputs")
        seeds = row_seeds(generation, len(items), seeds, "inputs")
        for i, item in enumerate(items):
            self.check_context(item, f"input {i + 1}")
        results: list[RunResult] = []
        with torch.inference_mode():
            for start in range(0, len(items), batch_size):
                rows = slice(start, start + batch_size)
                batch, stream = items[rows], None if on_token is None else _shifted(on_token, start)
                results.extend(_BatchRun(self, batch, seeds[rows], gens[rows], settings, stream).run())
                if on_batch is not None:
                    on_batch(len(batch))
        return results

    def check_context(self, item: MASInput, where: str) -> None:
        """Raise an ``InputError`` naming ``where`` if ``item``'s context names an unknown agent or one
        whose template has no ``{context}`` field."""
        unknown = set(item.context) - set(self.agents)
        if unknown:
            raise InputError(
                f"{where}: context names unknown agents {sorted(unknown)}; agents are {list(self.agents)}"
            )
        for name, text in item.context.items():
            template = self.agents[name].template
            if text and template is not None and not template.has_context:
                raise InputError(f"{where}: agent {name!r}'s template has no {{context}} field")


def _shifted(on_token: TokenCallback, offset: int) -> TokenCallback:
    """``on_token`` for a batch whose row 0 is input ``offset``."""
    return lambda row, text: on_token(offset + row, text)


@dataclass(frozen=True)
class _Settings:
    mode: str
    rounds: int
    latent_steps: int | None
    use_cache: bool
    lens_top_k: int


class _BatchRun:
    """One batch through the graph for all rounds (``executor.RoundLoop``); builds traces as it goes.

    Each row has its own seed and decoding settings; ``on_token`` streams the final decode (batch rows).
    """

    def __init__(
        self,
        system: RecursiveMAS,
        items: list[MASInput],
        seeds: list[int],
        generation: list[GenerationConfig],
        settings: _Settings,
        on_token: TokenCallback | None = None,
    ) -> None:
        self.system, self.items, self.seeds, self.settings = system, items, seeds, settings
        self.generation, self.on_token = generation, on_token
        self.traces: list[list[StageTrace]] = [[] for _ in items]
        # each agent's last prompt pass, for its next one in this batch (not in the re-encode reference)
        self.prefixes = PromptPrefixes() if settings.use_cache else None

    def run(self) -> list[RunResult]:
        start = time.perf_counter()
        mode = self.settings.mode
        loop = RoundLoop(
            self.system, self.items, self.settings.rounds, self, text=mode == "text", single=mode == "single"
        )
        final: Decoded = loop.run()
        total = time.perf_counter() - start
        return [
            RunResult.build(
                item.question, self.settings.mode, text, extract_answer(text), trace, total, len(self.items)
            )
            for item, text, trace in zip(self.items, final.texts, self.traces, strict=True)
        ]

    def speak(
        self, stage: Stage, agent: Agent, batch: PromptBatch, rows: list[list[Piece]]
    ) -> tuple[Message, Decoded]:
        start = time.perf_counter()
        decoded = self._decode(stage, agent, batch, self.on_token if stage.final else None)
        self._record(stage, "text", batch, 0, decoded.num_tokens, start, texts=decoded.texts)
        return Message(texts=decoded.texts), decoded

    def think(self, stage: Stage, agent: Agent, batch: PromptBatch, rows: list[list[Piece]]) -> Message:
        start = time.perf_counter()
        decoded = [0] * len(self.items)
        if self.system.config.tools_in_latent_turns and stage.name in self.system.tools:
            prefix = agent.template.response_prefix if agent.template is not None else ""
            tool_phase = self._decode(stage, agent, agent.encode([[*row, prefix] for row in rows]))
            decoded = tool_phase.num_tokens
            batch = agent.encode([[*row, text] for row, text in zip(rows, tool_phase.texts, strict=True)])
        m = self.settings.latent_steps or self.system.config.steps(stage.name)  # run-wide override first
        inner = self.system.inner(stage.name)
        if self.settings.use_cache:
            thoughts = agent.think(batch, m, inner, stage.round, self.prefixes)
        else:
            thoughts = agent.think_reference(batch, m, inner, stage.round)
        lens = self._lens(stage.name, thoughts.embeds) if self.settings.lens_top_k else None
        self._record(stage, "latent", batch, m, decoded, start, lens)
        return Message(latent=thoughts.embeds)

    def _decode(
        self, stage: Stage, agent: Agent, batch: PromptBatch, on_token: TokenCallback | None = None
    ) -> Decoded:
        """Decode ``batch``, each row under its own settings; an agent with tools runs its calls inside the
        decode (recorded as ``tool`` stages). Texts start with the template's ``response_prefix``, which
        ends the prompt; ``on_token`` gets each row's text so far in that same form."""
        seeds = [stage_seed(s, stage.name, stage.round) for s in self.seeds]
        prefix = agent.template.response_prefix if agent.template is not None else ""
        tools = self.system.tools.get(stage.name)
        if tools is None:
            if on_token is not None and prefix:
                on_token = _prefixed(on_token, prefix)
            decoded = agent.decode(batch, self.generation, seeds, on_token, self.prefixes)
            if prefix:
                decoded.texts = [_after(prefix, t) for t in decoded.texts]
            return decoded
        decoded, calls = agent.decode_with_tools(
            batch, self.generation, tools, seeds, prefix, on_token, self.prefixes
        )
        for trace, row_calls in zip(self.traces, calls, strict=True):
            trace.extend(_tool_stage(stage, call) for call in row_calls)
        return decoded

    def _lens(self, name: str, embeds: torch.Tensor) -> list[dict[str, list[list[str]]]]:
        """Per row: nearest tokens of each latent thought in the sender's space and in each receiver's."""
        k = self.settings.lens_top_k
        views = {name: (self.system.agents[name], embeds)}  # (B, m, d_src)
        for edge in self.system.config.edges:
            if edge.src == name:
                views[edge.dst] = (
                    self.system.agents[edge.dst],
                    self.system.outer(edge)(embeds),
                )  # (B, m, d_dst)
        return [
            {who: agent.nearest_tokens(vectors[i], k) for who, (agent, vectors) in views.items()}
            for i in range(embeds.shape[0])
        ]

    def _record(
        self,
        stage: Stage,
        kind: str,
        batch: PromptBatch,
        latent_steps: int,
        decoded: list[int],
        start: float,
        lens: list | None = None,
        texts: list[str] | None = None,
    ) -> None:
        seconds = time.perf_counter() - start
        for i, trace in enumerate(self.traces):
            trace.append(
                StageTrace(
                    agent=stage.name,
                    round=stage.round,
                    kind=kind,
                    latent_steps=latent_steps,
                    decoded_tokens=decoded[i],
                    prompt_tokens=batch.text_tokens[i],
                    latent_inputs=batch.latent_inputs[i],
                    seconds=seconds,
                    final=stage.final,
                    lens=None if lens is None else lens[i],
                    text=None if texts is None else texts[i],
                )
            )


def _after(prefix: str, text: str) -> str:
    """``text`` decoded after ``prefix`` (decoding strips the space a first token may start with)."""
    return (prefix + ("" if not text or prefix[-1:].isspace() else " ") + text).strip()


def _prefixed(on_token: TokenCallback, prefix: str) -> TokenCallback:
    """``on_token`` for texts decoded after ``prefix``: it gets them as ``_after(prefix, text)``."""
    return lambda row, text: on_token(row, _after(prefix, text))


def _tool_stage(stage: Stage, call: ToolCall) -> StageTrace:
    return StageTrace(
        agent=stage.name,
        round=stage.round,
        kind="tool",
        latent_steps=0,
        decoded_tokens=0,
        prompt_tokens=0,
        latent_inputs=0,
        seconds=call.seconds,
        final=False,
        tool_call=call,
    )


def stage_seed(seed: int, agent: str, round_: int) -> int:
    """A question's sampling seed for one stage, so agents and rounds do not replay one random stream."""
    digest = hashlib.blake2b(f"{seed}:{agent}:{round_}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
