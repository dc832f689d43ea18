"""Deliberation style: a Reflector and a Tool-caller exchange latent messages both ways; the Tool-caller
answers, running tools while it writes.

Per round the reflector thinks (from round 2 on, its ``toolcaller`` slot holds the tool-caller's
previous-round message) and the tool-caller reads it in its ``reflector`` slot. In rounds < r the
tool-caller thinks latently (no tools run in latent turns unless ``tools_in_latent_turns``); in round r
it writes the answer, and a tool call in its text (``<python>...</python>``, ``<search>...</search>``)
runs, its ``<result>`` is fed into the same KV cache, and decoding resumes (``Agent.decode_with_tools``).
In text mode every tool-caller turn runs its tools.
"""

from __future__ import annotations

from collections.abc import Sequence

from recursivemas.agent import Agent
from recursivemas.patterns.pair import two_way
from recursivemas.patterns.sequential import with_role_template
from recursivemas.system import RecursiveMAS

DEFAULT_TOOLS = ("python", "search")


def deliberation(
    reflector: Agent,
    toolcaller: Agent,
    rounds: int = 3,
    latent_steps: int = 32,
    variant: str = "paper",
    init: str = "training-free",
    tools: Sequence[str] = DEFAULT_TOOLS,
    max_tool_calls: int = 5,
    tools_in_latent_turns: bool = False,
) -> RecursiveMAS:
    """Build the Reflector <-> Tool-caller system with the built-in ``tools`` for the tool-caller (add
    your own afterwards with ``system.tools[<tool-caller>].register(Tool(...))``)."""
    reflector, toolcaller = (
        with_role_template(reflector, "reflector"),
        with_role_template(toolcaller, "toolcaller"),
    )
    return two_way(
        reflector,
        toolcaller,
        ("reflector", "toolcaller"),
        init,
        rounds=rounds,
        latent_steps=latent_steps,
        variant=variant,
        pattern="deliberation",
        tools={toolcaller.name: list(tools)},
        max_tool_calls=max_tool_calls,
        tools_in_latent_turns=tools_in_latent_turns,
    )
