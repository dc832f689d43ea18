"""Task loading: generated, packaged and file-based tasks; hub field mappings on local hub-shaped rows."""

import json
import re

import pytest

from recursivemas.errors import ConfigError, InputError
from recursivemas.eval.relay import relay_rows
from recursivemas.eval.tasks import load_task


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_reasoning_gym_task_is_seeded_and_scored_by_its_checker():
    task = load_task("reasoning-gym:basic_arithmetic", limit=5, data_seed=3, val_size=4)
    again = load_task("reasoning-gym:basic_arithmetic", limit=5, data_seed=3)
    assert [e.question for e in task.examples] == [e.question for e in again.examples]
    assert len(task.validation) > 0
    assert not {e.question for e in task.validation} & {e.question for e in task.examples}
    ex = task.examples[0]
    assert task.score(ex, f"so \\boxed{{{ex.gold}}}").correct
    assert not task.score(ex, "\\boxed{123456789}").correct
    assert not task.score(ex, "no answer here").correct


def test_humaneval_canonical_solution_passes_and_a_wrong_one_fails():
    task = load_task("humaneval", limit=2)
    assert len(task.examples) == 2 and task.examples[0].id == "HumanEval/0"
    ex = task.examples[0]
    assert task.score(ex, f"```python\n{ex.prompt}{ex.gold}```").correct
    assert not task.score(
        ex, "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```"
    ).correct


def test_relay_rows_are_seeded_and_put_the_fact_in_the_planner_context():
    a, b = relay_rows(5, seed=1, level=3), relay_rows(5, seed=1, level=3)
    assert a == b and a != relay_rows(5, seed=2, level=3)
    row = a[0]
    assert row["answer"] in row["context"]["planner"] and row["answer"] not in row["question"]
    task = load_task("relay:2", limit=3, data_seed=1)
    assert task.score(task.examples[0], f"\\boxed{{{task.examples[0].gold}}}").correct


def test_jsonl_task_with_all_row_types(tmp_path):
    rows = [
        {"question": "2+2?", "answer": "4"},
        {"question": "Capital of France?", "answer": "B", "type": "choice", "choices": ["Rome", "Paris"]},
        {"question": "Write add.", "answer": "", "type": "code", "tests": "assert add(1, 2) == 3"},
        {"question": "Code?", "answer": "X1", "type": "exact", "context": {"planner": "It is X1."}},
    ]
    task = load_task(f"jsonl:{_write_jsonl(tmp_path / 'rows.jsonl', rows)}")
    math, choice, code, exact = task.examples
    assert "B. Paris" in choice.question
    assert task.score(math, "\\boxed{4}").correct and task.score(choice, "The answer is B").correct
    assert task.score(code, "```python\ndef add(a, b):\n    return a + b\n```").correct
    assert exact.context == {"planner": "It is X1."}


@pytest.mark.parametrize(
    "spec, match",
    [
        ("nonsense", "unknown task spec"),
        ("reasoning-gym:no_such_task", "reasoning-gym cannot build"),
        ("relay:x", "unknown task spec"),
        ("medqa", "needs a local file"),
        ("jsonl:/no/such/file.jsonl", "does not exist"),
    ],
)
def test_bad_task_specs(spec, match):
    with pytest.raises((ConfigError, InputError), match=match):
        load_task(spec, limit=2)


@pytest.mark.parametrize(
    "line, match",
    [
        ('{"question": "hi"}', "row 2 needs 'question' and 'answer'"),
        ('{"question": "hi", "answer": "1", "type": "essay"}', "row 2: type must be one of"),
        ('{"question": "hi", "answer": "1", "type": "code"}', "row 2: code rows need 'tests'"),
        ('{"question": "hi", "answer": 1', "line 2 is not valid JSON"),
    ],
)
def test_malformed_rows_name_the_row(tmp_path, line, match):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"question": "ok", "answer": "1"}\n' + line + "\n")
    with pytest.raises(InputError, match=match):
        load_task(f"jsonl:{path}")


