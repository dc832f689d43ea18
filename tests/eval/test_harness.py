"""The evaluation harness on the tiny-random preset: fairness, batch invariance, sharding, reports."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from recursivemas import build_preset
from recursivemas.cli import main
from recursivemas.errors import ConfigError
from recursivemas.eval.harness import (
    EvalSettings,
    ModeRun,
    Prediction,
    choose_latent_steps,
    run_mode,
    summarize,
)
from recursivemas.eval.tasks import load_task
from tests.conftest import accelerate_cpu_launch

FAST = [
    "--preset",
    "tiny-random",
    "--rounds",
    "2",
    "--latent-steps",
    "3",
    "--max-new-tokens",
    "6",
    "--temperature",
    "0",
    "--seeds",
    "0",
]


FREE_STEPS = [a for a in FAST if a not in ("--latent-steps", "3")]  # tests that set the steps


def _eval(tmp_path: Path, name: str, *args: str) -> dict:
    out = tmp_path / name
    assert main(["eval", *FAST, "--output", str(out), *args]) == 0
    return json.loads((out / "summary.json").read_text())


def test_eval_writes_summary_report_predictions_and_plots(tmp_path, capsys):
    summary = _eval(tmp_path, "run", "--task", "relay:1", "--limit", "4")
    out = tmp_path / "run"
    assert sorted(p.name for p in out.iterdir()) == [
        "accuracy.png",
        "cost.png",
        "predictions.jsonl",
        "report.md",
        "summary.json",
    ]
    assert summary["task"] == "relay:1" and set(summary["modes"]) == {
        "single",
        "text",
        "latent",
        "latent-free",
    }
    for mode, m in summary["modes"].items():
        latent = mode.startswith("latent")
        assert set(m) == {
            "accuracy",
            "accuracy_std",
            "accuracy_ci95",
            "distinct_answers",
            "n",
            "decoded_tokens_mean",
            "latent_steps_mean",
            "seconds_total",
            "peak_memory_bytes",
        } | ({"diagnostics"} if latent else set())
        assert m["n"] == 4 and 0 <= m["accuracy"] <= 1 and m["peak_memory_bytes"] > 0
        low, high = m["accuracy_ci95"]
        assert 0 <= low <= m["accuracy"] <= high <= 1
        assert 1 <= m["distinct_answers"] <= 4 * 3  # questions x seeds
        if latent:  # relay's lens diagnostic: per hop, the share of questions whose fact it recovered
            assert {"lens:planner", "lens:planner->critic", "lens:critic->solver"} <= set(m["diagnostics"])
            assert all(0 <= v <= 1 for v in m["diagnostics"].values())
    assert summary["modes"]["latent"]["latent_steps_mean"] == (3 * 2 - 1) * 3
    assert summary["modes"]["text"]["latent_steps_mean"] == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and {"id", "mode", "seed", "text", "correct", "trace"} <= set(rows[0])
    report = (out / "report.md").read_text()
    assert "Scoring: strict" in report and "## Command" in report and "recursivemas" in report


def test_merge_adds_modes_to_an_earlier_report(tmp_path):
    """``--merge`` reruns only the given modes and keeps the others of the report in --output: the merged
    report equals one run of every mode; other settings are refused and nothing is overwritten."""
    args = ["--task", "relay:1", "--limit", "4"]
    whole = _eval(tmp_path, "whole", *args)
    _eval(tmp_path, "parts", *args, "--modes", "single,text,latent-free")
    merged = _eval(tmp_path, "parts", *args, "--modes", "latent", "--merge")
    assert list(merged["modes"]) == ["single", "text", "latent", "latent-free"]
    assert merged["settings"]["modes"] == list(merged["modes"])
    for mode, m in whole["modes"].items():
        for key in ("accuracy", "distinct_answers", "n", "decoded_tokens_mean", "latent_steps_mean"):
            assert merged["modes"][mode][key] == m[key], (mode, key)

    def answers(name: str) -> list:
        lines = (tmp_path / name / "predictions.jsonl").read_text().splitlines()
        return [(r["mode"], r["id"], r["text"]) for r in map(json.loads, lines)]

    assert answers("parts") == answers("whole")
    assert (
        "# merged with the modes single, text, latent-free of: recursivemas"
        in (tmp_path / "parts" / "report.md").read_text()
    )
    before = (tmp_path / "parts" / "summary.json").read_text()
    assert main(["eval", *FAST, "--output", str(tmp_path / "parts"), *args, "--rounds", "1", "--merge"]) == 2
    assert (tmp_path / "parts" / "summary.json").read_text() == before


def test_reports_record_compile_and_merge_only_with_the_same(tmp_path, capsys):
    """``--compile`` is in the report's settings; a report from before that key counts as eager, and a
    compiled run is not merged into an eager report."""
    args = ["--task", "relay:1", "--limit", "2"]
    first = _eval(tmp_path, "r", *args, "--modes", "single")
    assert first["settings"]["compile"] is False
    summary = tmp_path / "r" / "summary.json"
    legacy = json.loads(summary.read_text())
    del legacy["settings"]["compile"]
    summary.write_text(json.dumps(legacy))
    merged = _eval(tmp_path, "r", *args, "--modes", "latent", "--merge")
    assert list(merged["modes"]) == ["single", "latent"] and merged["settings"]["compile"] is False
    before = summary.read_text()
    argv = ["eval", *FAST, "--output", str(tmp_path / "r"), *args, "--modes", "text", "--compile", "--merge"]
    assert main(argv) == 2
    assert "other settings (compile)" in capsys.readouterr().err
    assert summary.read_text() == before


@pytest.mark.parametrize(
    "args, fix",
    [
        (["--latent-steps", "30000"], "--latent-steps at most"),
        (["--val-size", "2", "--sweep-latent-steps", "2,30000"], "--sweep-latent-steps values at most"),
        (["--modes", "text", "--val-size", "2", "--sweep-latent-steps", "2,30000"], "--sweep-latent-steps"),
        (["--modes", "single,text", "--max-new-tokens", "30000"], "--max-new-tokens at most"),
    ],
)
def test_lengths_past_the_context_window_are_refused_before_any_question(tmp_path, capsys, args, fix):
    """Every mode's budget is checked once the models are loaded: a run whose latent mode cannot fit
    does not first spend its time on the other modes, nor a sweep on its smaller candidates (a sweep
    runs latent mode whatever ``--modes`` says)."""
    out = tmp_path / "out"
    assert main(["eval", *FREE_STEPS, "--task", "relay:1", "--limit", "2", "--output", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert "context" in err and fix in err and "eval relay:1" not in err
    assert not (out / "summary.json").exists()


@pytest.mark.parametrize("values", ["0,4", "4,40000", "-1"])
def test_sweep_values_out_of_range_are_refused(tmp_path, capsys, values):
    argv = [
        "eval",
        *FREE_STEPS,
        "--task",
        "relay:1",
        "--output",
        str(tmp_path),
        f"--sweep-latent-steps={values}",
    ]
    assert main(argv) == 2
    assert "--sweep-latent-steps values must be between 1 and" in capsys.readouterr().err


def test_predictions_do_not_depend_on_batch_size(tmp_path):
    task = load_task("reasoning-gym:basic_arithmetic", limit=8, data_seed=1)
    system = build_preset("tiny-random", rounds=2, latent_steps=3)
    texts = {}
    for batch_size in (1, 8):
        settings = EvalSettings(
            modes=("latent",), seeds=(0,), batch_size=batch_size, max_new_tokens=8, temperature=0.0
        )
        for mode in ("single", "text", "latent", "latent-free"):
            run = run_mode(system, task, task.examples, mode, settings)
            texts[(batch_size, mode)] = [(p.text, p.correct) for p in run.predictions]
    for mode in ("single", "text", "latent", "latent-free"):
        assert texts[(1, mode)] == texts[(8, mode)]


@pytest.mark.parametrize("temperature", ["0", "0.8"])
def test_sharded_run_matches_single_process(tmp_path, temperature):
    """Sharding changes nothing, in float32. Int8 runs are not bit-stable across batch compositions: on an
    AVX2 CPU (int8 over float32 agents) the shards' batches of 3 and 2 questions, against one process's 5,
    tipped a near-tied greedy token of the random tiny models."""
    args = ["--task", "relay:1", "--limit", "5", "--modes", "single,latent", "--temperature", temperature]
    args += ["--dtype", "float32"]
    single = _eval(tmp_path, "one", *args)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = accelerate_cpu_launch(2, "eval", *FAST, *args, "--output", str(tmp_path / "two"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sharded = json.loads((tmp_path / "two" / "summary.json").read_text())
    timing = ("seconds_total", "peak_memory_bytes")
    for mode in ("single", "latent"):
        a = {k: v for k, v in single["modes"][mode].items() if k not in timing}
        b = {k: v for k, v in sharded["modes"][mode].items() if k not in timing}
        assert a == b
    assert sharded["settings"]["processes"] == 2
    one = (tmp_path / "one" / "predictions.jsonl").read_text().splitlines()
    two = (tmp_path / "two" / "predictions.jsonl").read_text().splitlines()
    strip = [{k: v for k, v in json.loads(x).items() if k != "trace"} for x in one]
    assert strip == [{k: v for k, v in json.loads(x).items() if k != "trace"} for x in two]
    assert not (tmp_path / "two" / ".shards").exists()


def test_latent_steps_are_chosen_on_validation_only(capsys):
    task = load_task("relay:1", limit=3, val_size=3)
    system = build_preset("tiny-random", rounds=1, latent_steps=3)
    settings = EvalSettings(seeds=(0,), max_new_tokens=6, temperature=0.0)
    best, accuracy = choose_latent_steps(system, task, [2, 4], settings)
    assert best in (2, 4) and set(accuracy) == {2, 4}
    with pytest.raises(ConfigError, match="validation split"):
        choose_latent_steps(system, load_task("relay:1", limit=3), [2, 4], settings)
    code = main(
        [
            "eval",
            "--preset",
            "tiny-random",
            "--task",
            "relay:1",
            "--val-size",
            "2",
            "--sweep-latent-steps",
            "2,4",
            "--latent-steps",
            "3",
        ]
    )
    assert code == 2 and "either --latent-steps or --sweep-latent-steps" in capsys.readouterr().err


def test_sweep_through_the_cli_reports_the_choice(tmp_path):
    out = tmp_path / "sw"
    args = [
        "eval",
        "--preset",
        "tiny-random",
        "--rounds",
        "1",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0",
        "--seeds",
        "0",
        "--task",
        "relay:1",
        "--limit",
        "3",
        "--val-size",
        "3",
        "--modes",
        "latent",
        "--sweep-latent-steps",
        "2,4",
        "--output",
        str(out),
    ]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["latent_steps"] in (2, 4)
    assert "chosen on a validation split" in (out / "report.md").read_text()


def test_summary_pools_shards():
    def pred(i, seed, correct):
        return Prediction(f"q{i}", "latent", seed, "q", "g", "t", None, correct, 4, 8)

    parts = [
        ModeRun([pred(0, 0, True), pred(0, 1, False)], 1.0, 10),
        ModeRun([pred(1, 0, True), pred(1, 1, True)], 2.0, 20),
    ]
    s = summarize({"latent": parts}, (0, 1))["latent"]
    assert (
        s["accuracy"] == 0.75 and s["n"] == 2 and s["seconds_total"] == 3.0 and s["peak_memory_bytes"] == 20
    )
    assert abs(s["accuracy_std"] - 0.3535533905932738) < 1e-12


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "nonsense"], "unknown task spec"),
        (["--task", "jsonl:/no/file.jsonl"], "does not exist"),
        (["--task", "relay", "--modes", "latent,psychic"], "unknown modes"),
        (["--task", "relay", "--seeds", "a,b"], "comma-separated integers"),
        (["--task", "relay", "--limit", "0"], "--limit must be >= 1"),
    ],
)
def test_bad_eval_input_is_a_clear_error(capsys, tmp_path, args, message):
    code = main(["eval", "--preset", "tiny-random", "--output", str(tmp_path / "x"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_cli_mode_list_matches_the_harness():
    from recursivemas import cli
    from recursivemas.eval.harness import EVAL_MODES

    assert ",".join(EVAL_MODES) == cli.EVAL_MODES
