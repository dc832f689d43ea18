"""The trainer end to end on the tiny-random system: frozen backbones, learning, checkpoints, resume
after SIGKILL, and two-process data parallelism under ``accelerate launch --cpu``."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml

from recursivemas.checkpoint import from_pretrained
from recursivemas.errors import CheckpointError, ConfigError
from recursivemas.train.state import latest_checkpoint
from recursivemas.train.trainer import Trainer
from tests.conftest import accelerate_cpu_launch
from tests.train.conftest import TINY

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _model_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {
        f"{a}.{n}": t.clone() for a, m in trainer.system.models().items() for n, t in m.state_dict().items()
    }


@pytest.mark.parametrize("stage", ["inner", "outer"])
def test_links_only_training_leaves_backbones_bit_identical(make_config, stage):
    trainer = Trainer(make_config(stage=stage, optim={"max_steps": 3}))
    before = _model_state(trainer)
    links_before = {k: v.clone() for k, v in trainer.system.links.state_dict().items()}
    report = trainer.run()
    after = _model_state(trainer)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical
    for agent in trainer.system.agents.values():
        assert all(p.grad is None for p in agent.model.parameters())
    # optimizer state exists only for the stage's links, and those (only those) moved
    state_ids = {id(p) for p in trainer.optimizer.state}
    assert state_ids == {id(p) for p in trainer.system.links[stage].parameters()}
    changed = {k for k, v in trainer.system.links.state_dict().items() if not torch.equal(v, links_before[k])}
    assert changed and all(k.startswith(f"{stage}.") for k in changed)
    assert report.trainable_parameters == sum(p.numel() for p in trainer.system.links[stage].parameters())
    assert report.peak_memory_bytes > 0


def test_bfloat16_agents_train_float32_links(make_config):
    trainer = Trainer(make_config(system={"dtype": "bfloat16"}, optim={"max_steps": 2}))
    assert {a.dtype for a in trainer.system.agents.values()} == {torch.bfloat16}
    before = _model_state(trainer)
    report = trainer.run()
    assert math.isfinite(report.final_train_loss) and math.isfinite(report.final_validation_loss)
    assert {p.dtype for p in trainer.system.links.parameters()} == {torch.float32}
    assert all(torch.equal(before[k], v) for k, v in _model_state(trainer).items())


def test_full_training_moves_backbone_weights(make_config):
    trainer = Trainer(make_config(trainable="full", optim={"max_steps": 2}))
    before = _model_state(trainer)
    report = trainer.run()
    after = _model_state(trainer)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert report.trainable_parameters > 5 * report.frozen_parameters
    saved = Path(report.output) / "final" / "agents"
    assert {p.name for p in saved.iterdir()} == set(trainer.system.agents)  # the fine-tuned weights


def test_outer_training_lowers_the_loss_and_writes_outputs(make_config):
    cfg = make_config(
        data={"sources": [{"kind": "relay", "n": 4}], "validation": 0},
        optim={"max_steps": 30, "lr": 1e-2, "batch_size": 4, "warmup_steps": 2},
        run={"checkpoint_every": 30, "validate_every": 30},
    )
    trainer = Trainer(cfg, command="recursivemas train -c test.yaml")
    report = trainer.run()
    out = Path(cfg.run.output)
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    train = [r for r in log if r["kind"] == "train"]
    assert len(train) == 30
    assert train[-1]["loss"] < 0.85 * train[0]["loss"]  # links alone move a random model's answer CE
    assert set(train[0]["round_grad_norm"]) == {"1", "2"} and "all" in train[0]["grad_norm"]
    assert (out / "curves.png").stat().st_size > 1000
    assert json.loads((out / "report.json").read_text())["steps"] == report.steps == 30
    saved = from_pretrained(out / "final", agents=list(trainer.system.agents.values()))
    for key, value in trainer.system.links.state_dict().items():
        assert torch.equal(saved.links.state_dict()[key], value.cpu())
    assert "recursivemas train -c test.yaml" in (out / "final" / "README.md").read_text()


def test_existing_checkpoints_need_resume_and_the_same_config(make_config):
    Trainer(make_config()).run()
    with pytest.raises(ConfigError, match="--resume"):
        Trainer(make_config()).run()
    with pytest.raises(CheckpointError, match=r"\['objective'\]"):
        Trainer(make_config(objective={"intermediate_weight": 0.5})).run(resume=True)
    with pytest.raises(CheckpointError, match=r"\['optim'\]"):
        Trainer(make_config(optim={"lr": 1e-3})).run(resume=True)
    resumed = Trainer(make_config(optim={"max_steps": 6}))
    assert resumed.run(resume=True).steps == 6


def test_a_fresh_run_starts_a_fresh_log(make_config):
    cfg = make_config(optim={"max_steps": 2})
    log = Path(cfg.run.output) / "train_log.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text('{"kind": "train", "step": 7, "loss": 1.0}\n{"kind": "tra')  # stale, cut short
    Trainer(cfg).run()
    steps = [json.loads(x)["step"] for x in log.read_text().splitlines() if '"train"' in x]
    assert steps == [1, 2]


def test_resume_rejects_a_corrupt_checkpoint_and_cleans_partial_ones(make_config):
    cfg = make_config()
    Trainer(cfg).run()
    root = Path(cfg.run.output) / "checkpoints"
    (root / ".tmp-step-000009").mkdir()  # what a kill during a write leaves
    ckpt = latest_checkpoint(root)
    data = bytearray((ckpt / "trainable.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (ckpt / "trainable.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt checkpoint"):
        Trainer(make_config(optim={"max_steps": 6})).run(resume=True)
    assert not (root / ".tmp-step-000009").exists()


def _write_config(tmp_path: Path, name: str, **run) -> Path:
    raw = json.loads(json.dumps(TINY))
    raw["optim"].update({"max_steps": 40})
    raw["run"].update({"output": str(tmp_path / name), "checkpoint_every": 4, "validate_every": 40, **run})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _train(config: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "recursivemas", "train", "-c", str(config), *extra],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _links(output: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(output / "final" / "link_model.safetensors")


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    reference = _write_config(tmp_path, "reference")
    assert _train(reference).returncode == 0
    killed = _write_config(tmp_path, "killed")
    proc = subprocess.Popen(
        [sys.executable, "-m", "recursivemas", "train", "-c", str(killed)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    root = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (root / "latest").is_file() and (root / "latest").read_text().strip() >= "step-000008":
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / "final").exists()
    resumed = _train(killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    want, got = _links(tmp_path / "reference"), _links(tmp_path / "killed")
    assert want.keys() == got.keys()
    for key in want:
        assert torch.allclose(want[key], got[key], atol=1e-6, rtol=0), key
    steps = [
        json.loads(x)["step"] for x in (tmp_path / "killed" / "train_log.jsonl").read_text().splitlines()
    ]
    train_steps = [s for s in steps if s]
    assert sorted(set(train_steps)) == list(range(1, 41))


def test_accelerate_launch_cpu_two_processes_end_identical(tmp_path):
    config = _write_config(tmp_path, "ddp")
    raw = yaml.safe_load(config.read_text())
    raw["optim"]["max_steps"] = 3
    config.write_text(yaml.safe_dump(raw))
    result = subprocess.run(
        accelerate_cpu_launch(2, "train", "-c", str(config)),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "ddp" / "report.json").read_text())
    assert report["processes"] == 2, result.stderr[-2000:]
    assert len(report["replica_digests"]) == 2 and len(set(report["replica_digests"])) == 1


def test_link_windows_widen_a_loaded_link_and_train_its_window(make_config, tmp_path):
    Trainer(make_config(optim={"max_steps": 2}), command="pytest").run()
    start = Path(tmp_path / "run" / "final")
    cfg = make_config(
        system={"links": str(start), "link_windows": {"critic->solver": 3}},
        optim={"max_steps": 3, "lr": 1e-2, "links": ["critic->solver"]},
        run={"output": str(tmp_path / "wide")},
    )
    trainer = Trainer(cfg, command="pytest")
    link = trainer.system.links["outer"]["critic->solver"]
    assert link.config.window == 3 and torch.all(link.window_proj.weight == 0)
    trainer.run()
    saved = from_pretrained(tmp_path / "wide" / "final", agents=list(trainer.system.agents.values()))
    widened = saved.links["outer"]["critic->solver"]
    assert widened.config.window == 3 and widened.window_proj.weight.abs().sum() > 0  # it learned
    bad = make_config(system={"link_windows": {"planner": 2}}, run={"output": str(tmp_path / "x")})
    with pytest.raises(ConfigError, match="outer links are"):
        Trainer(bad, command="pytest")
