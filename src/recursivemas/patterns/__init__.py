"""Collaboration patterns: builders that turn agents into a ``RecursiveMAS`` with a particular graph,
and the registry that everything else (presets, training configs, eval) reads them from.

A ``Pattern`` names its roles in acting order; ``build_pattern(name, {role: agent})`` checks the roles
and builds the system. A pattern with ``open_roles`` (mixture) takes any number of roles before its
fixed last one (the specialists before the summarizer). A new pattern is a builder plus one
``register`` call::

    register(Pattern("review", "writer -> reviewer", ("writer", "reviewer"),
                     lambda agents, **kw: review(*agents, **kw)))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from recursivemas.agent import Agent
from recursivemas.errors import ConfigError
from recursivemas.patterns.deliberation import deliberation
from recursivemas.patterns.distillation import distillation
from recursivemas.patterns.mixture import DEFAULT_DOMAINS, mixture
from recursivemas.patterns.pair import pair
from recursivemas.patterns.sequential import sequential
from recursivemas.system import RecursiveMAS


@dataclass(frozen=True)
class Pattern:
    """A collaboration graph by name.

    Attributes:
        name: registry key (``SystemConfig.pattern`` of the systems it builds).
        description: one line for listings.
        roles: role names in acting order (for ``open_roles``, the defaults: any names may replace all
            but the last).
        build: ``build(agents_in_role_order, rounds=, latent_steps=, variant=, init=)``.
        open_roles: the roles before the last are free in number and name.
    """

    name: str
    description: str
    roles: tuple[str, ...]
    build: Callable[..., RecursiveMAS]
    open_roles: bool = False

    def order(self, roles: Sequence[str]) -> list[str]:
        """``roles`` in acting order, or a ``ConfigError`` that says which roles this pattern takes."""
        if self.open_roles:
            last = self.roles[-1]
            rest = [r for r in roles if r != last]
            if last not in roles or not rest:
                raise ConfigError(
                    f"pattern {self.name!r} needs a {last!r} and at least one other role (e.g. "
                    f"{', '.join(self.roles[:-1])}), got {list(roles)}"
                )
            return [*rest, last]
        if sorted(roles) != sorted(self.roles):
            raise ConfigError(
                f"pattern {self.name!r} takes exactly the roles {', '.join(self.roles)}, got {list(roles)}"
            )
        return list(self.roles)

    @property
    def sender(self) -> str:
        """The role that acts first (the relay task's default sender)."""
        return self.roles[0]


PATTERNS: dict[str, Pattern] = {}


def register(pattern: Pattern) -> Pattern:
    """Add ``pattern`` to the registry (replacing one of the same name) and return it."""
    PATTERNS[pattern.name] = pattern
    return pattern


def get_pattern(name: str) -> Pattern:
    if name not in PATTERNS:
        raise ConfigError(f"unknown pattern {name!r}; choose one of {', '.join(PATTERNS)}")
    return PATTERNS[name]


def build_pattern(name: str, agents: Mapping[str, Agent], **kwargs: Any) -> RecursiveMAS:
    """The ``name`` system over ``agents`` (role -> agent, the agent named after its role)."""
    pattern = get_pattern(name)
    return pattern.build([agents[r] for r in pattern.order(list(agents))], **kwargs)


register(
    Pattern(
        "sequential",
        "planner -> critic -> solver; the solver feeds back to the planner",
        ("planner", "critic", "solver"),
        lambda agents, **kw: sequential(*agents, **kw),
    )
)
register(
    Pattern(
        "pair",
        "planner -> solver; the solver feeds back to the planner (one latent hop per round)",
        ("planner", "solver"),
        lambda agents, **kw: pair(*agents, **kw),
    )
)
register(
    Pattern(
        "mixture",
        "domain specialists think in parallel -> summarizer, which feeds back to every specialist",
        (*DEFAULT_DOMAINS, "summarizer"),
        lambda agents, **kw: mixture(agents[:-1], agents[-1], **kw),
        open_roles=True,
    )
)
register(
    Pattern(
        "distillation",
        "expert (larger model) -> learner, which answers and feeds back to the expert",
        ("expert", "learner"),
        lambda agents, **kw: distillation(*agents, **kw),
    )
)
register(
    Pattern(
        "deliberation",
        "reflector <-> tool-caller; the tool-caller answers, running python/search calls as it writes",
        ("reflector", "toolcaller"),
        lambda agents, **kw: deliberation(*agents, **kw),
    )
)

__all__ = [
    "PATTERNS",
    "Pattern",
    "build_pattern",
    "deliberation",
    "distillation",
    "get_pattern",
    "mixture",
    "pair",
    "register",
    "sequential",
]
