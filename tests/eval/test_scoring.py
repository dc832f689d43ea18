"""Strict scorers on tricky cases; the lenient switch reproduces the release's looser rules."""

import pytest

from recursivemas.eval.scoring import extract_choice, score_choice, score_code, score_exact, score_math


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
