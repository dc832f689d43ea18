"""Answer scoring, strict by default.

* ``math``: the prediction's last ``\\boxed{}`` (else its final-answer line) is compared with the gold
  answer by ``math-verify`` (symbolic equivalence: ``1/2 == 0.5 == \\frac{1}{2}``).
* ``choice``: a letter (A-J) stated as the answer; an unparsed answer is wrong (never defaulted).
* ``exact``: the extracted answer equals the gold string after whitespace and case folding.
* ``code``: the model's program plus the task's tests run in the sandbox; ``stdio``: the program is
  run on each test input and its output compared (LiveCodeBench's stdin tests).
* ``reasoning-gym``: the dataset's own checker; only a full score (1.0) counts as correct.

``lenient=True`` reproduces the looser rules of the release for comparison: numbers match on their
integer part, an unparsed multiple-choice answer counts as "A", and math falls back to substring
matching of the gold answer.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from math_verify import parse, verify

from recursivemas.answers import extract_answer, last_boxed
from recursivemas.tools.sandbox import run_python

# "answer is (C)", "Answer: C": the keyword in any case, the letter in capitals (so prose like
# "the answer is a bit tricky" is not read as choice A).
_ANSWER_LETTER = re.compile(
    r"(?i:answer)\s*(?i:is|:)?\s*(?:\*\*)?\(?([A-HJ]|I(?!\s+[a-z]))\)?(?:\*\*)?(?![\w'])"  # "I think": not I
)
_LONE_LETTER = re.compile(r"^\(?([A-J])\)?[.:)]?$")
_CODE_BLOCK = re.compile(r"```[\w+-]*[ \t]*\n(.*?)```", re.S)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class Score:
    correct: bool
    extracted: str | None
    detail: str = ""


def score_math(text: str, gold: str, lenient: bool = False) -> Score:
    extracted = extract_answer(text)
    if extracted is None:
        if lenient and gold.strip() and gold.strip() in text:
            return Score(True, gold.strip(), "lenient: gold found in text")
        return Score(False, None, "no boxed or final answer")
    gold_parsed = parse(_as_math(gold))
    pred_parsed = parse(_as_math(extracted))
    correct = bool(gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed))
    if not correct and lenient:
        correct = _integer_part(extracted) is not None and _integer_part(extracted) == _integer_part(gold)
        return Score(correct, extracted, "lenient: integer part" if correct else "")
    return Score(correct, extracted)


def _as_math(answer: str) -> str:
    """Give math-verify delimiters so bare answers like ``3/4`` or ``x=2`` are parsed as math."""
    answer = answer.strip()
    return answer if answer.startswith("$") or "\\boxed" in answer else f"${answer}$"


def _integer_part(text: str) -> int | None:
    match = _NUMBER.search(text.replace(",", ""))
    return int(float(match.group())) if match else None


def extract_choice(text: str) -> str | None:
    """The letter the text gives as its answer: boxed, "answer is X", or a lone letter line."""
    boxed = last_boxed(text)
    if boxed is not None and _LONE_LETTER.match(boxed.strip()):
        return _LONE_LETTER.match(boxed.strip()).group(1).upper()
    matches = _ANSWER_LETTER.findall(text)
    if matches:
        return matches[-1]
    for line in reversed(text.strip().splitlines()):
        match = _LONE_LETTER.match(line.strip())
        if match:
            return match.group(1).upper()
    return None


def score_choice(text: str, gold: str, lenient: bool = False) -> Score:
    letter = extract_choice(text)
    if letter is None:
        if lenient:
            return Score(gold.strip().upper() == "A", "A", "lenient: unparsed defaults to A")
        return Score(False, None, "no letter found")
    return Score(letter == gold.strip().upper(), letter)


def score_exact(text: str, gold: str, lenient: bool = False) -> Score:
    extracted = extract_answer(text)
    if extracted is None:
        lines = [line for line in text.strip().splitlines() if line.strip()]
        extracted = lines[-1].strip() if lines else None
    if extracted is None:
        return Score(False, None, "empty answer")
    norm = " ".join(extracted.split()).casefold()
    target = " ".join(gold.split()).casefold()
    correct = norm == target or (lenient and target in norm)
    return Score(correct, extracted)


def extract_code(text: str) -> str:
    """The last fenced block that defines a ``def``/``class``, else the last block, else the text."""
    blocks = _CODE_BLOCK.findall(text)
    defining = [b for b in blocks if re.search(r"^\s*(def|class)\s", b, re.M)]
    return (defining or blocks or [text])[-1]


def score_code(text: str, tests: str, prompt: str = "", timeout_s: float = 10.0) -> Score:
    """Run ``prompt + completion`` (completion = the last code block) and the tests in the sandbox.

    If the completion redefines the whole function, the prompt is still prepended: redefining is fine.
    """
    code = extract_code(text)
    result = run_python(f"{prompt}{code}\n\n{tests}\n", timeout_s=timeout_s)
    return Score(result.passed, code[:200], result.detail)


def score_stdio(text: str, cases: list[dict], timeout_s: float = 10.0) -> Score:
    """Run the program once per case with the case's ``input`` on stdin; every stdout must equal ``output``
    (compared line by line, trailing whitespace ignored)."""
    if not cases:
        raise ValueError("score_stdio needs at least one test case")
    code = extract_code(text)
    for i, case in enumerate(cases, 1):
        result = run_python(code, timeout_s=timeout_s, stdin=case["input"])
        if not result.passed:
            return Score(False, code[:200], f"case {i}: {result.detail}")
        if _lines(result.stdout) != _lines(case["output"]):
            return Score(False, code[:200], f"case {i}: wrong output")
    return Score(True, code[:200], f"{len(cases)} cases passed")


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip().splitlines()]


SCORERS: dict[str, Callable[..., Score]] = {"math": score_math, "choice": score_choice, "exact": score_exact}
