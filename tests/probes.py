"""Probe a system's first-round chain of latent hops with different facts in the first agent's notes."""

from __future__ import annotations

import torch

from recursivemas.agent import position_ids
from recursivemas.system import RecursiveMAS


@torch.no_grad()
def relay_probe(
    system: RecursiveMAS, question: str, notes: list[str], steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One round of ``system`` for ``question`` with each of ``notes`` as the first agent's context.

    Every agent before the answerer thinks ``steps`` latent steps and sends ``R_out(R_in(H))`` along its
    edges; the answerer reads its prompt with those messages in its slots. Returns the first agent's
    latent thoughts ``R_in(H)`` (F, m, d) and the answerer's next-token logits (F, V), one row per note.
    """
    cfg = system.config
    first = cfg.order[0]
    messages: dict[str, torch.Tensor] = {}
    for name in cfg.schedule(1, 1):
        agent = system.agents[name]
        values = {
            e.slot: list(system.outer(e)(messages[e.src]).to(agent.dtype))
            for e in cfg.incoming(name)
            if e.src in messages
        }
        rows = [
            agent.fill(
                agent.render(question, note if name == first else None, set(values)),
                {slot: v[i] for slot, v in values.items()},
            )
            for i, note in enumerate(notes)
        ]
        batch = agent.encode(rows)
        if name == cfg.answerer:
            out = agent.model(
                inputs_embeds=batch.embeds,
                attention_mask=batch.mask,
                position_ids=position_ids(batch.mask),
                logits_to_keep=1,
            )
            return messages[first], out.logits[:, -1].float()
        messages[name] = agent.think(batch, steps, system.inner(name)).embeds
    raise AssertionError("the answerer did not act in round 1")
