"""Prompt templates with named slots, and their rendering into text segments (SPEC §4).

A template's ``user`` text may hold:

* ``{question}`` — the question text;
* ``{context}`` — the agent's private context (text only this agent sees);
* ``{slot:NAME}`` — where another agent's message goes (latent vectors or text, by mode);
* ``[[ ... ]]`` — an optional block, kept only when every slot and ``{context}`` inside it has a
  value (so round 1 drops the feedback block, and an agent without private context drops its
  context block);
* ``[[round=1: ...]]``, ``[[round>1: ...]]`` (also ``>=``, ``<``, ``<=``) — a block kept only in the
  rounds the condition names (and, as above, only if its slots have values): text that differs
  between the first and later rounds, as the release's planner prompt does.

Rendering applies the tokenizer's chat template when it has one. When it has none, the documented
plain fallback is used::

    <bos>{system}

    {user}

    Response:

(``<bos>`` only when the tokenizer defines a BOS token). The rendered text is split at the slots, so
each message is spliced exactly where its slot was, adding no tokens of its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from recursivemas.errors import ConfigError, InputError

_SLOT_RE = re.compile(r"\{slot:([A-Za-z_][A-Za-z0-9_]*)\}")
_BLOCK_RE = re.compile(r"\[\[(.*?)\]\]", re.S)
_FIELD_RE = re.compile(r"\{(question|context)\}")
_ROUND_RE = re.compile(r"^round\s*(=|>=|<=|>|<)\s*(\d+)\s*:\s?")
_COMPARE = {
    "=": lambda a, b: a == b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
}
_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")
PLAIN_RESPONSE_CUE = "Response:"


@dataclass(frozen=True)
class SlotRef:
    """A slot position inside a rendered prompt."""

    name: str


Segment = str | SlotRef


@dataclass(frozen=True)
class PromptTemplate:
    """A role prompt: system text and a user text with ``{question}``, ``{context}``, slots, blocks.

    ``response_prefix`` starts the agent's reply when it writes text (not when it thinks): e.g. an
    opening ``<python>`` tag, so that a small tool-caller begins with a tool call.
    """

    system: str
    user: str
    response_prefix: str = ""

    def __post_init__(self) -> None:
        if "{question}" not in self.user:
            raise ConfigError("a prompt template's user text must contain {question}")
        names = _SLOT_RE.findall(self.user)
        if len(names) != len(set(names)):
            raise ConfigError(f"a prompt template uses a slot twice: {names}")

    @property
    def slots(self) -> tuple[str, ...]:
        """Slot names in order of appearance."""
        return tuple(_SLOT_RE.findall(self.user))

    @property
    def has_context(self) -> bool:
        return "{context}" in self.user

    def check_slot(self, slot: str, agent: str) -> None:
        """Raise a ``ConfigError`` naming the valid slots if ``slot`` is not in this template."""
        if slot not in self.slots:
            valid = ", ".join(self.slots) or "(none)"
            raise ConfigError(f"unknown slot {slot!r} for agent {agent!r}; its template has slots: {valid}")

    def render_user(
        self, question: str, context: str | None, present: set[str], round_: int = 1
    ) -> list[Segment]:
        """User text as segments: strings and ``SlotRef`` for every present slot.

        Optional blocks whose slots are not all in ``present`` (or that use ``{context}`` when
        ``context`` is empty, or whose round condition ``round_`` fails) are removed first; then
        ``{question}``/``{context}`` are substituted in one pass, so text inside the question is never
        re-interpreted.
        """

        def keep_block(match: re.Match[str]) -> str:
            body = match.group(1)
            condition = _ROUND_RE.match(body)
            if condition is not None:
                if not _COMPARE[condition.group(1)](round_, int(condition.group(2))):
                    return ""
                body = body[condition.end() :]
            slots_ok = all(name in present for name in _SLOT_RE.findall(body))
            context_ok = "{context}" not in body or bool(context)
            return body if slots_ok and context_ok else ""

        text = _BLOCK_RE.sub(keep_block, self.user)
        values = {"question": question, "context": context or ""}
        segments: list[Segment] = []
        pos = 0
        for match in _SLOT_RE.finditer(text):
            segments.append(_FIELD_RE.sub(lambda m: values[m.group(1)], text[pos : match.start()]))
            name = match.group(1)
            if name not in present:
                raise ConfigError(f"slot {name!r} is outside an optional [[...]] block but has no value")
            segments.append(SlotRef(name))
            pos = match.end()
        segments.append(_FIELD_RE.sub(lambda m: values[m.group(1)], text[pos:]))
        return [s for s in segments if s != ""]


def validate_question(question: Any, where: str = "question", allow_empty: bool = False) -> str:
    """Return ``question`` if it is a non-blank string (blank allowed with ``allow_empty``), else raise
    an ``InputError`` saying why."""
    if not isinstance(question, str):
        raise InputError(f"{where} must be a string, got {type(question).__name__}")
    if not allow_empty and not question.strip():
        raise InputError(f"{where} is empty or only whitespace: give a question with some text")
    if "\ue000" in question or "\ue001" in question:
        raise InputError(f"{where} contains the reserved characters U+E000/U+E001: remove them")
    return question


def render_prompt(
    tokenizer: Any,
    template: PromptTemplate,
    question: str,
    context: str | None,
    present: set[str],
    chat_template_kwargs: dict | None = None,
    round_: int = 1,
) -> list[Segment]:
    """Full prompt (chat template or plain fallback) as text segments and ``SlotRef`` markers."""
    user_parts = template.render_user(question, context, present, round_)
    slot_names = [p.name for p in user_parts if isinstance(p, SlotRef)]
    user_text = "".join(
        p if isinstance(p, str) else f"\ue000{slot_names.index(p.name)}\ue001" for p in user_parts
    )
    if getattr(tokenizer, "chat_template", None):
        rendered = _apply_chat_template(tokenizer, template.system, user_text, chat_template_kwargs or {})
    else:
        bos = tokenizer.bos_token or ""
        rendered = f"{bos}{template.system}\n\n{user_text}\n\n{PLAIN_RESPONSE_CUE}"
    segments: list[Segment] = []
    pos = 0
    for match in _SENTINEL_RE.finditer(rendered):
        segments.append(rendered[pos : match.start()])
        segments.append(SlotRef(slot_names[int(match.group(1))]))
        pos = match.end()
    segments.append(rendered[pos:])
    if len(segments) != 2 * len(slot_names) + 1:
        raise ConfigError("the tokenizer's chat template dropped or duplicated a slot marker")
    return [s for s in segments if s != ""]


RELEASE_TEMPLATE_DEFAULTS: dict[str, Any] = {"enable_thinking": False}
"""Chat-template variables the official release always sets; passed to templates that use them, unless
the agent's ``chat_template_kwargs`` says otherwise (e.g. ``{"enable_thinking": True}``)."""


