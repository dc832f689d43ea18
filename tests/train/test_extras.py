"""Pieces around the trainer: the CPU launcher hand-off, the softmax bridge, bf16 link checkpoints,
presets' link initialisation."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from recursivemas import build_preset
from recursivemas.checkpoint import from_pretrained
from recursivemas.distributed import _num_processes, cpu_processes_requested
from recursivemas.errors import ConfigError
from recursivemas.loading import load_system
from recursivemas.train.bridge import SoftmaxBridge, softmax_bridges
from recursivemas.train.data import build_splits
from recursivemas.train.objectives import UnrolledObjective


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["python", "/venv/bin/accelerate", "launch", "--cpu", "--num_processes", "2", "-m", "x"], 2),
        (["accelerate", "launch", "--num-processes=3", "--cpu", "train.py", "--num_processes", "9"], 3),
        (["accelerate", "launch", "--cpu", "train.py", "--num_processes", "9"], 1),
        (["python", "-m", "accelerate.commands.launch", "--cpu", "--num_processes=4", "t.py"], 4),
        (["python", "train.py"], 1),
    ],
)
def test_num_processes_is_read_from_the_launcher_command(argv, expected):
    assert _num_processes(argv) == expected


def test_no_relaunch_outside_accelerate_cpu(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    assert cpu_processes_requested() == 1
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("RANK", "0")  # already a worker (torchrun, or our own relaunch)
    assert cpu_processes_requested() == 1


def test_softmax_bridge_is_the_expected_soft_hand_off():
    w_out, table = torch.randn(7, 4), torch.randn(7, 3)
    x = torch.randn(2, 5, 4)
    expected = torch.softmax(x @ w_out.T / 0.5, -1) @ table
    assert torch.allclose(SoftmaxBridge(w_out, table, 0.5)(x), expected, atol=1e-6)


def test_bridged_system_runs_and_passes_gradients(tiny_system, make_config):
    bridged = softmax_bridges(tiny_system)
    assert all(isinstance(link, SoftmaxBridge) for group in bridged.links.values() for link in group.values())
    result = bridged.run(["What is 2 plus 2?"], latent_steps=3, rounds=2)[0]
    assert [s.kind for s in result.trace] == ["latent"] * 5 + ["text"] and result.usage[
        "latent_steps"
    ] == 5 * 3
    assert result.usage["decoded_tokens"] == result.trace[-1].decoded_tokens > 0
    rows = build_splits(make_config().data).train[:2]
    out = UnrolledObjective(bridged, make_config()).loss(rows)
    out.loss.backward()  # the bridges have no weights: the messages themselves carry the gradient
    norms = out.round_grad_norms()
    assert set(norms) == {1, 2} and all(v > 0 for v in norms.values())


def test_bfloat16_link_checkpoint_round_trip(tiny_system, tmp_path):
    tiny_system.save_pretrained(str(tmp_path / "ckpt"), dtype=torch.bfloat16, card="## Extra\n\ntext")
    stored = safetensors.torch.load_file(tmp_path / "ckpt" / "link_model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    loaded = from_pretrained(tmp_path / "ckpt", agents=list(tiny_system.agents.values()))
    for key, value in tiny_system.links.state_dict().items():
        got = loaded.links.state_dict()[key]
        assert got.dtype == torch.float32
        assert torch.equal(got, value.to(torch.bfloat16).float())
    assert "## Extra" in (tmp_path / "ckpt" / "README.md").read_text()


def test_presets_without_shipped_links_refuse_trained_init():
    with pytest.raises(ConfigError, match="ships no trained links"):
        build_preset("tiny-random", init="trained")


def test_init_does_not_apply_to_checkpoints(tmp_path):
    with pytest.raises(ConfigError, match="--init applies to presets"):
        load_system(None, str(tmp_path), "float32", "cpu", init="training-free")
