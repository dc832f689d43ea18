"""Tools an agent can call while it decodes text: ``python`` (a limited subprocess), ``search`` (an
offline full-text index or an HTTP endpoint), and any Python callable a user registers.

A call is text in the tags the prompt teaches: ``<python>print(6 * 7)</python>`` or
``<search>boiling point of water</search>``; the result goes back as ``<result>...</result>``
(the official release's format). ``ToolBox.find_call`` spots a finished call in decoded text and
``ToolBox.call`` runs it: an unknown tool, an empty call, a timeout or a crash comes back as the
result text (an observation for the model), never as an exception.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from recursivemas.errors import ConfigError
from recursivemas.tools.sandbox import run_python
from recursivemas.tools.search import HttpSearch, SearchIndex, default_corpus

RESULT_OPEN, RESULT_CLOSE = "<result>", "</result>"
_CALL_RE = re.compile(r"<([a-z][a-z0-9_]*)>(.*?)</\1>", re.S)
# An opened call whose body ends with a Markdown fence instead of the closing tag (small models often
# write ``<python>`` then code then a closing fence), with an optional opening fence line.
_FENCED_RE = re.compile(r"<([a-z][a-z0-9_]*)>[ \t]*\n?(?:```[A-Za-z0-9_+-]*\n)?(.*?\S.*?)\n```", re.S)
_NAME_RE = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class Tool:
    """A named function from the call's text to the result's text.

    Attributes:
        name: the tag (``<name>...</name>``); lowercase letters, digits and ``_``.
        description: one line the prompt can show.
        run: ``run(text) -> result``; an exception it raises becomes an error observation.
    """

    name: str
    description: str
    run: Callable[[str], str]

    def __post_init__(self) -> None:
        if not _NAME_RE.fullmatch(self.name) or self.name == "result":
            raise ConfigError(
                f"tool name {self.name!r} must be lowercase letters, digits and _ (and not 'result')"
            )


@dataclass(frozen=True)
class ToolCall:
    """One call as the trace records it: tool name, input, output (truncated), seconds, error if any."""

    tool: str
    input: str
    output: str
    seconds: float
    error: str | None = None


@dataclass
class ToolBox:
    """The tools of one agent and their limits.

    Attributes:
        tools: by name.
        max_tool_calls: calls per decode; later calls get a "limit reached" observation.
        result_chars: results are cut to this many characters (the release uses 6000).
    """

    tools: dict[str, Tool] = field(default_factory=dict)
    max_tool_calls: int = 5
    result_chars: int = 6000

    @classmethod
    def of(cls, tools: Iterable[Tool], **limits: int) -> ToolBox:
        box = cls({}, **limits)
        for tool in tools:
            box.register(tool)
        return box

    def register(self, tool: Tool) -> None:
        """Add ``tool`` (a user's own callable wrapped in ``Tool``); a name may be registered once."""
        if tool.name in self.tools:
            raise ConfigError(f"a tool named {tool.name!r} is already registered")
        self.tools[tool.name] = tool

    @staticmethod
    def find_call(text: str) -> tuple[str, str] | None:
        """The first finished call in ``text`` (text decoded since the last result), as (name, body):
        ``<name>body</name>``, or ``<name>`` followed by a body that a Markdown code fence closes (an
        opening fence line right after the tag is dropped); ``None`` while no call is finished."""
        for pattern in (_CALL_RE, _FENCED_RE):
            match = pattern.search(text)
            if match is not None and match.group(1) != "result":
                return match.group(1), match.group(2)
        return None

    def call(self, name: str, body: str, calls_so_far: int) -> ToolCall:
        """Run one call; every failure becomes the observation in ``output`` and is named in ``error``."""
        start = time.perf_counter()
        error: str | None = None
        if calls_so_far >= self.max_tool_calls:
            error = f"tool call limit ({self.max_tool_calls}) reached; answer without tools"
        elif name not in self.tools:
            error = f"unknown tool {name!r}; available: {', '.join(sorted(self.tools)) or 'none'}"
        elif not body.strip():
            error = f"empty <{name}> call; put the input between <{name}> and </{name}>"
        if error is not None:
            return ToolCall(name, body, error, time.perf_counter() - start, error)
        try:
            output = self.tools[name].run(body.strip("\n"))
        except Exception as err:  # a tool's crash is the model's observation, never ours
            error = f"{type(err).__name__}: {err}"
            output = f"error: {error}"
        return ToolCall(name, body, output[: self.result_chars], time.perf_counter() - start, error)

    @staticmethod
    def result_text(call: ToolCall) -> str:
        """What is appended after the call: ``\\n<result>\\n{output}\\n</result>\\n``."""
        return f"\n{RESULT_OPEN}\n{call.output}\n{RESULT_CLOSE}\n"


def python_tool(timeout_s: float = 10.0, memory_mb: int = 512, max_processes: int = 64) -> Tool:
    """Run the code in ``recursivemas.tools.sandbox`` (separate process, time/memory/output/process
    limits, no sockets, throw-away directory) with ``math`` imported; result: stdout, then stderr's
    last lines if it failed."""

    def run(code: str) -> str:
        out = run_python("import math\n" + code, timeout_s, memory_mb, max_processes=max_processes)
        if out.passed:
            return out.stdout.strip() or "(no output; print what you need)"
        tail = "\n".join(out.stderr.strip().splitlines()[-3:]) or out.detail
        return (out.stdout.strip() + "\n" + f"error: {tail}").strip()

    return Tool("python", "run Python code; print() what you need", run)


def search_tool(backend: SearchIndex | HttpSearch | None = None, k: int = 4) -> Tool:
    """Search ``backend`` (default: the shipped offline corpus); result: the top ``k`` snippets."""
    engine = backend if backend is not None else SearchIndex.from_folder(default_corpus())

    def run(query: str) -> str:
        hits = engine.search(query, k)
        if not hits:
            return "no results"
        return "\n".join(f"[{i}] {h.title}: {h.text}" for i, h in enumerate(hits, 1))

    return Tool("search", "search documents; give a few keywords", run)


TOOL_FACTORIES: dict[str, Callable[[], Tool]] = {"python": python_tool, "search": search_tool}
"""Built-in tools by name: what a saved system's ``SystemConfig.tools`` is rebuilt from."""


def toolbox(names: Iterable[str], **limits: int) -> ToolBox:
    """A tool box of the built-in tools ``names`` (see ``TOOL_FACTORIES``) with the given limits."""
    names = list(names)
    unknown = sorted(set(names) - set(TOOL_FACTORIES))
    if unknown:
        raise ConfigError(
            f"no built-in tool named {unknown}; built-in tools are {', '.join(TOOL_FACTORIES)} "
            "(register your own with ToolBox.register)"
        )
    return ToolBox.of([TOOL_FACTORIES[n]() for n in names], **limits)


__all__ = [
    "TOOL_FACTORIES",
    "HttpSearch",
    "SearchIndex",
    "Tool",
    "ToolBox",
    "ToolCall",
    "python_tool",
    "search_tool",
    "toolbox",
]