def _apply_chat_template(tokenizer: Any, system: str, user: str, kwargs: dict) -> str:
    source = str(tokenizer.chat_template)
    kwargs = {**{k: v for k, v in RELEASE_TEMPLATE_DEFAULTS.items() if k in source}, **kwargs}
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    except TemplateError:
        # Some chat templates (e.g. Gemma's) reject a system turn: fold it into the user turn.
        merged = [{"role": "user", "content": f"{system}\n\n{user}"}]
        return tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True, **kwargs)


# --- role templates of the built-in patterns -------------------------------------------------------


def _context_block(instruction: str = "") -> str:
    """The optional private-notes block (dropped without context), with an instruction line inside it."""
    return (
        "[[Private notes (only you can see them):\n{context}\n"
        + (instruction and instruction + "\n")
        + "\n]]"
    )


_CONTEXT_BLOCK = _context_block()

PLANNER = PromptTemplate(
    system="You are the Planner in a team of agents. Think about the problem and lay out a short plan.",
    user=(
        _context_block("Start your plan by restating the facts from these notes that your team needs.")
        + "Question: {question}\n"
        "[[\nYour team's answer from the previous round: {slot:feedback}\n]]"
        "\nWrite a concise step-by-step plan to solve the question."
    ),
)
CRITIC = PromptTemplate(
    system="You are the Critic in a team of agents. Check the plan for mistakes and improve it.",
    user=(
        _CONTEXT_BLOCK + "Question: {question}\n"
        "[[\nThe Planner's plan: {slot:planner}\n]]"
        "\nPoint out any errors in the plan and give an improved plan."
    ),
    response_prefix="Facts:",
)
SOLVER = PromptTemplate(
    system="You are the Solver in a team of agents. Solve the problem using your team's plan.",
    user=(
        _CONTEXT_BLOCK + "Question: {question}\n"
        "[[\nThe Critic's refined plan: {slot:critic}\n]]"
        "\nSolve the question step by step and put the final answer in \\boxed{}."
    ),
)