def test_hub_field_mappings_on_local_rows(tmp_path):
    math500 = _write_jsonl(
        tmp_path / "m.jsonl", [{"problem": "1/2+1/2?", "answer": "1", "unique_id": "t/1.json"}]
    )
    gsm8k = _write_jsonl(tmp_path / "g.jsonl", [{"question": "3*4?", "answer": "3*4=12\n#### 1,200"}])
    gpqa = _write_jsonl(
        tmp_path / "q.jsonl",
        [
            {
                "Question": "Sky colour?",
                "Correct Answer": "blue",
                "Incorrect Answer 1": "red",
                "Incorrect Answer 2": "green",
                "Incorrect Answer 3": "black",
            }
        ],
    )
    aime = _write_jsonl(tmp_path / "a.jsonl", [{"id": 1, "problem": "Find n.", "answer": 70}])
    mbpp = _write_jsonl(
        tmp_path / "b.jsonl",
        [
            {
                "task_id": "Mbpp/2",
                "prompt": "Write add(a, b).",
                "code": "def add(a, b):\n    return a + b",
                "test": "assert add(1, 1) == 2",
                "test_list": ["assert add(1, 1) == 2"],
            }
        ],
    )
    medqa = tmp_path / "med.json"
    medqa.write_text(
        json.dumps([{"question": "Best drug?", "options": {"A": "x", "B": "y"}, "answer_idx": "B"}])
    )
    m = load_task(f"math500:{math500}").examples[0]
    assert (m.id, m.gold, m.kind) == ("t/1.json", "1", "math")
    assert load_task(f"gsm8k:{gsm8k}").examples[0].gold == "1200"
    g_task = load_task(f"gpqa-diamond:{gpqa}")
    g = g_task.examples[0]
    assert g.kind == "choice" and f"{g.gold}. blue" in g.question
    assert g_task.score(g, f"The answer is {g.gold}").correct
    assert load_task(f"aime2025:{aime}").examples[0].gold == "70"
    b_task = load_task(f"mbppplus:{mbpp}")
    assert b_task.score(b_task.examples[0], "```python\ndef add(a, b):\n    return a + b\n```").correct
    med = load_task(f"medqa:{medqa}").examples[0]
    assert med.gold == "B" and "B. y" in med.question


def test_hub_row_of_the_wrong_shape(tmp_path):
    path = _write_jsonl(tmp_path / "m.jsonl", [{"question": "no problem field", "answer": "1"}])
    with pytest.raises(InputError, match="math500 row 1 does not look like a math500 row"):
        load_task(f"math500:{path}")


def test_livecodebench_rows_stdin_and_functional(tmp_path):
    stdin_row = {
        "question_id": "abc1",
        "question_content": "Read two ints and print their sum.",
        "starter_code": "",
        "public_test_cases": json.dumps(
            [
                {"input": "1 2\n", "output": "3\n", "testtype": "stdin"},
                {"input": "5 5\n", "output": "10\n", "testtype": "stdin"},
            ]
        ),
    }
    functional_row = {
        "question_id": "lc1",
        "question_content": "Return the sum of a list.",
        "starter_code": "class Solution:\n    def total(self, nums: List[int]) -> int:\n        ",
        "public_test_cases": json.dumps([{"input": "[1, 2, 3]", "output": "6", "testtype": "functional"}]),
    }
    task = load_task(f"livecodebench:{_write_jsonl(tmp_path / 'lcb.jsonl', [stdin_row, functional_row])}")
    stdin_ex, functional_ex = task.examples
    assert stdin_ex.kind == "stdio" and functional_ex.kind == "code"
    good = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    wrong = "```python\na, b = map(int, input().split())\nprint(a - b)\n```"
    assert task.score(stdin_ex, good).correct
    result = task.score(stdin_ex, wrong)
    assert not result.correct and "wrong output" in result.detail
    solution = "```python\nclass Solution:\n    def total(self, nums: List[int]) -> int:\n"
    solution += "        return sum(nums)\n```"
    assert task.score(functional_ex, solution).correct
    assert not task.score(functional_ex, solution.replace("sum(nums)", "max(nums)")).correct


def test_stdio_rows_in_jsonl(tmp_path):
    rows = [
        {"question": "Echo.", "answer": "", "type": "stdio", "tests": [{"input": "hi\n", "output": "hi\n"}]}
    ]
    task = load_task(f"jsonl:{_write_jsonl(tmp_path / 'r.jsonl', rows)}")
    assert task.score(task.examples[0], "```python\nprint(input())\n```").correct
    bad = [{"question": "Echo.", "answer": "", "type": "stdio", "tests": "print(1)"}]
    with pytest.raises(InputError, match="stdio rows need 'tests'"):
        load_task(f"jsonl:{_write_jsonl(tmp_path / 'b.jsonl', bad)}")


def test_relay_lenient_counts_a_mention_of_the_fact():
    task = load_task("relay:1", limit=1, data_seed=4)
    ex = task.examples[0]
    text = f"The secret is {ex.gold}, I think.\nDone."
    assert not task.score(ex, text).correct
    assert task.score(ex, text, lenient=True).correct
    assert not task.score(ex, f"The secret is 1{ex.gold}.", lenient=True).correct  # whole numbers only


def test_reasoning_gym_generator_settings_make_an_easier_rung():
    task = load_task(
        "reasoning-gym:basic_arithmetic:min_terms=2,max_terms=2,min_digits=1,max_digits=1", limit=6
    )
    assert task.name == "reasoning-gym:basic_arithmetic:min_terms=2,max_terms=2,min_digits=1,max_digits=1"
    for ex in task.examples:
        numbers = re.findall(r"\d+", ex.question.split("\n")[0])
        assert len(numbers) == 2 and all(len(n) == 1 for n in numbers)


@pytest.mark.parametrize(
    "spec", ["reasoning-gym:basic_arithmetic:bogus=1", "reasoning-gym:basic_arithmetic:x"]
)
def test_bad_generator_settings_name_the_spec(spec):
    with pytest.raises(ConfigError, match="basic_arithmetic"):
        load_task(spec, limit=2)
