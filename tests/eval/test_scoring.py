"""Strict scorers on tricky cases; the lenient switch reproduces the release's looser rules."""

import pytest

from recursivemas.eval.scoring import extract_choice, score_choice, score_code, score_exact, score_math
from recursivemas.tools.sandbox import run_python


@pytest.mark.parametrize(
    "text, gold, correct",
    [
        ("So the answer is \\boxed{\\frac{1}{2}}.", "0.5", True),
        ("\\boxed{2/4}", "\\frac{1}{2}", True),
        ("\\boxed{\\dfrac{3}{4}}", "3/4", True),
        ("First \\boxed{3}, no wait: \\boxed{5}", "5", True),  # the last boxed answer counts
        ("First \\boxed{5}, no wait: \\boxed{3}", "5", False),
        ("\\boxed{x = 2}", "2", True),
        ("The final answer is 42.", "42", True),
        ("\\boxed{42.0}", "42", True),
        ("\\boxed{41.9}", "42", False),
        ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}", True),
        ("I think it is 42 but I am not sure", "42", False),  # no boxed or final answer: wrong when strict
        ("\\boxed{12}", "12.5", False),
    ],
)
def test_math_strict(text, gold, correct):
    assert score_math(text, gold).correct is correct


def test_math_lenient_integer_part_and_substring():
    assert not score_math("\\boxed{12}", "12.5").correct
    assert score_math("\\boxed{12}", "12.5", lenient=True).correct
    assert score_math("I think it is 42 but I am not sure", "42", lenient=True).correct


@pytest.mark.parametrize(
    "text, letter",
    [
        ("The answer is (C).", "C"),
        ("\\boxed{B}", "B"),
        ("Reasoning...\nD", "D"),
        ("answer: a", None),  # lower case is too ambiguous with the article
        ("The answer is a bit tricky, overall B", None),
        ("My answer: I believe it's C", None),
        ("The answer is C because option A fails", "C"),
        ("**Answer: D**", "D"),
        ("The answer is (I).", "I"),
        ("I would pick the second option because photosynthesis makes oxygen.", None),
        ("", None),
    ],
)
def test_choice_extraction(text, letter):
    assert extract_choice(text) == letter


def test_unparsed_choice_is_wrong_unless_lenient():
    text = "Photosynthesis makes oxygen."  # choice text without a letter
    assert not score_choice(text, "A").correct
    assert score_choice(text, "A", lenient=True).correct
    assert not score_choice(text, "B", lenient=True).correct


def test_exact_match_is_case_and_space_insensitive_only():
    assert score_exact("\\boxed{ Paris }", "paris").correct
    assert not score_exact("\\boxed{Paris, France}", "Paris").correct
    assert score_exact("\\boxed{Paris, France}", "Paris", lenient=True).correct


def test_code_block_selection():
    from recursivemas.eval.scoring import extract_code

    text = "```Python\ndef f():\n    return 1\n```\nUsage:\n```python\nprint(f())\n```"
    assert extract_code(text) == "def f():\n    return 1\n"
    assert extract_code("no fences, just code") == "no fences, just code"


def test_code_passes_and_fails():
    tests = "assert add(2, 3) == 5\n"
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    bad = "```python\ndef add(a, b):\n    return a - b\n```"
    assert score_code(good, tests).correct
    assert not score_code(bad, tests).correct


def test_code_that_loops_forever_times_out():
    result = run_python("while True:\n    pass\n", timeout_s=2)
    assert not result.passed and "timed out" in result.detail


def test_code_cannot_use_the_network():
    program = "import socket\nsocket.create_connection(('127.0.0.1', 9))\n"
    result = run_python(program, timeout_s=5)
    assert not result.passed and "network access is disabled" in result.detail


def test_code_memory_is_limited():
    result = run_python("x = bytearray(4 * 1024 ** 3)\n", timeout_s=5, memory_mb=512)
    assert not result.passed and "MemoryError" in result.detail


def test_code_runs_in_a_temporary_directory(tmp_path):
    result = run_python(
        "import os\nassert 'recursivemas-sandbox-' in os.getcwd()\nopen('x.txt', 'w').write('hi')\n"
    )
    assert result.passed


def test_exiting_early_does_not_pass():
    assert not run_python("import sys\nsys.exit(0)\nassert False\n").passed
    assert not run_python("raise SystemExit\n").passed


def test_future_imports_work():
    assert run_python("from __future__ import annotations\nx: int = 1\nassert x == 1\n").passed


def test_background_children_are_killed():
    program = (
        "import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    )
    result = run_python(program, timeout_s=5)
    assert result.passed  # the program itself finished; its child does not hold the run open


def test_stdout_and_stdin():
    result = run_python("print(input()[::-1])", stdin="abc\n")
    assert result.passed and result.stdout.strip() == "cba"
