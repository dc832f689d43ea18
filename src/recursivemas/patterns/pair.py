"""Pair style: Planner -> Solver, with the Solver feeding back to the Planner (one hop per round).

The smallest latent system: per round the planner thinks (from round 2 on, its ``feedback`` slot holds
the solver's previous-round message) and the solver reads the planner's message in its ``planner``
slot; in rounds < r the solver thinks latently and its message goes back to the planner, in round r it
writes the answer. It isolates one latent hop, which makes it the reference for the relay diagnostic.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from recursivemas.agent import Agent
from recursivemas.patterns.sequential import with_role_template
from recursivemas.prompts import PAIR_SOLVER
from recursivemas.system import Edge, RecursiveMAS, SystemConfig


def pair(
    planner: Agent,
    solver: Agent,
    rounds: int = 3,
    latent_steps: int = 32,
    variant: str = "paper",
    init: str = "training-free",
) -> RecursiveMAS:
    """Build the Planner -> Solver system; links initialised by ``init`` (see ``init_links``)."""
    if solver.template is None:
        solver = dataclasses.replace(solver, template=PAIR_SOLVER, role="solver")
    settings = {"rounds": rounds, "latent_steps": latent_steps, "variant": variant, "pattern": "pair"}
    return two_way(with_role_template(planner, "planner"), solver, ("planner", "feedback"), init, **settings)


def two_way(
    first: Agent, answerer: Agent, slots: tuple[str, str], init: str, **settings: Any
) -> RecursiveMAS:
    """Two agents with messages both ways: ``first -> answerer`` fills the answerer's ``slots[0]``, the
    answerer's previous-round message fills ``first``'s ``slots[1]``; ``settings`` are the other
    ``SystemConfig`` fields (rounds, latent steps, pattern, tools, ...)."""
    a, b = first.name, answerer.name
    edges = [Edge(a, b, slots[0]), Edge(b, a, slots[1])]
    config = SystemConfig(order=[a, b], answerer=b, edges=edges, **settings)
    return RecursiveMAS([first, answerer], config).init_links(init)
