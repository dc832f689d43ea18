"""Named, ready-to-run systems. ``build_preset(name)`` returns a ``RecursiveMAS``.

A preset may ship trained links inside the package (``recursivemas/weights/<preset>/``, a link checkpoint
written by ``save_pretrained``); its default ``init`` is then ``"trained"``, which loads them (the
checkpoint's agent fingerprints must match the loaded models). Any other ``init`` (``training-free``,
``identity``, ``default``) ignores them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from recursivemas.agent import Agent
from recursivemas.checkpoint import load_links
from recursivemas.errors import ConfigError
from recursivemas.links import build_link, uninitialised
from recursivemas.models import load_models
from recursivemas.patterns import build_pattern
from recursivemas.system import RecursiveMAS

WEIGHTS_DIR = Path(__file__).parent / "weights"
TRAINED = "trained"


@dataclass(frozen=True)
class Preset:
    """A named system: its description, the models of its agents (role -> model spec), its builder and,
    if it ships trained links, their directory."""

    name: str
    description: str
    agents: dict[str, str]
    build: Callable[..., RecursiveMAS]
    links: Path | None = None


def build_from_specs(
    agents: dict[str, str],
    pattern: str = "sequential",
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    init: str = "training-free",
    rounds: int = 3,
    latent_steps: int = 16,
    links: str | Path | None = None,
) -> RecursiveMAS:
    """The ``pattern`` system (see ``recursivemas.patterns``) over ``agents`` (role -> model spec; a spec
    named twice is loaded once and shared; bundled models not converted yet are converted first, side by
    side where CPUs stand idle). ``init == "trained"`` loads the link checkpoint ``links``."""
    if init == TRAINED and links is None:
        raise ConfigError("this preset ships no trained links; use init 'training-free'")
    loaded = load_models(agents.values(), dtype, device)  # converts missing bundled models first
    built = {
        role: Agent(name=role, model=loaded[spec][0], tokenizer=loaded[spec][1], model_id=spec)
        for role, spec in agents.items()
    }
    if init != TRAINED:
        return build_pattern(pattern, built, rounds=rounds, latent_steps=latent_steps, init=init)
    with uninitialised():  # every link is replaced by the checkpoint's, which loads every tensor
        system = build_pattern(pattern, built, rounds=rounds, latent_steps=latent_steps, init="identity")
        placeholders = [link for group in system.links.values() for link in group.values()]
        load_links(system, links)
    for link in placeholders:  # a link the checkpoint lacks keeps the identity start
        if system.links[link.config.kind][link.name] is link:
            system.set_link(build_link(link.config))
    return system


def _preset_builder(
    agents: dict[str, str], pattern: str = "sequential", links: Path | None = None
) -> Callable[..., RecursiveMAS]:
    def build(init: str | None = None, **kwargs) -> RecursiveMAS:
        default = TRAINED if links is not None else "training-free"
        return build_from_specs(agents, pattern, init=init or default, links=links, **kwargs)

    return build


_BUNDLED_AGENTS = {"planner": "smollm2-135m", "critic": "smollm2-135m", "solver": "gemma3-270m"}
_PAIR_AGENTS = {"planner": "smollm2-135m", "solver": "smollm2-135m"}
_TINY_AGENTS = {"planner": "tiny-random:llama", "critic": "tiny-random:gemma3", "solver": "tiny-random:qwen3"}
_MIXTURE_AGENTS = {
    "math": "smollm2-135m",
    "code": "gemma3-270m",
    "science": "smollm2-135m",
    "summarizer": "smollm2-135m",
}
_DISTILLATION_AGENTS = {"expert": "gemma3-270m", "learner": "smollm2-135m"}
_TINY_MIXTURE_AGENTS = {
    "math": "tiny-random:llama",
    "code": "tiny-random:gemma3",
    "science": "tiny-random:qwen3",
    "summarizer": "tiny-random:llama",
}
_DELIBERATION_AGENTS = {"reflector": "gemma3-270m", "toolcaller": "smollm2-135m"}
_TINY_DELIBERATION_AGENTS = {"reflector": "tiny-random:gemma3", "toolcaller": "tiny-random:llama"}
_TINY_DISTILLATION_AGENTS = {"expert": "tiny-random:gemma3", "learner": "tiny-random:llama"}

PRESETS: dict[str, Preset] = {
    "tiny-random": Preset(
        "tiny-random",
        "Sequential planner/critic/solver over tiny random Llama (d=64), Gemma3 (d=96) and Qwen3 (d=80) "
        "models with two different tokenizers; builds offline in about a second. For tests and smoke checks.",
        _TINY_AGENTS,
        _preset_builder(_TINY_AGENTS),
    ),
    "smollm2-gemma3": Preset(
        "smollm2-gemma3",
        "Sequential planner/critic/solver over the bundled real models: SmolLM2-135M-Instruct plans and "
        "criticises (one shared copy), Gemma-3-270M solves; links map 576 <-> 640 across two tokenizers. "
        "Ships trained links (configs/default-{inner,align,outer}.yaml).",
        _BUNDLED_AGENTS,
        _preset_builder(_BUNDLED_AGENTS, links=WEIGHTS_DIR / "smollm2-gemma3"),
        WEIGHTS_DIR / "smollm2-gemma3",
    ),
    "smollm2-pair": Preset(
        "smollm2-pair",
        "Pair planner -> solver over one bundled SmolLM2-135M-Instruct (shared weights): one latent hop per "
        "round, the reference system for the relay diagnostic. Ships trained links (configs/pair-inner.yaml, "
        "configs/pair-outer.yaml).",
        _PAIR_AGENTS,
        _preset_builder(_PAIR_AGENTS, "pair", WEIGHTS_DIR / "smollm2-pair"),
        WEIGHTS_DIR / "smollm2-pair",
    ),
    "smollm2-gemma3-mixture": Preset(
        "smollm2-gemma3-mixture",
        "Mixture: math and science specialists (SmolLM2-135M-Instruct) and a code specialist (Gemma-3-270M) "
        "think in parallel; a SmolLM2 summarizer reads all three and answers. Ships trained links "
        "(configs/mixture-{inner,outer}.yaml).",
        _MIXTURE_AGENTS,
        _preset_builder(_MIXTURE_AGENTS, "mixture", WEIGHTS_DIR / "smollm2-gemma3-mixture"),
        WEIGHTS_DIR / "smollm2-gemma3-mixture",
    ),
    "smollm2-gemma3-distillation": Preset(
        "smollm2-gemma3-distillation",
        "Distillation: the larger Gemma-3-270M expert thinks, the SmolLM2-135M-Instruct learner reads its "
        "message and answers. Ships trained links (configs/distillation-{inner,outer}.yaml).",
        _DISTILLATION_AGENTS,
        _preset_builder(_DISTILLATION_AGENTS, "distillation", WEIGHTS_DIR / "smollm2-gemma3-distillation"),
        WEIGHTS_DIR / "smollm2-gemma3-distillation",
    ),
    "smollm2-gemma3-deliberation": Preset(
        "smollm2-gemma3-deliberation",
        "Deliberation: a Gemma-3-270M reflector and a SmolLM2-135M-Instruct tool-caller exchange latent "
        "messages; the tool-caller answers, running <python> and <search> (shipped offline corpus) calls "
        "as it writes. Ships trained links (configs/deliberation-{inner,outer}.yaml).",
        _DELIBERATION_AGENTS,
        _preset_builder(_DELIBERATION_AGENTS, "deliberation", WEIGHTS_DIR / "smollm2-gemma3-deliberation"),
        WEIGHTS_DIR / "smollm2-gemma3-deliberation",
    ),
    "tiny-random-deliberation": Preset(
        "tiny-random-deliberation",
        "Deliberation over tiny random models (reflector: Gemma3, tool-caller: Llama) with the python and "
        "search tools. For tests and smoke checks.",
        _TINY_DELIBERATION_AGENTS,
        _preset_builder(_TINY_DELIBERATION_AGENTS, "deliberation"),
    ),
    "tiny-random-mixture": Preset(
        "tiny-random-mixture",
        "Mixture over tiny random models (math: Llama, code: Gemma3, science: Qwen3; summarizer: Llama). "
        "For tests and smoke checks.",
        _TINY_MIXTURE_AGENTS,
        _preset_builder(_TINY_MIXTURE_AGENTS, "mixture"),
    ),
    "tiny-random-distillation": Preset(
        "tiny-random-distillation",
        "Distillation over tiny random models (expert: Gemma3 d=96, learner: Llama d=64). For tests and "
        "smoke checks.",
        _TINY_DISTILLATION_AGENTS,
        _preset_builder(_TINY_DISTILLATION_AGENTS, "distillation"),
    ),
}
DEFAULT_PRESET = "smollm2-gemma3"


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def build_preset(name: str = DEFAULT_PRESET, **kwargs) -> RecursiveMAS:
    """Build preset ``name``; keyword arguments (dtype, device, init, rounds, latent_steps) go to it.

    ``init`` defaults to ``"trained"`` for presets that ship trained links, else ``"training-free"``.
    """
    return get_preset(name).build(**kwargs)
