"""Training objectives (SPEC §6): the inner cosine loss and the two outer answer cross-entropy losses.

* ``InnerObjective`` — per agent, teacher-forced on text: for every target position ``t``
  ``loss = mean_t [1 - cos(R_in(h_t), E(x_{t+1}))]`` with ``h_t`` the frozen last-layer hidden state and
  ``E`` the agent's input embedding. Optionally the frozen hidden states are computed once per row
  (``precompute``) and the link trains on them; both paths compute the same loss.
* ``UnrolledObjective`` (paper) — real latent rollouts through the graph for ``r`` rounds with
  gradients; ``loss = CE(answerer(prompt with latent slots) -> answer)`` in the last round, plus
  ``intermediate_weight x`` the same CE in earlier rounds where the answerer also acts.
* ``TeacherForcedObjective`` (release) — the latent sources are the hidden states of reference texts
  (``teacher_fields``: plan, refined plan, answer; first ``teacher_positions`` tokens) read after each
  agent's prompt, instead of latent rollouts; the loss is the same answer CE.

Every objective returns a ``LossOutput``; the outer ones also record, per round ``k``, the norm of
``dL/dM_k`` where ``M_k`` are the latent messages produced in round ``k`` (gradient stability, SPEC §6).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from recursivemas.agent import Agent, GenerationConfig, Piece, PromptBatch, position_ids
from recursivemas.errors import ConfigError, InputError
from recursivemas.executor import Message, RoundLoop, Stage, render_rows
from recursivemas.realign import vocabulary_by_text
from recursivemas.system import RecursiveMAS
from recursivemas.train.config import TrainConfig
from recursivemas.train.data import TrainRow

IGNORE = -100


@dataclass
class LossOutput:
    """A scalar loss to backpropagate and what to log.

    Attributes:
        loss: scalar tensor: the mean over the batch's target positions (outer objectives), or the sum
            over agents of each agent's mean (inner objective).
        count: number of target positions (tokens; summed over agents for the inner objective).
        metrics: extra floats (per-agent losses, ...).
        round_grads: filled during ``backward()``: round -> squared norm of dL/dM_round.
    """

    loss: torch.Tensor
    count: int
    metrics: dict[str, float] = field(default_factory=dict)
    round_grads: dict[int, float] = field(default_factory=lambda: defaultdict(float))

    def round_grad_norms(self) -> dict[int, float]:
        return {k: math.sqrt(v) for k, v in sorted(self.round_grads.items())}


# --- helpers shared by the objectives ---------------------------------------------------------------


def target_ids(agent: Agent, texts: Sequence[str], max_tokens: int, eos: bool = True) -> list[list[int]]:
    """Token ids of each target text (no special tokens), truncated to ``max_tokens``, + EOS if it fits."""
    out = []
    for ids in agent.tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids = list(ids)[:max_tokens]
        if eos and agent.eos_ids and len(ids) < max_tokens:
            ids.append(agent.eos_ids[0])
        if not ids:
            raise InputError(f"agent {agent.name!r}: a target text tokenises to nothing: {texts!r}")
        out.append(ids)
    return out


@dataclass
class Continued:
    """A left-padded prompt batch followed by right-padded target tokens.

    Attributes:
        embeds: (B, T + L, d) prompt then target embeddings (zero at padding).
        mask: (B, T + L) 1 at real positions.
        labels: (B, L) target ids, ``IGNORE`` at padding.
        prompt_width: T.
    """

    embeds: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    prompt_width: int

    @property
    def target_mask(self) -> torch.Tensor:
        return self.labels != IGNORE  # (B, L)


def continue_with(agent: Agent, batch: PromptBatch, ids: list[list[int]]) -> Continued:
    """Append target tokens ``ids[i]`` after row ``i`` of a left-padded prompt batch."""
    bsz, width = batch.embeds.shape[0], max(len(x) for x in ids)
    labels = torch.full((bsz, width), IGNORE, dtype=torch.long, device=agent.device)
    for i, row in enumerate(ids):
        labels[i, : len(row)] = torch.tensor(row, device=agent.device)
    target_mask = labels != IGNORE
    tokens = agent.embed(labels.clamp_min(0)) * target_mask[..., None].to(agent.dtype)  # (B, L, d)
    embeds = torch.cat([batch.embeds.to(agent.dtype), tokens], dim=1)  # (B, T + L, d)
    mask = torch.cat([batch.mask, target_mask.long()], dim=1)  # (B, T + L)
    return Continued(embeds, mask, labels, batch.embeds.shape[1])


def answer_logits(agent: Agent, seq: Continued) -> torch.Tensor:
    """(B, L, V) float32 logits that predict each target token: position ``T - 1 + j`` predicts target
    ``j``; the model computes logits for the last ``L + 1`` positions only (``logits_to_keep``), so the
    vocabulary projection costs ``O(B·L·V)``."""
    width = seq.labels.shape[1]
    out = agent.model(
        inputs_embeds=seq.embeds,
        attention_mask=seq.mask,
        position_ids=position_ids(seq.mask),
        logits_to_keep=width + 1,
        use_cache=False,
    )
    return out.logits[:, :width].float()


def answer_ce(agent: Agent, seq: Continued) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of the target tokens given the prompt, and their count."""
    logits = answer_logits(agent, seq)  # (B, L, V)
    loss = F.cross_entropy(logits.flatten(0, 1), seq.labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, int(seq.target_mask.sum())


def last_hidden(agent: Agent, seq: Continued) -> torch.Tensor:
    """(B, T + L, d) last-layer hidden states of a prompt + target sequence (one pass, no cache)."""
    return agent.backbone(
        inputs_embeds=seq.embeds,
        attention_mask=seq.mask,
        position_ids=position_ids(seq.mask),
        use_cache=False,
    ).last_hidden_state


def maybe_checkpoint(enabled: bool, fn: Callable, *args: torch.Tensor):
    """Run ``fn(*args)``, recomputing its activations in backward when ``enabled`` and grads are on."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


# --- inner loop --------------------------------------------------------------------------------------


@dataclass
class InnerExample:
    """Frozen hidden states ``h_t`` (n, d) and targets ``E(x_{t+1})`` (n, d) of one row, float32."""

    hidden: torch.Tensor
    targets: torch.Tensor


class InnerObjective:
    """``1 - cos(R_in(h_t), E(x_{t+1}))`` averaged over target positions, summed over agents.

    The target text ``x`` after each agent's prompt is the row's answer (``inner_targets="answer"``) or
    the agent's own text (``"own-text"``): a greedy one-round run of the system in text mode gives every
    agent's text, and each agent is read on its prompt with its upstream agents' texts in its slots.
    With own text, step ``k`` of a latent rollout learns to produce the embedding of the token the
    agent would have written at step ``k``, so its thoughts keep what its text would say (e.g. a fact
    from its private notes) instead of collapsing to a fixed answer format.

    ``positions="answer"``: ``t`` ranges over the positions whose next token belongs to the target text
    (the last prompt position up to the second-to-last target token); ``"all"``: every position whose
    next position is a real token (prompt and target). Agents are independent: each loss only reaches
    its own inner link.
    """

    def __init__(self, system: RecursiveMAS, config: TrainConfig) -> None:
        self.system = system
        self.positions = config.objective.positions
        self.answer_format = config.data.answer_format
        self.own_text = config.objective.inner_targets == "own-text"
        self.max_target_tokens = (
            config.objective.own_text_tokens if self.own_text else config.data.max_answer_tokens
        )
        self.precompute = config.objective.precompute
        self.on_policy = config.objective.on_policy
        self.latent_slots = config.objective.latent_slots
        self._latent_round: tuple[tuple[TrainRow, ...], RoundLoop] | None = None
        self._cache: dict[tuple[str, int], InnerExample] = {}
        self._transcript: tuple[tuple[TrainRow, ...], dict[str, list[str]]] | None = None

    def own_texts(self, rows: Sequence[TrainRow]) -> dict[str, list[str]]:
        """agent -> what it writes for each row in one greedy round of the text-mode system (the last
        batch of rows is remembered, so the agents of one batch share a single run)."""
        key = tuple(rows)
        if self._transcript is None or self._transcript[0] != key:
            results = self.system.run(
                [{"question": r.question, "context": r.context} for r in rows],
                mode="text",
                rounds=1,
                generation=GenerationConfig(max_new_tokens=self.max_target_tokens),
                batch_size=len(rows),
            )
            spoken = [{s.agent: s.text or "" for s in res.trace if s.kind == "text"} for res in results]
            texts = {name: [row[name] for row in spoken] for name in spoken[0]}
            self._transcript = (key, texts)
        return self._transcript[1]

    def targets(self, agent: Agent, rows: Sequence[TrainRow]) -> tuple[dict[str, list[Piece]], list[str]]:
        """(slot values of ``agent``'s prompt, target text) per row."""
        if not self.own_text:
            return {}, [r.target_text(self.answer_format) for r in rows]
        texts = self.own_texts(rows)
        if self.latent_slots:
            return self.latent_slot_values(agent, rows), texts[agent.name]
        order = self.system.config.order
        upstream = [
            e
            for e in self.system.config.incoming(agent.name)
            if order.index(e.src) < order.index(agent.name) and e.src in texts
        ]
        return {e.slot: list(texts[e.src]) for e in upstream}, texts[agent.name]

    def latent_slot_values(self, agent: Agent, rows: Sequence[TrainRow]) -> dict[str, list[Piece]]:
        """``agent``'s slot values in one latent round of the system with its current links (no
        gradient; the round of the last batch of rows is remembered)."""
        key = tuple(rows)
        if self._latent_round is None or self._latent_round[0] != key:
            loop = RoundLoop(self.system, rows, 1, _Rollouts(self.system))
            with torch.no_grad():
                loop.run()
            self._latent_round = (key, loop)
        with torch.no_grad():
            return self._latent_round[1].slot_values(agent.name)

    def examples(self, agent: Agent, rows: Sequence[TrainRow]) -> list[InnerExample]:
        """Each row's (hidden states, targets) at its target positions, from one forward of ``agent``."""
        values, texts = self.targets(agent, rows)
        batch = agent.encode(render_rows(agent, rows, values))
        ids = target_ids(agent, texts, self.max_target_tokens)
        seq = continue_with(agent, batch, ids)
        hidden = last_hidden(agent, seq)  # (B, S, d)
        valid = self._valid(seq)  # (B, S - 1): position t predicts position t + 1
        targets = seq.embeds[:, 1:]
        examples = [
            InnerExample(hidden[i, :-1][valid[i]].float(), targets[i][valid[i]].detach().float())
            for i in range(len(rows))
        ]
        return self._with_rollout_states(agent, batch, ids, examples) if self.on_policy else examples

    def _with_rollout_states(
        self, agent: Agent, batch: PromptBatch, ids: list[list[int]], examples: list[InnerExample]
    ) -> list[InnerExample]:
        """Add the states of the agent's own latent rollout (current inner link, no gradient): step
        ``k``'s hidden state ``h_k`` is paired with the embedding of target token ``k``, so the link
        also learns from the states its own thoughts lead to (one DAgger iteration)."""
        with torch.no_grad():
            rollout = agent.think(batch, max(len(x) for x in ids), self.system.inner(agent.name)).hidden
        out = []
        for i, (example, row) in enumerate(zip(examples, ids, strict=True)):
            n = len(row)
            states = rollout[i, :n].float()  # (n, d)
            wanted = agent.embed(torch.tensor(row, device=agent.device)).detach().float()  # (n, d)
            out.append(
                InnerExample(torch.cat([example.hidden, states]), torch.cat([example.targets, wanted]))
            )
        return out

    def _valid(self, seq: Continued) -> torch.Tensor:
        mask = seq.mask.bool()
        nxt = mask[:, 1:] & mask[:, :-1]  # (B, S - 1)
        if self.positions == "all":
            return nxt
        answer_next = torch.zeros_like(mask)
        answer_next[:, seq.prompt_width :] = seq.target_mask
        return nxt & answer_next[:, 1:]

    def warm(self, rows: Sequence[TrainRow], keys: Sequence[int]) -> None:
        """Compute and cache the examples of ``rows`` (under ``keys``) for every agent, as one batch."""
        for agent in self.system.agents.values():
            self._cached(agent, rows, keys)

    def _cached(self, agent: Agent, rows: Sequence[TrainRow], keys: Sequence[int]) -> list[InnerExample]:
        missing = [i for i, k in enumerate(keys) if (agent.name, k) not in self._cache]
        if missing:
            with torch.no_grad():
                fresh = self.examples(agent, [rows[i] for i in missing])
            for i, ex in zip(missing, fresh, strict=True):
                self._cache[(agent.name, keys[i])] = ex
        return [self._cache[(agent.name, k)] for k in keys]

    def loss(self, rows: Sequence[TrainRow], keys: Sequence[int] | None = None) -> LossOutput:
        """``keys`` (stable row ids) enable the precomputed path; without them hidden states are fresh."""
        total, metrics, count = None, {}, 0
        for name, agent in self.system.agents.items():
            if self.precompute and keys is not None:
                examples = self._cached(agent, rows, keys)
            else:
                examples = self.examples(agent, rows)
            hidden = torch.cat([e.hidden for e in examples])  # (n, d)
            targets = torch.cat([e.targets for e in examples])  # (n, d)
            predicted = self.system.inner(name)(hidden.to(self.system.inner(name).proj1.weight.device))
            cos = F.cosine_similarity(predicted, targets.to(predicted.device), dim=-1)  # (n,)
            agent_loss = (1 - cos).mean()
            metrics[f"loss/{name}"] = float(agent_loss.detach())
            total = agent_loss if total is None else total + agent_loss.to(total.device)
            count += hidden.shape[0]
        return LossOutput(total, count, metrics)


# --- outer loop --------------------------------------------------------------------------------------


class OuterObjective:
    """Shared machinery of the unrolled and teacher-forced objectives: slot values and the answer CE."""

    def __init__(self, system: RecursiveMAS, config: TrainConfig) -> None:
        self.system = system
        self.rounds = config.system.rounds
        self.answer_format = config.data.answer_format
        self.max_answer_tokens = config.data.max_answer_tokens
        self.intermediate_weight = config.objective.intermediate_weight
        self.checkpointing = config.objective.gradient_checkpointing

    def answer_loss(self, rows: Sequence[TrainRow], batch: PromptBatch) -> tuple[torch.Tensor, int]:
        agent = self.system.agents[self.system.config.answerer]
        texts = [r.target_text(self.answer_format) for r in rows]
        ids = target_ids(agent, texts, self.max_answer_tokens)

        def ce(embeds: torch.Tensor) -> torch.Tensor:
            seq = continue_with(agent, PromptBatch(embeds, batch.mask, [], []), ids)
            return answer_ce(agent, seq)[0]

        count = sum(len(x) for x in ids)
        return maybe_checkpoint(self.checkpointing, ce, batch.embeds), count

    @staticmethod
    def _leaf(message: torch.Tensor) -> torch.Tensor:
        """A message that depends on nothing trainable (e.g. round 1's first sender with frozen links)
        becomes a leaf requiring grad, so its gradient norm is still recorded."""
        if torch.is_grad_enabled() and not message.requires_grad:
            return message.detach().requires_grad_()
        return message

    @staticmethod
    def track(out: LossOutput, round_: int, tensors: Sequence[torch.Tensor]) -> None:
        """Accumulate ||dL/dM||² of this round's messages into ``out.round_grads`` during backward."""
        for t in tensors:
            if t.requires_grad:
                t.register_hook(
                    lambda g, r=round_: out.round_grads.__setitem__(
                        r, out.round_grads[r] + float(g.float().pow(2).sum())
                    )
                )

    def source(
        self, stage: Stage, agent: Agent, rows: Sequence[TrainRow], batch: PromptBatch
    ) -> list[torch.Tensor]:
        """The latent message ``agent`` sends at ``stage``: one (m_i, d) tensor per row."""
        raise NotImplementedError

    def loss(self, rows: Sequence[TrainRow], keys: Sequence[int] | None = None) -> LossOutput:
        """One pass of the round loop (``executor.RoundLoop``) with latent turns from ``source`` and the
        answer CE as the final turn."""
        turns = _LossTurns(self, rows)
        final_loss, count = RoundLoop(self.system, rows, self.rounds, turns).run()
        loss = final_loss
        metrics = {"answer_ce": float(final_loss.detach())}
        if turns.extra:
            loss = loss + self.intermediate_weight * sum(e.to(loss.device) for e in turns.extra)
            metrics["intermediate_ce"] = float(sum(float(e.detach()) for e in turns.extra) / len(turns.extra))
        out = LossOutput(loss, count, metrics)
        for round_, tensors in turns.pending:
            self.track(out, round_, tensors)
        return out


class _Rollouts:
    """Turns that only think (KV-cached rollouts with the system's links); the final turn says nothing."""

    def __init__(self, system: RecursiveMAS) -> None:
        self.system = system

    def think(self, stage: Stage, agent: Agent, batch: PromptBatch, rows: list[list[Piece]]) -> Message:
        steps = self.system.config.steps(stage.name)
        return Message(latent=agent.think(batch, steps, self.system.inner(stage.name), stage.round).embeds)

    def speak(
        self, stage: Stage, agent: Agent, batch: PromptBatch, rows: list[list[Piece]]
    ) -> tuple[Message, None]:
        return Message(), None


class _LossTurns:
    """The turns of one training batch: latent turns are the objective's ``source`` (with gradients);
    the answerer's intermediate-round CE is added when asked; the final turn is the answer CE."""

    def __init__(self, objective: OuterObjective, rows: Sequence[TrainRow]) -> None:
        self.objective, self.rows = objective, rows
        self.pending: list[tuple[int, list[torch.Tensor]]] = []
        self.extra: list[torch.Tensor] = []

    def think(self, stage: Stage, agent: Agent, batch: PromptBatch, rows: list[list[Piece]]) -> Message:
        obj = self.objective
        if stage.name == obj.system.config.answerer and obj.intermediate_weight > 0:
            ce, n = obj.answer_loss(self.rows, batch)
            self.extra.append(ce / n)
        tensors = [obj._leaf(t) for t in obj.source(stage, agent, self.rows, batch)]
        self.pending.append((stage.round, tensors))
        return Message(latent=tensors)

    def speak(
        self, stage: Stage, agent: Agent, batch: PromptBatch, rows: list[list[Piece]]
    ) -> tuple[Message, tuple[torch.Tensor, int]]:
        ce, n = self.objective.answer_loss(self.rows, batch)
        return Message(), (ce / n, n)


class UnrolledObjective(OuterObjective):
    """Paper-faithful: each non-final stage is a real KV-cached latent rollout of ``m`` steps."""

    def source(
        self, stage: Stage, agent: Agent, rows: Sequence[TrainRow], batch: PromptBatch
    ) -> list[torch.Tensor]:
        inner, steps = self.system.inner(stage.name), self.system.config.steps(stage.name)

        def rollout(embeds: torch.Tensor) -> torch.Tensor:
            thoughts = agent.think(PromptBatch(embeds, batch.mask, [], []), steps, inner, stage.round)
            return thoughts.embeds  # (B, m, d) = R_in(H)

        embeds = maybe_checkpoint(self.checkpointing, rollout, batch.embeds)
        return list(embeds.unbind(0))


class DistillObjective(UnrolledObjective):
    """Distillation: the unrolled answer CE, mixed with a KL term that pulls the answerer's (learner's)
    answer distribution toward the teacher's (the first agent, the expert), token by token:

        loss = (1 - w) CE + w · mean_j KL( p_teacher(· | x, y_<j) || p_learner(· | x, latents, y_<j) )

    The teacher reads the question under the answerer's own prompt (no slots) with its own tokenizer
    and is teacher-forced on the same answer text. Across tokenizers the KL is taken at answer positions
    where both tokenizations have consumed the same text, over the tokens both vocabularies share
    (each distribution renormalised over them); with one tokenizer that is every position and token.
    ``w = objective.distill_weight``.
    """

    def __init__(self, system: RecursiveMAS, config: TrainConfig) -> None:
        super().__init__(system, config)
        cfg = system.config
        self.weight = config.objective.distill_weight
        self.learner = system.agents[cfg.answerer]
        teacher = system.agents[cfg.order[0]]
        if teacher.name == cfg.answerer:
            raise ConfigError("the distill objective needs a teacher agent acting before the answerer")
        self.teacher = dataclasses.replace(teacher, template=self.learner.template)
        pairs = _token_pairs(self.learner.tokenizer, self.teacher.tokenizer)
        if not pairs:
            raise ConfigError(
                f"agents {teacher.name!r} and {cfg.answerer!r} share no token text; "
                "use objective.outer: unrolled"
            )
        self.shared_learner = torch.tensor([a for a, _ in pairs], device=self.learner.device)
        self.shared_teacher = torch.tensor([b for _, b in pairs], device=self.teacher.device)

    def answer_loss(self, rows: Sequence[TrainRow], batch: PromptBatch) -> tuple[torch.Tensor, int]:
        texts = [r.target_text(self.answer_format) for r in rows]
        ids = target_ids(self.learner, texts, self.max_answer_tokens)
        count = sum(len(x) for x in ids)
        where, p = self._teacher(rows, texts, ids)  # (n,) rows, (n,) positions; (n, S) teacher probs

        def mixed(embeds: torch.Tensor) -> torch.Tensor:
            seq = continue_with(self.learner, PromptBatch(embeds, batch.mask, [], []), ids)
            logits = answer_logits(self.learner, seq)  # (B, L, V_l)
            ce = F.cross_entropy(
                logits.flatten(0, 1), seq.labels.flatten(), ignore_index=IGNORE, reduction="sum"
            )
            if p.shape[0] == 0 or self.weight == 0:
                return ce
            log_q = logits[where[0], where[1]][:, self.shared_learner].log_softmax(-1)  # (n, S)
            kl = (p * (p.clamp_min(1e-12).log() - log_q)).sum()  # summed over the n positions
            return (1 - self.weight) * ce + self.weight * kl * (count / p.shape[0])

        return maybe_checkpoint(self.checkpointing, mixed, batch.embeds), count

    def _teacher(
        self, rows: Sequence[TrainRow], texts: list[str], ids: list[list[int]]
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Aligned answer positions (row index, learner position) and the teacher's distribution over
        the shared tokens there, (n, S), renormalised."""
        with torch.no_grad():
            teacher_ids = target_ids(self.teacher, texts, self.max_answer_tokens * 4)
            prompts = self.teacher.encode(render_rows(self.teacher, rows, {}))
            logits = answer_logits(self.teacher, continue_with(self.teacher, prompts, teacher_ids))
        pairs = [
            (i, j, k)
            for i, text in enumerate(texts)
            for j, k in _aligned_positions(self.learner, self.teacher, text, ids[i], teacher_ids[i])
        ]
        device = self.learner.device
        rows_i = torch.tensor([i for i, _, _ in pairs], dtype=torch.long, device=device)
        pos_j = torch.tensor([j for _, j, _ in pairs], dtype=torch.long, device=device)
        if not pairs:
            return (rows_i, pos_j), torch.zeros(0, len(self.shared_teacher), device=device)
        picked = logits[[i for i, _, _ in pairs], [k for _, _, k in pairs]]  # (n, V_t)
        return (rows_i, pos_j), picked[:, self.shared_teacher].softmax(-1).to(device)


def _aligned_positions(
    learner: Agent, teacher: Agent, text: str, learner_ids: list[int], teacher_ids: list[int]
) -> list[tuple[int, int]]:
    """(j, k) pairs: learner target position ``j`` and teacher position ``k`` that predict the token
    after the same prefix of ``text`` (same number of characters consumed)."""

    def starts(agent: Agent, ids: list[int]) -> list[int]:
        pieces = [agent.tokenizer.decode(ids[:n], skip_special_tokens=True) for n in range(len(ids))]
        return [len(p) for p in pieces]

    teacher_at = {c: k for k, c in enumerate(starts(teacher, teacher_ids))}
    return [(j, teacher_at[c]) for j, c in enumerate(starts(learner, learner_ids)) if c in teacher_at]


class TeacherForcedObjective(OuterObjective):
    """Release: agent ``a`` reads its prompt then the reference text ``row[teacher_fields[a]]``; the
    last-layer hidden states of the first ``teacher_positions`` reference tokens stand in for its latent
    thoughts ``H``, and ``R_in(H)`` is its message.

    One round: every agent that feeds the answerer speaks once, then the answerer's answer CE. More
    rounds would feed the answerer's own reference text (the gold answer) back into the graph and let
    the loss fall by copying it, so feedback edges are trained by the unrolled objective only.
    """

    def __init__(self, system: RecursiveMAS, config: TrainConfig) -> None:
        super().__init__(system, config)
        self.rounds = 1
        self.intermediate_weight = 0.0
        self.fields = config.objective.teacher_fields
        self.positions = config.objective.teacher_positions
        senders = set(system.config.schedule(1, 1)) - {system.config.answerer}
        missing = sorted(senders - set(self.fields))
        if missing:
            raise InputError(
                f"objective.teacher_fields has no reference text for agents {missing}; map each "
                f"agent that speaks before the answerer to a row field (plan or refined_plan)"
            )

    def source(
        self, stage: Stage, agent: Agent, rows: Sequence[TrainRow], batch: PromptBatch
    ) -> list[torch.Tensor]:
        inner = self.system.inner(stage.name)
        field_name = self.fields[stage.name]
        texts = [
            r.target_text(self.answer_format) if field_name == "answer" else r.field(field_name) for r in rows
        ]
        ids = target_ids(agent, texts, self.positions, eos=False)
        lengths = [len(x) for x in ids]

        def read(embeds: torch.Tensor) -> torch.Tensor:
            seq = continue_with(agent, PromptBatch(embeds, batch.mask, [], []), ids)
            hidden = last_hidden(agent, seq)[:, seq.prompt_width :]  # (B, L, d) at the reference tokens
            return inner(hidden)  # (B, L, d) float32

        embeds = maybe_checkpoint(self.checkpointing, read, batch.embeds)
        return [embeds[i, :n] for i, n in enumerate(lengths)]


class AlignObjective:
    """Token alignment of outer links across tokenizers (the ``align`` outer objective).

    A sender's latent message ``R_in(H)`` lives in its input-embedding space; a faithful message is
    close to the embeddings of the tokens its text would hold. This objective teaches each outer link
    ``src -> dst`` to carry such a vector to the receiver's embedding of the same text: for sender
    tokens ``t`` whose decoded text (leading space kept) the receiver's tokenizer encodes as one token
    ``t'`` (so byte-fallback and unused entries that merely decode alike are never targets), with
    ``x_t`` the sender's embedding of ``t`` rescaled to its inner link's output norm and ``Y`` the
    receiver's embeddings of all such ``t'``,

        loss = mean_t CE( cos(R_out(x_t), Y) / tau,  t' ),    tau = ``ALIGN_TEMPERATURE``

    (a contrastive read-out: the mapped vector's nearest receiver token must be ``t'``). Each step uses
    the tokens of its rows' texts (question, context, answer) plus as many shared tokens drawn from a
    generator seeded by the row ids, so steps are deterministic. No language model runs: it costs a
    few matrix products per step, and it is what the training-free least-squares bridge approximates.
    """

    def __init__(self, system: RecursiveMAS, config: TrainConfig) -> None:
        self.system = system
        self.answer_format = config.data.answer_format
        chosen = config.optim.links
        inner = sorted(set(chosen or ()) - {e.key for e in system.config.edges})
        if inner:
            raise ConfigError(
                f"objective.outer: align fits outer links token by token and never runs an inner link; "
                f"remove {inner} from optim.links (train them with outer: unrolled)"
            )
        self.edges = [e for e in system.config.edges if chosen is None or e.key in chosen]
        self._tables: dict[str, tuple[torch.Tensor, torch.Tensor, dict[int, int]]] = {}

    def tables(self, src: Agent, dst: Agent) -> tuple[torch.Tensor, torch.Tensor, dict[int, int]]:
        """Over the shared tokens: sender rows ``x`` (n, d_i) rescaled, receiver rows ``Y`` (n, d_j), and
        sender token id -> row."""
        key = f"{id(src.model)}->{id(dst.model)}"
        if key not in self._tables:
            pairs = _token_pairs(src.tokenizer, dst.tokenizer)
            if not pairs:
                raise ConfigError(
                    f"agents {src.name!r} and {dst.name!r} share no token text, so the align objective "
                    "cannot fit their link; use objective.outer: unrolled for it"
                )
            src_ids = torch.tensor([a for a, _ in pairs])
            dst_ids = torch.tensor([b for _, b in pairs])
            with torch.no_grad():
                x = src.embed(src_ids).float()  # (n, d_i)
                norm = self.system.inner(src.name).config.rescale_norm or float(x.norm(dim=-1).mean())
                x = x * (norm / x.norm(dim=-1, keepdim=True).clamp_min(1e-6))
                y = dst.embed(dst_ids).float()  # (n, d_j)
            self._tables[key] = (x, y, {int(i): r for r, i in enumerate(src_ids.tolist())})
        return self._tables[key]

    def loss(self, rows: Sequence[TrainRow], keys: Sequence[int] | None = None) -> LossOutput:
        total, metrics, count = None, {}, 0
        seed = sum(keys) if keys is not None else 0
        texts = [" ".join([r.question, *r.context.values(), r.target_text(self.answer_format)]) for r in rows]
        for edge in self.edges:
            src, dst = self.system.agents[edge.src], self.system.agents[edge.dst]
            x, y, row_of = self.tables(src, dst)
            seen = {
                row_of[i]
                for ids in src.tokenizer(texts, add_special_tokens=False)["input_ids"]
                for i in ids
                if i in row_of
            }
            generator = torch.Generator().manual_seed(seed)
            drawn = torch.randint(0, x.shape[0], (max(len(seen), 1),), generator=generator).tolist()
            picked = torch.tensor(sorted(seen) + drawn)  # (k,)
            link = self.system.outer(edge)
            lone = x[picked].to(link.proj1.weight.device).unsqueeze(1)  # (k, 1, d_i): each token alone
            mapped = link(lone).squeeze(1)  # (k, d_j)
            logits = F.normalize(mapped, dim=-1) @ F.normalize(y.to(mapped.device), dim=-1).T  # (k, n)
            edge_loss = F.cross_entropy(logits / ALIGN_TEMPERATURE, picked.to(logits.device))
            metrics[f"loss/{edge.key}"] = float(edge_loss.detach())
            metrics[f"top1/{edge.key}"] = float(
                (logits.argmax(-1) == picked.to(logits.device)).float().mean()
            )
            total = edge_loss if total is None else total + edge_loss.to(total.device)
            count += len(picked)
        if total is None:
            raise InputError("the align objective found no outer link to train; check optim.links")
        return LossOutput(total, count, metrics)


ALIGN_TEMPERATURE = 0.05


def _token_pairs(src_tokenizer: Any, dst_tokenizer: Any) -> list[tuple[int, int]]:
    """(sender id, receiver id) for every sender token whose decoded text (whitespace kept) the receiver
    encodes as exactly one token (whitespace tokens included); special and partial-byte sender tokens
    are skipped, and of several sender tokens with the same text the lowest id is kept."""
    first = vocabulary_by_text(src_tokenizer, strip=False)
    encoded = dst_tokenizer(list(first), add_special_tokens=False)["input_ids"]
    return [(i, ids[0]) for i, ids in zip(first.values(), encoded, strict=True) if len(ids) == 1]


@torch.no_grad()
def loss_totals(
    objective: InnerObjective | OuterObjective,
    rows: Sequence[TrainRow],
    batch_size: int,
    keys: Sequence[int] | None = None,
) -> tuple[float, int]:
    """(sum of loss x count, count) over ``rows`` in batches: the token-weighted mean is their ratio."""
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        out = objective.loss(rows[i : i + batch_size], None if keys is None else keys[i : i + batch_size])
        total += float(out.loss) * out.count
        count += out.count
    return total, count


def build_objective(
    system: RecursiveMAS, config: TrainConfig
) -> InnerObjective | OuterObjective | AlignObjective:
    if config.stage == "inner":
        return InnerObjective(system, config)
    if config.objective.outer == "teacher-forced":
        return TeacherForcedObjective(system, config)
    if config.objective.outer == "align":
        return AlignObjective(system, config)
    if config.objective.outer == "distill":
        return DistillObjective(system, config)
    return UnrolledObjective(system, config)
