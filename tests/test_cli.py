"""``recursivemas run``: the JSON Lines contract, human output, and clear errors for bad input; the system
every command loads (``--dtype``, ``--compile``)."""

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import recursivemas.serve
from recursivemas import RecursiveMAS, StepConfig, build_preset, cli, quantize
from recursivemas.cli import main
from recursivemas.errors import ConfigError
from recursivemas.eval import run as eval_run
from recursivemas.loading import DTYPE_CHOICES, load_system, resolve_dtype
from recursivemas.models import dtype_name
from recursivemas.quantize import Int8Linear

FAST = ["--rounds", "2", "--latent-steps", "4", "--max-new-tokens", "6"]


def _run(capsys, *args):
    """``recursivemas run ARGS`` on the tiny-random preset unless a checkpoint is named; an argument
    error (argparse's ``SystemExit``) gives its exit status like any other."""
    preset = [] if "--checkpoint" in args else ["--preset", "tiny-random"]
    try:
        code = main(["run", *preset, *args])
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def test_json_lines_contract(capsys):
    code, out, _ = _run(capsys, "What is 2+2?", "What is 3+3?", "--json", *FAST)
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["question"] for r in rows] == ["What is 2+2?", "What is 3+3?"]
    for r in rows:
        assert {"question", "mode", "text", "answer", "usage", "timings", "trace"} <= set(r)
        assert {"prompt_tokens", "decoded_tokens", "latent_steps"} <= set(r["usage"])
        assert r["usage"]["latent_steps"] == sum(s["latent_steps"] for s in r["trace"]) == 5 * 4
        assert r["usage"]["decoded_tokens"] == sum(s["decoded_tokens"] for s in r["trace"])
        assert r["timings"]["total_s"] > 0 and r["mode"] == "latent"


@pytest.mark.parametrize("mode", ["text", "single"])
def test_modes_and_no_kv_cache(capsys, mode):
    code, out, _ = _run(capsys, "What is 2+2?", "--json", "--mode", mode, "--no-kv-cache", *FAST)
    assert code == 0 and json.loads(out)["mode"] == mode


def test_input_files(capsys, tmp_path):
    txt = tmp_path / "q.txt"
    txt.write_text("What is 2+2?\n\nWhat is 5+1?\n")
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text(json.dumps({"question": "Code?", "context": {"planner": "It is 7."}}) + "\n")
    code, out, _ = _run(capsys, "--input", str(txt), "--json", *FAST)
    assert code == 0 and len(out.splitlines()) == 2
    code, out, _ = _run(capsys, "--input", str(jsonl), "--json", *FAST)
    assert code == 0 and json.loads(out)["question"] == "Code?"


def test_human_output(capsys):
    code, out, _ = _run(capsys, "What is 2+2?", *FAST)
    assert code == 0 and out.startswith("Q: What is 2+2?\nA: ") and "latent steps" in out


def _nan_checkpoint(tmp_path):
    system = build_preset("tiny-random", rounds=2, latent_steps=4)
    with torch.no_grad():
        system.inner("critic").proj2.bias.fill_(float("nan"))
    system.save_pretrained(str(tmp_path / "nan"))
    return str(tmp_path / "nan")


def _bad_cases(tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9?".encode("latin-1"))
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('\n{"question": oops}\n')
    other = tmp_path / "other"
    system = build_preset("tiny-random", rounds=2, latent_steps=4)
    system.save_pretrained(str(other))
    config = json.loads((other / "link_config.json").read_text())
    config["agents"][0]["model"] = "tiny-random:qwen3"
    (other / "link_config.json").write_text(json.dumps(config))
    return {
        "empty": (["   "], "empty or only whitespace"),
        "nothing": ([], "no question given"),
        "too long": (["seven " * 1200], "context window"),
        "bad line": (["--input", str(bad_jsonl)], "bad.jsonl line 2 is not valid JSON"),
        "missing file": (["--input", str(tmp_path / "nope.jsonl")], "does not exist"),
        "other agents": (["hi", "--checkpoint", str(other)], "does not fit these agents"),
        "nan": (["hi", "--checkpoint", _nan_checkpoint(tmp_path)], "agent 'critic' in round 1"),
        "cuda": (
            ["hi", "--device", "cuda"] if not torch.cuda.is_available() else ["hi", "--device", "tpu"],
            "device",
        ),
        "rounds": (["hi", "--rounds", "0"], "--rounds: must be a whole number from 1 to"),
        "temperature": (["hi", "--temperature", "-1"], "temperature must be 0 (greedy)"),
        "nan temperature": (["hi", "--temperature", "nan"], "temperature must be 0 (greedy)"),
        "huge seed": (["hi", "--seed", "99999999999999999999999"], "seed must be in"),
        "not utf-8": (["--input", str(latin1)], "not UTF-8"),
        "device": (["hi", "--device", "tpu"], "unknown --device"),
    }


BAD_CASES = [
    "empty",
    "nothing",
    "too long",
    "bad line",
    "missing file",
    "other agents",
    "nan",
    "cuda",
    "rounds",
    "temperature",
    "nan temperature",
    "huge seed",
    "not utf-8",
    "device",
]


@pytest.fixture(scope="module")
def bad_cases(tmp_path_factory):
    cases = _bad_cases(tmp_path_factory.mktemp("bad"))
    assert sorted(cases) == sorted(BAD_CASES)
    return cases


@pytest.mark.parametrize("name", BAD_CASES)
def test_bad_input_gets_a_clear_error_and_exit_2(capsys, bad_cases, name):
    args, message = bad_cases[name]
    code, out, err = _run(capsys, *FAST, *args)
    assert code == 2
    assert message in err
    assert "Traceback" not in err and out == ""


def test_unknown_slot_from_a_checkpoint_graph(capsys, tmp_path):
    build_preset("tiny-random", rounds=2, latent_steps=4).save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "link_config.json").read_text())
    config["graph"]["edges"][0]["slot"] = "plan"
    (tmp_path / "link_config.json").write_text(json.dumps(config))
    code, _, err = _run(capsys, "hi", "--checkpoint", str(tmp_path))
    assert code == 2 and "unknown slot 'plan' for agent 'critic'" in err


