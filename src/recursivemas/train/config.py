"""Training configuration: one YAML file, validated by pydantic (unknown keys are errors).

A config has six sections; every field has a default except where noted::

    stage: inner | outer          # which links learn (SPEC §6)
    trainable: links | full       # links only, or also every agent's full weights (Full-SFT baseline)
    system:    which agents and links to start from
    data:      where the {question, answer[, plan, refined_plan]} rows come from
    objective: loss options of the chosen stage
    optim:     AdamW, cosine schedule with warm-up, clipping, steps (paper defaults)
    run:       output directory, seed, checkpointing, logging, validation

The command-line flags of ``recursivemas train`` (``--stage``, ``--trainable``, ``--max-steps``,
``--output``) override the matching fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from recursivemas.errors import ConfigError
from recursivemas.patterns import get_pattern


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_format(value: str) -> None:
    """An answer format must name ``{answer}`` and nothing else (literal braces doubled)."""
    try:
        filled = value.format(answer="\ue000")
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(
            f"{value!r} is not a format with only {{answer}} ({err}); double literal braces"
        ) from None
    if "\ue000" not in filled:
        raise ValueError(f"{value!r} does not contain {{answer}}")


class SystemSection(_Section):
    """The system to train: a preset, or a ``pattern`` (see ``recursivemas.patterns``) over model specs
    given per role in ``agents``.

    ``links`` starts from a saved link checkpoint (e.g. the inner stage's output for the outer stage);
    otherwise links start from ``init``. ``link_windows`` then widens outer links to read a causal
    window of the sender's thoughts (``recursivemas.links.widen``; the new weights start at zero).
    """

    preset: str | None = "tiny-random"
    pattern: str = "sequential"
    agents: dict[str, str] | None = Field(
        default=None, description="role of the pattern -> model spec (registry name, HF id or path)"
    )
    init: Literal["training-free", "identity", "default"] = "training-free"
    links: str | None = None
    link_windows: dict[str, int] = Field(
        default_factory=dict,
        description="outer link name -> window, e.g. {'critic->solver': 4}: that link also reads the "
        "window - 1 thoughts before each one",
    )
    rounds: int = Field(default=3, ge=1)
    latent_steps: int = Field(default=16, ge=1)
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: str = "auto"

    @model_validator(mode="after")
    def _one_source(self) -> SystemSection:
        if self.agents is not None:
            try:
                get_pattern(self.pattern).order(list(self.agents))
            except ConfigError as err:
                raise ValueError(f"system.agents: {err}") from None
            self.preset = None
        elif self.preset is None:
            raise ValueError("give system.preset or system.agents")
        return self


class SourceSpec(_Section):
    """One data source. ``kind``:

    * ``file``: a ``.jsonl`` or ``.parquet`` file at ``path``;
    * ``hub``: a HuggingFace dataset id at ``path`` (needs ``datasets`` and a reachable hub), with
      ``split`` and optional ``subset``; ``fields`` renames columns to question/answer/plan/refined_plan;
    * ``reasoning-gym``: ``n`` procedural rows of task ``name`` (never ``gsm_symbolic``);
    * ``relay``: ``n`` relay rows of ``level`` 1-3 (the evaluation's information-carrying task); with
      ``names: disjoint`` level-2 names come from a training pool that shares no name with the
      evaluation's, so the evaluation's names stay unseen (``shared``: the evaluation's 26 names).
    """

    kind: Literal["file", "hub", "reasoning-gym", "relay"]
    path: str | None = None
    name: str | None = None
    subset: str | None = None
    split: str = "train"
    fields: dict[str, str] = Field(default_factory=dict)
    n: int = Field(default=0, ge=0)
    level: int = Field(default=1, ge=1, le=3)
    names: Literal["shared", "disjoint"] = "shared"
    sender: str | None = Field(
        default=None, description="relay: the agent told the fact (default: the system's first agent)"
    )
    weight: int = Field(default=1, ge=1, description="repeat this source's rows this many times")
    answer_format: str | None = Field(
        default=None,
        description="this source's target text for the answering agent (default: data.answer_format), "
        "e.g. '{answer}' for rows whose answer is already a whole worked reply",
    )

    @field_validator("answer_format")
    @classmethod
    def _has_answer(cls, value: str | None) -> str | None:
        if value is not None:
            _check_format(value)
        return value

    @model_validator(mode="after")
    def _needs(self) -> SourceSpec:
        if self.kind in ("file", "hub") and not self.path:
            raise ValueError(f"a {self.kind!r} source needs 'path'")
        if self.kind == "reasoning-gym" and not self.name:
            raise ValueError(
                "a 'reasoning-gym' source needs 'name' (a reasoning-gym task, e.g. basic_arithmetic)"
            )
        if self.kind in ("reasoning-gym", "relay") and self.n < 1:
            raise ValueError(f"a {self.kind!r} source needs 'n' >= 1 rows")
        return self


class HoldoutSpec(_Section):
    """An evaluation set kept out of training: the test questions that ``recursivemas eval --task TASK
    --limit LIMIT --data-seed DATA_SEED`` asks (generated tasks with a small question space, such as
    one-digit sums, would otherwise repeat them in training rows)."""

    task: str = Field(description="an eval task spec, e.g. reasoning-gym:chain_sum:max_terms=2")
    limit: int = Field(ge=1)
    data_seed: int = 0


class DataSection(_Section):
    """Training rows and a held-out validation split.

    ``validation`` rows are taken from the same sources with a different seed (generated sources) or
    split off the end of the shuffled rows (files); questions seen in validation are removed from
    training, so the splits are disjoint.
    """

    sources: list[SourceSpec] = Field(default_factory=lambda: [SourceSpec(kind="relay", n=64)])
    validation: int = Field(default=16, ge=0, description="held-out rows")
    seed: int = 0
    answer_format: str = Field(
        default="\\boxed{{{answer}}}",
        description="the answering agent's target text; {answer} is the row's answer",
    )
    max_answer_tokens: int = Field(default=64, ge=1)
    holdout: list[HoldoutSpec] = Field(
        default_factory=list, description="evaluation sets whose questions are removed from training rows"
    )

    @field_validator("answer_format")
    @classmethod
    def _has_answer(cls, value: str) -> str:
        _check_format(value)
        return value


class ObjectiveSection(_Section):
    """Loss options.

    Inner stage: ``inner_targets`` = ``answer`` (each agent is teacher-forced on the row's answer text)
    or ``own-text`` (each agent is teacher-forced on what it itself writes in the text-mode system: one
    greedy round, its upstream agents' texts in its slots, at most ``own_text_tokens`` tokens), so that
    its latent thoughts learn to follow its own text instead of a fixed answer format; ``positions`` =
    ``answer`` (the target text only) or ``all`` (prompt and target); ``on_policy`` adds the states of
    each agent's own latent rollout (with the links the run starts from) paired with the same targets
    step by step, so the link learns from where its own thoughts lead (chain runs to iterate);
    ``latent_slots`` fills each agent's slots with its upstream agents' latent messages (one latent
    round with the links the run starts from) instead of their texts, so an agent that receives thoughts
    learns its link on the states it sees at inference (train the senders' links first);
    ``precompute`` caches the frozen backbone's hidden states once and trains on them.
    Outer stage: ``outer`` = ``unrolled`` (paper: real latent rollouts, answer CE of the last round) or
    ``teacher-forced`` (release: reference texts' hidden states as latent sources); with
    ``intermediate_weight > 0`` the answer CE of earlier rounds is added with that weight. The
    teacher-forced objective runs one round (see ``TeacherForcedObjective``). ``align`` fits the outer
    links token by token across tokenizers, without running the models (see ``AlignObjective``): the
    first outer step for agents with different tokenizers. ``distill`` (distillation pattern) is the
    unrolled objective plus ``distill_weight`` x the KL divergence from the teacher's (first agent's)
    answer distribution to the answerer's, on the answer tokens (see ``DistillObjective``).
    """

    inner_targets: Literal["answer", "own-text"] = "answer"
    own_text_tokens: int = Field(default=24, ge=1)
    positions: Literal["answer", "all"] = "answer"
    on_policy: bool = False
    latent_slots: bool = False
    precompute: bool = True
    outer: Literal["unrolled", "teacher-forced", "align", "distill"] = "unrolled"
    distill_weight: float = Field(default=0.5, ge=0.0, le=1.0)
    intermediate_weight: float = Field(default=0.0, ge=0.0)
    teacher_fields: dict[str, str] = Field(
        default_factory=lambda: {"planner": "plan", "critic": "refined_plan"},
        description="agent -> row field whose text stands in for that agent's latent thoughts",
    )
    teacher_positions: int = Field(default=80, ge=1)
    gradient_checkpointing: bool = True


class OptimSection(_Section):
    """AdamW + cosine schedule with linear warm-up; defaults are the paper's (SPEC §6)."""

    lr: float = Field(default=5e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=10, ge=0)
    max_steps: int = Field(default=100, ge=1)
    batch_size: int = Field(default=2, ge=1, description="rows per process per step")
    grad_accum: int = Field(default=1, ge=1)
    links: list[str] | None = Field(
        default=None,
        description="names of the stage's links that learn (e.g. ['critic->solver']; an outer stage may add "
        "inner links by agent, e.g. ['critic', 'critic->solver']); default: all of the stage's links",
    )
    clip: float | None = Field(default=1.0, gt=0)


class RunSection(_Section):
    output: str = "runs/train"
    seed: int = 0
    checkpoint_every: int = Field(default=50, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    log_every: int = Field(default=1, ge=1)
    validate_every: int = Field(default=50, ge=1)
    trackers: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list)


class TrainConfig(_Section):
    stage: Literal["inner", "outer"] = "outer"
    trainable: Literal["links", "full"] = "links"
    system: SystemSection = Field(default_factory=SystemSection)
    data: DataSection = Field(default_factory=DataSection)
    objective: ObjectiveSection = Field(default_factory=ObjectiveSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    run: RunSection = Field(default_factory=RunSection)

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.stage == "inner" and self.trainable == "full" and self.objective.precompute:
            raise ValueError(
                "objective.precompute caches frozen hidden states, which --trainable full changes; "
                "set objective.precompute: false for full fine-tuning"
            )
        return self

    @classmethod
    def load(cls, path: str | Path, **overrides: object) -> TrainConfig:
        """Read a YAML config; ``overrides`` (``stage``, ``trainable``, ``max_steps``, ``output``) win."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"training config {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of sections (stage, system, data, ...)")
        return cls.from_dict(raw, source=str(path), **overrides)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config", **overrides: object) -> TrainConfig:
        raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items() if v is not None}
        for key in ("stage", "trainable"):
            if overrides.get(key) is not None:
                raw[key] = overrides[key]
        if overrides.get("max_steps") is not None:
            raw.setdefault("optim", {})["max_steps"] = overrides["max_steps"]
        if overrides.get("output") is not None:
            raw.setdefault("run", {})["output"] = overrides["output"]
        try:
            return cls.model_validate(raw)
        except ValidationError as err:
            problems = "; ".join(_describe(e) for e in err.errors())
            raise ConfigError(f"{source}: {problems}") from None


def _describe(error: dict) -> str:
    where = ".".join(str(p) for p in error["loc"]) or "config"
    return f"{where}: {error['msg'].removeprefix('Value error, ')}"