ROLE_TEMPLATES: dict[str, PromptTemplate] = {"planner": PLANNER, "critic": CRITIC, "solver": SOLVER}

PAIR_SOLVER = PromptTemplate(
    system="You are the Solver in a team of agents. Solve the problem using your team's plan.",
    user=(
        _CONTEXT_BLOCK + "Question: {question}\n"
        "[[\nThe Planner's plan: {slot:planner}\n]]"
        "\nSolve the question step by step and put the final answer in \\boxed{}."
    ),
)
"""The solver of the two-agent ``pair`` pattern: the planner's message arrives in slot ``planner``."""

EXPERT = PromptTemplate(
    system="You are the Expert in a team of agents. A learner will solve the problem with your guidance.",
    user=(
        _context_block("Start your plan by restating the facts from these notes that the learner needs.")
        + "Question: {question}\n"
        "[[\nThe learner's answer from the previous round: {slot:feedback}\n]]"
        "\nGive the learner a concise, execution-ready plan, not the answer."
    ),
)
LEARNER = PromptTemplate(
    system="You are the Learner in a team of agents. Solve the problem using the expert's plan.",
    user=(
        _CONTEXT_BLOCK + "Question: {question}\n"
        "[[\nThe Expert's plan: {slot:expert}\n]]"
        "\nSolve the question step by step and put the final answer in \\boxed{}."
    ),
)
"""The two roles of the ``distillation`` pattern: the expert's message arrives in the learner's ``expert``
slot, the learner's previous-round message in the expert's ``feedback`` slot."""

ROLE_TEMPLATES.update({"expert": EXPERT, "learner": LEARNER})


def specialist_template(domain: str) -> PromptTemplate:
    """A ``mixture`` specialist of ``domain`` (e.g. ``"math"``); the summarizer's previous-round message
    arrives in its ``summary`` slot."""
    return PromptTemplate(
        system=f"You are the {domain} specialist in a team of agents. Look at the question as an expert "
        f"in {domain} would.",
        user=(
            _context_block("Start your notes by restating the facts from these notes that your team needs.")
            + "Question: {question}\n"
            "[[\nThe team's answer from the previous round: {slot:summary}\n]]"
            f"\nWrite short notes on how {domain} helps to answer the question."
        ),
    )


def summarizer_template(domains: list[str]) -> PromptTemplate:
    """The ``mixture`` summarizer: specialist ``d``'s message arrives in slot ``d``."""
    notes = "".join(f"[[\nThe {d} specialist's notes: {{slot:{d}}}\n]]" for d in domains)
    return PromptTemplate(
        system="You are the Summarizer in a team of agents. Combine the specialists' notes into one answer.",
        user=(
            _CONTEXT_BLOCK + "Question: {question}\n" + notes + "\nSolve the question step by step and put "
            "the final answer in \\boxed{}."
        ),
    )


REFLECTOR = PromptTemplate(
    system="You are the Reflector in a team of agents. Think about the question and what your teammate "
    "found, and say what to check or compute.",
    user=(
        _context_block("Start by restating the facts from these notes that your team needs.")
        + "Question: {question}\n"
        "[[\nThe Tool-caller's findings: {slot:toolcaller}\n]]"
        "\nSay how to solve the question and what to compute or look up."
    ),
)
TOOLCALLER = PromptTemplate(
    system="You are the Tool-caller in a team of agents. To run Python, write <python>code</python> and "
    "print() what you need. To search documents, write <search>keywords</search>. Each result comes "
    "back inside <result></result>.",
    user=(
        _CONTEXT_BLOCK + "Question: {question}\n"
        "[[\nThe Reflector's advice: {slot:reflector}\n]]"
        "\nUse a tool if it helps, then put the final answer in \\boxed{}."
    ),
)
"""The two roles of the ``deliberation`` pattern: the reflector's message arrives in the tool-caller's
``reflector`` slot, the tool-caller's in the reflector's ``toolcaller`` slot."""

ROLE_TEMPLATES.update({"reflector": REFLECTOR, "toolcaller": TOOLCALLER})