def test_console_script_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "recursivemas", "run", "   "], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "empty" in proc.stderr and "Traceback" not in proc.stderr


def test_trace_shows_stages_and_latent_lens(capsys):
    code, out, _ = _run(capsys, "What is 2+2?", "--trace", *FAST)
    assert code == 0
    assert "round  agent" in out and "lens (own table):" in out and "lens (as critic reads it):" in out
    code, out, _ = _run(capsys, "What is 2+2?", "--trace", "--json", *FAST)
    stages = json.loads(out)["trace"]
    lens = stages[0]["lens"]
    assert set(lens) == {"planner", "critic"} and len(lens["planner"]) == 4 and len(lens["planner"][0]) == 3
    assert stages[-1]["lens"] is None  # text stages have no lens


def test_chat_loop(capsys, monkeypatch):
    monkeypatch.setattr(
        sys, "stdin", io.StringIO("What is 2+2?\n\n/mode text\n   \n/mode nonsense\nHi there\n/quit\n")
    )
    code = main(["chat", "--preset", "tiny-random", *FAST])
    out, err = capsys.readouterr()
    assert code == 0
    assert out.count("Q: ") == 2 and "[latent]" in out and "[text]" in out
    assert "modes are" in err


def test_demo_compares_modes(capsys):
    code = main(["demo", "--preset", "tiny-random", *FAST])
    out, _ = capsys.readouterr()
    assert code == 0
    assert "=== latent mode" in out and "=== text mode" in out and "fewer tokens" in out
    assert "answering " in out and "not an accuracy one" in out  # a token saving never without answers


def test_models_lists_presets_and_cache_state(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in (
        "smollm2-gemma3 (default)",
        "tiny-random",
        "smollm2-135m",
        "gemma3-270m",
        "tiny-random:gemma3",
    ):
        assert name in out
    assert "cached" in out


def test_models_reports_the_quantised_layer_cache(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("RECURSIVEMAS_CACHE", str(tmp_path))
    (tmp_path / "int8").mkdir()
    (tmp_path / "int8" / "model-int8-0123.safetensors").write_bytes(b"x" * 2_000_000)
    assert main(["models"]) == 0
    assert f"1 file(s), 0.00 GB in {tmp_path / 'int8'}" in capsys.readouterr().out


def test_unknown_preset_lists_valid_ones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "hi", "--preset", "nope"])
    assert exit_info.value.code == 2
    assert "smollm2-gemma3" in capsys.readouterr().err


# --- the system each command loads: --dtype and --compile ----------------------------------------------


LOADING_COMMANDS = ["run", "chat", "demo", "eval", "serve"]


class Loaded(Exception):
    """Carries the system a command loaded out of the command, which stops there."""

    def __init__(self, system: RecursiveMAS) -> None:
        super().__init__("loaded")
        self.system = system


def loaded_by(monkeypatch: pytest.MonkeyPatch, *argv: str) -> RecursiveMAS:
    """The system ``recursivemas ARGV`` loads, as the command gets it, before anything runs on it; for
    ``serve``, the system its server's load factory returns (no server starts)."""

    def load(*args: object, **kwargs: object) -> RecursiveMAS:
        raise Loaded(load_system(*args, **kwargs))

    for module in (cli, eval_run, recursivemas.serve):
        monkeypatch.setattr(module, "load_system", load)
    monkeypatch.setattr(recursivemas.serve, "run_server", lambda config, factory: factory())
    with pytest.raises(Loaded) as caught:
        main(list(argv))
    return caught.value.system


