"""The context budget of a system's agents: refuse latent-step and new-token counts that leave an agent's
context window no room for its prompt, before any question runs, naming the largest counts that fit."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from recursivemas.errors import ConfigError

if TYPE_CHECKING:
    from recursivemas.system import RecursiveMAS

MAX_LENGTH = 32768  # latent steps or new tokens per agent turn (the largest bundled context window)


def check_context_budget(
    system: RecursiveMAS,
    modes: Sequence[str],
    latent_steps: int | None,
    max_new_tokens: int,
    steps_flag: str = "--latent-steps",
) -> None:
    """Refuse ``--latent-steps``/``--max-new-tokens`` that leave an agent's context window no room for
    the question, naming the largest values that fit (checked once the models, and so their context
    windows, are known; a row whose own question is too long fails alone, at run time). ``steps_flag``
    names the option the latent steps came from in that advice (``"--sweep-latent-steps values"``)."""
    for mode in modes:
        floors = {name: _prompt_floor(system, name, mode) for name in system.agents}
        for name, agent in system.agents.items():
            need = floors[name] + _positions(system, name, mode, latent_steps, max_new_tokens)
            if need > agent.max_context:
                raise ConfigError(
                    f"in {mode} mode agent {name!r} needs {need} of its {agent.max_context} context "
                    f"positions (a prompt of {floors[name]} before any question, plus latent inputs, "
                    f"latent steps and new tokens); use "
                    f"{_budget_fixes(system, mode, floors, latent_steps, max_new_tokens, steps_flag)}"
                )


def _budget_fixes(
    system: RecursiveMAS,
    mode: str,
    floors: dict[str, int],
    latent_steps: int | None,
    max_new_tokens: int,
    steps_flag: str,
) -> str:
    """The largest latent steps (named ``steps_flag``; other settings kept) and ``--max-new-tokens`` that
    fit every agent."""
    fixes = []
    if mode == "latent":
        steps = _largest(lambda m: _fits(system, mode, floors, m, max_new_tokens))
        if steps:
            fixes.append(f"{steps_flag} at most {steps}")
    tokens = _largest(lambda t: _fits(system, mode, floors, latent_steps, t))
    if tokens:
        fixes.append(f"--max-new-tokens at most {tokens}")
    return " or ".join(fixes) or "agents with longer context windows"


def _fits(
    system: RecursiveMAS, mode: str, floors: dict[str, int], latent_steps: int | None, max_new_tokens: int
) -> bool:
    """Whether every agent's prompt floor plus its added positions fits its context window."""
    return all(
        floors[name] + _positions(system, name, mode, latent_steps, max_new_tokens) <= agent.max_context
        for name, agent in system.agents.items()
    )


def _prompt_floor(system: RecursiveMAS, name: str, mode: str) -> int:
    """Text tokens of agent ``name``'s prompt for an empty question (its slots filled in ``mode``)."""
    agent = system.agents[name]
    if agent.template is None:
        return 0
    slots = set() if mode == "single" else {e.slot for e in system.config.incoming(name)}
    texts = [piece for piece in agent.render("", None, slots) if isinstance(piece, str)]
    return sum(len(ids) for ids in agent.tokenizer(texts, add_special_tokens=False)["input_ids"])


def _positions(
    system: RecursiveMAS, name: str, mode: str, latent_steps: int | None, max_new_tokens: int
) -> int:
    """Positions that agent ``name``'s turn adds to its prompt text: the messages it reads (latent
    thoughts, or texts of up to ``max_new_tokens``), then its own thoughts or new tokens, whichever is
    longer."""
    config = system.config
    answers = max_new_tokens if name == config.answerer else 0
    if mode == "single":
        return answers
    incoming = config.incoming(name)
    if mode == "text":
        return (len(incoming) + 1) * max_new_tokens

    def steps(agent: str) -> int:
        return latent_steps or config.steps(agent)

    return sum(steps(e.src) for e in incoming) + max(steps(name), answers)


def _largest(fits: Callable[[int], bool], high: int = MAX_LENGTH) -> int:
    """The largest value in ``[1, high]`` for which the monotone ``fits`` holds, 0 if none does."""
    low, best = 1, 0
    while low <= high:
        middle = (low + high) // 2
        if fits(middle):
            best, low = middle, middle + 1
        else:
            high = middle - 1
    return best
