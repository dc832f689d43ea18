"""The relay task: a diagnostic of how much information a channel between agents carries.

A sender's private context holds a random fact (a number, a name or a code); the question asks for it,
and only the answering agent answers. The sender is the first agent to act (the planner, a mixture's
first specialist, the expert, the reflector), or any agent given by ``eval --relay-sender``; the answerer
can only know the fact through the messages that reach it (through the critic in the sequential
pattern). Text mode can copy the fact; latent mode with untrained links should not get it; trained
links should. Seeded, with three difficulty levels:

    level 1: a 2-digit number      level 2: a 4-digit number or a first name      level 3: a 6-character code
"""

from __future__ import annotations

import random
import string

from recursivemas.errors import ConfigError
from recursivemas.system import RecursiveMAS
from recursivemas.trace import StageTrace

NAMES = [
    "Alice",
    "Bruno",
    "Chloe",
    "Dmitri",
    "Elena",
    "Farid",
    "Greta",
    "Hiro",
    "Ines",
    "Jonas",
    "Keiko",
    "Liam",
    "Mona",
    "Nikos",
    "Olga",
    "Pablo",
    "Quinn",
    "Rosa",
    "Sven",
    "Tara",
    "Umar",
    "Vera",
    "Wanda",
    "Xavier",
    "Yusuf",
    "Zoe",
]
# Level-2 names for training rows only (``relay`` sources with ``names: disjoint``): none is in ``NAMES``,
# so an evaluation on ``NAMES`` measures whether a link passes on names it never saw.
TRAIN_NAMES = [
    "Aaron",
    "Abdul",
    "Ada",
    "Adrian",
    "Agnes",
    "Aiko",
    "Alan",
    "Alma",
    "Amara",
    "Amir",
    "Anders",
    "Andrea",
    "Anika",
    "Anton",
    "Arjun",
    "Astrid",
    "Ayla",
    "Beatrix",
    "Ben",
    "Bianca",
    "Boris",
    "Carla",
    "Carlos",
    "Cecile",
    "Chen",
    "Clara",
    "Colin",
    "Dalia",
    "Daniel",
    "Dario",
    "Dina",
    "Duncan",
    "Edgar",
    "Elif",
    "Emil",
    "Emma",
    "Enzo",
    "Erik",
    "Esther",
    "Fatima",
    "Felix",
    "Fiona",
    "Frida",
    "Gabriel",
    "Gemma",
    "Gideon",
    "Gloria",
    "Hana",
    "Hannah",
    "Harvey",
    "Hector",
    "Helga",
    "Ida",
    "Igor",
    "Ilse",
    "Ivan",
    "Jade",
    "Jamal",
    "Jana",
    "Javier",
    "Jin",
    "Joel",
    "Julia",
    "Kai",
    "Karim",
    "Karl",
    "Kate",
    "Kenji",
    "Kira",
    "Lara",
    "Lars",
    "Leon",
    "Lina",
    "Lucas",
    "Luna",
    "Malik",
    "Maria",
    "Marco",
    "Maya",
    "Milo",
    "Mira",
    "Nadia",
    "Naomi",
    "Nils",
    "Nina",
    "Noah",
    "Nora",
    "Omar",
    "Oscar",
    "Otto",
    "Paula",
    "Petra",
    "Priya",
    "Rafael",
    "Rania",
    "Ravi",
    "Rita",
    "Ruben",
    "Sara",
    "Selma",
    "Simon",
    "Sofia",
    "Stefan",
    "Tariq",
    "Tessa",
    "Theo",
    "Tomas",
    "Ulla",
    "Uma",
    "Victor",
    "Viktor",
    "Wendy",
    "Wilhelm",
    "Yara",
    "Yuki",
    "Zainab",
    "Zara",
]
LEVELS = (1, 2, 3)
SENDER = "planner"  # rows built without a system (the sequential and pair patterns' first agent)


def relay_fact(rng: random.Random, level: int, names: list[str] = NAMES) -> tuple[str, str]:
    """(kind of fact, value) for one example; level-2 names are drawn from ``names``."""
    if level == 1:
        return "number", str(rng.randint(10, 99))
    if level == 2:
        return ("number", str(rng.randint(1000, 9999))) if rng.random() < 0.5 else ("name", rng.choice(names))
    if level == 3:
        return "code", "".join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(6))
    raise ConfigError(f"relay level must be one of {LEVELS}, got {level}")


def relay_rows(
    n: int, seed: int, level: int = 1, sender: str = SENDER, names: list[str] = NAMES
) -> list[dict]:
    """``n`` rows ``{question, answer, type, context}``; the same (n, seed, level, names) gives the same
    rows."""
    rng = random.Random(f"relay:{seed}:{level}")
    rows = []
    for _ in range(n):
        kind, value = relay_fact(rng, level, names)
        rows.append(
            {
                "question": f"Your teammate was told a secret {kind}. What is the secret {kind}? "
                f"Give only the {kind}, inside \\boxed{{}}.",
                "answer": value,
                "type": "exact",
                "context": {sender: f"The secret {kind} is {value}. Make sure your team learns it."},
            }
        )
    return rows


LENS_TOP_K = 5
_WORD_MARKS = "Ġ▁ "


def _pieces(tokens: list[str]) -> set[str]:
    """Token strings without their word-boundary marks (SentencePiece ``▁``, byte-BPE ``Ġ``)."""
    return {t.strip(_WORD_MARKS) for t in tokens} - {""}


def lens_recovery(system: RecursiveMAS, fact: str, trace: list[StageTrace]) -> dict[str, float]:
    """Per latent hop, whether the fact reached it, read through the latent lens.

    For every latent stage of ``trace`` (run with ``lens_top_k``) and every view of its thoughts (the
    sender's own table, key ``"lens:planner"``, and each receiver's after the outer link, key
    ``"lens:planner->critic"``): 1.0 if every token of the fact, tokenised by that view's agent, is among
    the top-k nearest tokens of at least one thought, else 0.0; the best round counts.
    """
    found: dict[str, float] = {}
    for stage in trace:
        if not stage.lens:
            continue
        for who, per_thought in stage.lens.items():
            key = f"lens:{stage.agent}" if who == stage.agent else f"lens:{stage.agent}->{who}"
            wanted = _pieces(system.agents[who].tokenizer.tokenize(" " + fact))
            seen = _pieces([tok for thought in per_thought for tok in thought])
            found[key] = max(found.get(key, 0.0), float(wanted <= seen))
    return found
