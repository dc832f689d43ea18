"""Distillation style: Expert -> Learner, with the Learner feeding back to the Expert.

Per round the expert (usually the larger model) thinks (from round 2 on, its ``feedback`` slot holds the
learner's previous-round message); the learner reads the expert's message in its ``expert`` slot. In
rounds < r the learner thinks latently and its message goes back to the expert; in round r it writes
the answer. Training can pull the learner's answer toward the expert's (``objective.outer: distill``).
"""

from __future__ import annotations

from recursivemas.agent import Agent
from recursivemas.patterns.pair import two_way
from recursivemas.patterns.sequential import with_role_template
from recursivemas.system import RecursiveMAS


def distillation(
    expert: Agent,
    learner: Agent,
    rounds: int = 3,
    latent_steps: int = 32,
    variant: str = "paper",
    init: str = "training-free",
) -> RecursiveMAS:
    """Build the Expert -> Learner system; links initialised by ``init`` (see ``init_links``)."""
    settings = {"rounds": rounds, "latent_steps": latent_steps, "variant": variant, "pattern": "distillation"}
    return two_way(
        with_role_template(expert, "expert"),
        with_role_template(learner, "learner"),
        ("expert", "feedback"),
        init,
        **settings,
    )
