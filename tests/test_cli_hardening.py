"""`recursivemas run` keeps finished work and refuses bad numbers up front (issue 11, items 5 and 6)."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from recursivemas.cli import main

FAST = ["--rounds", "2", "--latent-steps", "4", "--max-new-tokens", "6"]
TOO_LONG = "seven " * 1200  # more tokens than the tiny models' 1024-position context


def _main(capsys, *args):
    """``recursivemas ARGS`` in-process: exit status (argparse errors included), stdout, stderr."""
    try:
        code = main(list(args))
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def _run(capsys, *args):
    return _main(capsys, "run", "--preset", "tiny-random", *args)


# --- Ctrl-C keeps the answers already printed ---------------------------------------------------------


N = 200  # far more questions than can finish between the first answer and the signal, even on a busy CPU


def _interrupt_after_first_answer(extra: list[str], first_done: str) -> tuple[int, str, str]:
    """Run N questions in a subprocess, one per batch; send SIGINT once stdout shows a line starting
    with ``first_done``; return the exit status, stdout and stderr."""
    questions = [f"What is {n} plus {n}?" for n in range(N)]
    cmd = [sys.executable, "-m", "recursivemas", "run", "--preset", "tiny-random", "--batch-size", "1"]
    proc = subprocess.Popen(
        [*cmd, "--rounds", "3", "--latent-steps", "16", "--max-new-tokens", "8", *extra, *questions],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        # a test run started in the background inherits SIGINT ignored; give the CLI a terminal's default
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        lines = []
        for line in proc.stdout:  # each answer is flushed as its batch finishes
            lines.append(line)
            if line.startswith(first_done):
                proc.send_signal(signal.SIGINT)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, "".join(lines) + out, err


@pytest.mark.probe("cli-interrupt")
def test_ctrl_c_keeps_the_finished_json_lines():
    code, out, err = _interrupt_after_first_answer(["--json"], "{")
    assert code == 130, err
    rows = [json.loads(line) for line in out.splitlines()]  # every line complete
    assert 1 <= len(rows) < N
    assert [r["question"] for r in rows] == [f"What is {n} plus {n}?" for n in range(len(rows))]
    assert f"interrupted after {len(rows)} of {N} answers" in err and "Traceback" not in err


@pytest.mark.probe("cli-interrupt")
def test_ctrl_c_keeps_the_finished_text_answers():
    code, out, err = _interrupt_after_first_answer([], "[latent]")
    assert code == 130, err
    assert out.startswith("Q: What is 0 plus 0?\nA: ")
    answers = len(re.findall(r"^\[latent\] ", out, re.MULTILINE))
    assert 1 <= answers < N and f"interrupted after {answers} of {N} answers" in err
    assert "Traceback" not in err


# --- a bad row fails alone, named by its line ---------------------------------------------------------


@pytest.mark.probe("cli-bad-row")
def test_over_long_question_on_line_3_keeps_the_good_answers(capsys, tmp_path):
    path = tmp_path / "q.txt"
    path.write_text(f"What is 2+2?\nWhat is 3+3?\n{TOO_LONG}\nWhat is 4+4?\n")
    code, out, err = _run(capsys, "--input", str(path), "--json", *FAST)  # all four in one batch
    assert code == 2
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r.get("question") for r in rows] == ["What is 2+2?", "What is 3+3?", None, "What is 4+4?"]
    error = rows[2]
    assert error["line"] == 3 and error["input"] == str(path) and set(error) == {"input", "line", "error"}
    assert f"{path} line 3" in error["error"] and "context window" in error["error"]
    assert f"recursivemas: error: {path} line 3: " in err and "1 of 4 questions failed" in err
    assert all(r["answer"] is None or isinstance(r["answer"], str) for r in rows if "question" in r)


@pytest.mark.probe("cli-bad-row")
def test_bad_row_in_text_output_keeps_the_good_answers(capsys, tmp_path):
    path = tmp_path / "q.txt"
    path.write_text(f"What is 2+2?\nWhat is 3+3?\n{TOO_LONG}\n")
    code, out, err = _run(capsys, "--input", str(path), *FAST)
    assert code == 2
    assert out.count("Q: ") == 2 and "Q: What is 2+2?" in out and "Q: What is 3+3?" in out
    assert f"{path} line 3: agent" in err and "Traceback" not in err


@pytest.mark.probe("cli-bad-row")
def test_malformed_jsonl_line_and_empty_argument_are_error_records(capsys, tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "What is 2+2?"}\n{"question": oops}\n\n{"question": "Hi", "context": 3}\n')
    code, out, err = _run(capsys, "What is 5+5?", "   ", "--input", str(path), "--json", *FAST)
    assert code == 2
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows[0]["question"] == "What is 5+5?" and rows[2]["question"] == "What is 2+2?"
    assert rows[1]["argument"] == 2 and "question 2 is empty" in rows[1]["error"]
    assert rows[3]["line"] == 2 and f"{path} line 2 is not valid JSON" in rows[3]["error"]
    assert rows[4]["line"] == 4 and "'context' must map agent names" in rows[4]["error"]
    assert len(rows) == 5 and "3 of 5 questions failed" in err


@pytest.mark.probe("cli-bad-row")
def test_unknown_context_agent_names_its_line(capsys, tmp_path):
    path = tmp_path / "q.jsonl"
    rows = [{"question": "What is 2+2?"}, {"question": "Hi", "context": {"oracle": "It is 4."}}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = _run(capsys, "--input", str(path), "--json", *FAST)
    assert code == 2 and f"{path} line 2: context names unknown agents" in err
    good, bad = (json.loads(line) for line in out.splitlines())
    assert good["question"] == "What is 2+2?"
    assert bad["line"] == 2 and bad["error"].startswith(f"{path} line 2: context names unknown agents")


# --- numbers are checked before the models load, and against their context windows -------------------


@pytest.mark.probe("cli-numbers")
@pytest.mark.parametrize(
    "flag, value, high",
    [
        ("--rounds", "1e23", 32),
        ("--rounds", "100000000000000000000000", 32),
        ("--rounds", "0", 32),
        ("--rounds", "33", 32),
        ("--latent-steps", "-4", 32768),
        ("--latent-steps", "99999", 32768),
        ("--latent-steps", "2.5", 32768),
        ("--batch-size", "0", 1024),
        ("--batch-size", "1e3", 1024),
        ("--max-new-tokens", "-1", 32768),
        ("--max-new-tokens", "inf", 32768),
    ],
)
def test_bad_numbers_are_refused_before_loading(capsys, flag, value, high):
    code, out, err = _run(capsys, "hi", flag, value)
    assert code == 2 and out == ""
    assert err.count("\n") == 1  # one line: no usage block, and no model was loaded
    assert f"argument {flag}: must be a whole number from 1 to {high}" in err and repr(value) in err


@pytest.mark.probe("cli-numbers")
def test_eval_numbers_are_refused_before_loading(capsys, tmp_path):
    code, _, err = _main(capsys, "eval", "--task", "relay:1", "--output", str(tmp_path), "--rounds", "1e23")
    assert code == 2 and "argument --rounds: must be a whole number from 1 to 32" in err
    assert not any(tmp_path.iterdir())


@pytest.mark.probe("cli-numbers")
@pytest.mark.parametrize(
    "command, args, fix",
    [
        ("run", ["--latent-steps", "600"], "--latent-steps at most"),
        ("run", ["--max-new-tokens", "1000"], "--max-new-tokens at most"),
        ("run", ["--mode", "single", "--max-new-tokens", "2000"], "--max-new-tokens at most"),
        ("demo", ["--latent-steps", "600"], "--latent-steps at most"),
    ],
)
def test_lengths_beyond_the_context_window_are_refused_after_loading(capsys, command, args, fix):
    extra = ["hi"] if command == "run" else []
    code, out, err = _main(capsys, command, "--preset", "tiny-random", *extra, *args)
    assert code == 2 and out == ""
    [line] = [x for x in err.splitlines() if x.startswith("recursivemas: error:")]
    assert "context positions" in line and fix in line and "of its 1024" in line


@pytest.mark.probe("cli-numbers")
def test_the_named_latent_step_bound_fits(capsys):
    _, _, err = _run(capsys, "hi", "--latent-steps", "600", "--max-new-tokens", "4")
    bound = int(re.search(r"--latent-steps at most (\d+)", err).group(1))
    assert 1 < bound < 600
    code, _, err = _run(capsys, "hi", "--latent-steps", str(bound + 1), "--max-new-tokens", "4")
    assert code == 2 and f"--latent-steps at most {bound}" in err