def command_line(command: str, tmp_path: Path) -> list[str]:
    """``COMMAND --preset tiny-random`` with the arguments it needs to reach loading."""
    needs = {"run": ["q"], "eval": ["--task", "relay:1", "--output", str(tmp_path)]}
    return [command, "--preset", "tiny-random", *needs.get(command, [])]


def _load_flags(command: str) -> dict[str, tuple]:
    """``--dtype`` and ``--compile`` of ``recursivemas COMMAND``: the choices, default and help of each."""
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    actions = sub.choices[command]._actions
    return {a.dest: (a.choices, a.default, a.help) for a in actions if a.dest in ("dtype", "compile")}


def test_every_loading_command_offers_the_same_dtype_and_compile_flags():
    """``--dtype`` (int8 included) and ``--compile`` have one set of choices and one help text."""
    run = _load_flags("run")
    assert run["dtype"][:2] == (DTYPE_CHOICES, "auto") and "int8" in DTYPE_CHOICES
    assert run["compile"][1] is False
    assert all(_load_flags(command) == run for command in LOADING_COMMANDS)


@pytest.mark.parametrize("command", LOADING_COMMANDS)
@pytest.mark.parametrize("flag, int8", [([], True), (["--dtype", "float32"], False)])
def test_cpu_default_is_int8_and_float32_stays_available(monkeypatch, tmp_path, command, flag, int8):
    """Without ``--dtype`` every command loads int8 agents on the CPU (``auto``); ``--dtype float32`` keeps
    full-precision agents."""
    system = loaded_by(monkeypatch, *command_line(command, tmp_path), *flag)
    for agent in system.agents.values():
        assert agent.dtype == (quantize.low_bit_agent_dtype() if int8 else torch.float32)
        assert any(isinstance(m, Int8Linear) for m in agent.model.modules()) == int8


def test_auto_dtype_is_float32_off_the_cpu_or_without_the_int8_kernel(monkeypatch):
    named = ("auto", "float32", "bfloat16")
    assert [resolve_dtype(d, "cpu") for d in named] == ["int8", "float32", "bfloat16"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_dtype("auto", "cuda:0") == resolve_dtype("auto", "mps") == "float32"
    monkeypatch.delattr(torch, quantize.INT8_KERNEL)
    assert resolve_dtype("auto", "cpu") == "float32"
    with pytest.raises(ConfigError, match="unknown --dtype 'int2'; choose one of auto, bfloat16"):
        resolve_dtype("int2", "cpu")


@pytest.mark.parametrize("device", ["gpu", "cuda:x"])
def test_eval_with_an_unknown_device_is_a_clear_error(tmp_path, capsys, device):
    argv = ["eval", "--preset", "tiny-random", "--task", "relay:1", "--limit", "1", "--device", device]
    assert main([*argv, "--output", str(tmp_path)]) == 2
    assert f"unknown --device {device!r}" in capsys.readouterr().err


def test_eval_report_names_the_dtype_that_ran(tmp_path):
    """An eval without ``--dtype`` records ``int8`` (what ``auto`` ran on the CPU), never ``auto``."""
    argv = ["eval", "--preset", "tiny-random", "--task", "relay:1", "--limit", "2", "--modes", "single"]
    assert main([*argv, "--max-new-tokens", "2", "--output", str(tmp_path)]) == 0
    settings = json.loads((tmp_path / "summary.json").read_text())["settings"]
    assert settings["dtype"] == "int8"
    assert settings["agent_dtype"] == dtype_name(quantize.low_bit_agent_dtype())


@pytest.mark.parametrize("command", LOADING_COMMANDS)
def test_dtype_int8_loads_int8_agents(monkeypatch, tmp_path, command):
    """``--dtype int8`` gives int8 weight-only backbones in every command, ``serve`` included."""
    system = loaded_by(monkeypatch, *command_line(command, tmp_path), "--dtype", "int8")
    for agent in system.agents.values():
        assert agent.dtype == quantize.low_bit_agent_dtype()
        assert any(isinstance(m, Int8Linear) for m in agent.backbone.modules())


@pytest.mark.parametrize("command", LOADING_COMMANDS)
@pytest.mark.parametrize("flag, compiled", [([], False), (["--compile"], True)])
def test_cli_compile_flag_sets_every_agents_steps(monkeypatch, tmp_path, command, flag, compiled):
    """Every command that loads a system takes ``--compile``; the system it runs (for ``serve``: the one its
    server's factory returns) has every agent's steps compiled, and only with the flag."""
    system = loaded_by(monkeypatch, *command_line(command, tmp_path), *flag)
    assert [a.step_config for a in system.agents.values()] == [StepConfig(compile=compiled)] * 3
