"""Pair style: Planner -> Solver, with the Solver feeding back to the Planner (one hop per round).

The smallest latent system: per round the planner thinks (from round 2 on, its ``feedback`` slot holds
the solver's previous-round message) and the solver reads the planner's message in its ``planner``
slot; in rounds < r the solver thinks latently and its message goes back to the planner, in round r it
writes the answer. It isolates one latent hop, which makes it the reference for the relay diagnostic.
"""

from __future__ import annotations

import dataclasses

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
    agents = [with_role_template(planner, "planner"), solver]
    p, s = (a.name for a in agents)
    config = SystemConfig(
        order=[p, s],
        answerer=s,
        edges=[Edge(p, s, "planner"), Edge(s, p, "feedback")],
        rounds=rounds,
        latent_steps=latent_steps,
        variant=variant,
        pattern="pair",
    )
    return RecursiveMAS(agents, config).init_links(init)
