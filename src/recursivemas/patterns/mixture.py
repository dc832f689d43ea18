"""Mixture style: domain specialists think in parallel; a Summarizer reads all of them and answers.

Per round every specialist reads the question (from round 2 on, its ``summary`` slot holds the
summarizer's previous-round message, mapped by its own outer link ``summarizer -> <specialist>``) and
thinks; no specialist reads another, so their turns are independent within a round. The summarizer
reads specialist ``d``'s message in slot ``d`` (link ``d -> summarizer``). In rounds < r the summarizer
thinks latently and its message goes back to every specialist; in round r it writes the answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from recursivemas.agent import Agent
from recursivemas.errors import ConfigError
from recursivemas.prompts import specialist_template, summarizer_template
from recursivemas.system import Edge, RecursiveMAS, SystemConfig

DEFAULT_DOMAINS = ("math", "code", "science")


def mixture(
    specialists: Sequence[Agent],
    summarizer: Agent,
    rounds: int = 3,
    latent_steps: int = 32,
    variant: str = "paper",
    init: str = "training-free",
) -> RecursiveMAS:
    """Build the specialists -> summarizer system. A specialist without a template gets the one of the
    domain its name gives (``math``, ``code``, ``biology`` ...); each name is also the summarizer's slot
    for that specialist. Links initialised by ``init`` (see ``init_links``)."""
    if not specialists:
        raise ConfigError("a mixture needs at least one specialist")
    specialists = [
        a
        if a.template is not None
        else dataclasses.replace(a, template=specialist_template(a.name), role=a.name)
        for a in specialists
    ]
    names = [a.name for a in specialists]
    if summarizer.template is None:
        summarizer = dataclasses.replace(summarizer, template=summarizer_template(names), role="summarizer")
    s = summarizer.name
    config = SystemConfig(
        order=[*names, s],
        answerer=s,
        edges=[Edge(n, s, n) for n in names] + [Edge(s, n, "summary") for n in names],
        rounds=rounds,
        latent_steps=latent_steps,
        variant=variant,
        pattern="mixture",
    )
    return RecursiveMAS([*specialists, summarizer], config).init_links(init)
