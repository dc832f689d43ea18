"""``--dtype int8``: int8 weight-only agents (``recursivemas.quantize``) and the LM-head input hook."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from recursivemas import quantize
from recursivemas.cli import main
from recursivemas.errors import ConfigError
from recursivemas.loading import load_system
from recursivemas.quantize import INT8_MAX_ROWS, Int8Linear, quantize_module

from .test_fast_step import teacher_forced_logits

QUESTIONS = ["What is 12 plus 30?", "If x + 7 = 19, what is x?"]


@pytest.fixture(scope="module")
def int8_system():
    return load_system("tiny-random", None, "int8", "cpu")


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("rows", [1, INT8_MAX_ROWS, INT8_MAX_ROWS + 1, 40])
def test_int8_linear_is_close_to_the_linear_on_both_paths(rows):
    linear = nn.Linear(96, 80, bias=True)
    x = torch.randn(rows, 3, 96) if rows > INT8_MAX_ROWS else torch.randn(rows, 96)
    out = Int8Linear(linear)(x)
    assert out.dtype == torch.bfloat16 and out.shape == (*x.shape[:-1], 80)
    assert _relative_error(out, linear(x)) < 0.02
    assert _relative_error(Int8Linear(linear).dequantized(), linear.weight) < 0.01


def test_int8_linear_multiplies_many_rows_by_its_bfloat16_weight_exactly():
    """Prompt passes (more than ``INT8_MAX_ROWS`` rows) compute as ``--dtype bfloat16`` does, with the weight
    the layer was loaded with (shared, not copied); only short inputs take the int8 kernel."""
    linear = nn.Linear(96, 80, bias=True).to(torch.bfloat16)
    layer = Int8Linear(linear)
    assert layer.weight.data_ptr() == linear.weight.data_ptr()
    x = torch.randn(INT8_MAX_ROWS + 1, 96, dtype=torch.bfloat16)
    assert torch.equal(layer(x), linear(x))
    assert not torch.equal(layer(x[:1]), linear(x[:1]))  # the int8 path rounds the weight


def test_quantize_module_replaces_every_linear():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4), nn.LayerNorm(4)))
    assert quantize_module(model) == 2
    assert not any(isinstance(m, nn.Linear) for m in model.modules())


def test_int8_system_quantises_backbones_and_keeps_links_float32(int8_system):
    reference = load_system("tiny-random", None, "float32", "cpu")
    for name, agent in int8_system.agents.items():
        assert agent.dtype == torch.bfloat16
        assert not any(isinstance(m, nn.Linear) for m in agent.backbone.modules())
        assert any(isinstance(m, Int8Linear) for m in agent.backbone.modules())
        head = agent.model.get_output_embeddings()
        assert isinstance(head, Int8Linear) and head.weight.dtype == torch.bfloat16
        if agent.model.config.get_text_config().tie_word_embeddings:  # still one bfloat16 table
            assert head.weight.data_ptr() == agent.model.get_input_embeddings().weight.data_ptr()
        assert agent.fingerprint() == reference.agents[name].fingerprint()
    assert {p.dtype for p in int8_system.links.parameters()} == {torch.float32}


def test_int8_steps_follow_bfloat16(int8_system):
    """Int8 weights change the tiny models' one-position step logits by about 2% of their scale against
    bfloat16 (measured: 2.0-2.5%; a wrong scale or layout shows at 50% and more), teacher-forced on the
    same tokens so that near-tied greedy choices of random tiny models cannot make the inputs part."""
    bf16 = load_system("tiny-random", None, "bfloat16", "cpu")
    ids = torch.randint(3, 200, (len(QUESTIONS), 8), generator=torch.Generator().manual_seed(0))
    for name, agent in int8_system.agents.items():
        logits = []
        for a in (agent, bf16.agents[name]):
            batch = a.encode([a.fill(a.render(q, None, set()), {}) for q in QUESTIONS])
            logits.append(teacher_forced_logits(a, batch, ids)[0][:, 1:])  # the steps: (B, 8, V)
        ours, theirs = logits
        assert float((ours - theirs).abs().max()) <= 0.06 * float(theirs.abs().max()), name


def test_missing_kernel_is_a_clear_error(monkeypatch):
    monkeypatch.delattr(torch, quantize.INT8_KERNEL)
    with pytest.raises(ConfigError, match=r"int8 weight-only kernel.*install"):
        load_system("tiny-random", None, "int8", "cpu")


def test_int8_needs_bfloat16_agents_on_the_cpu():
    with pytest.raises(ConfigError, match="bfloat16 agents"):
        quantize.quantize_agents(load_system("tiny-random", None, "float32", "cpu"))
    with pytest.raises(ConfigError, match="unknown --dtype"):
        load_system("tiny-random", None, "int4", "cpu")


@pytest.mark.parametrize("batch", [1, 2])
def test_lm_head_reads_row_major_inputs(batch):
    """The last position of a (B, T, d) batch, as transformers slices it, reaches a bf16 head row-major."""
    bf16 = load_system("tiny-random", None, "bfloat16", "cpu")
    head = next(iter(bf16.agents.values())).model.get_output_embeddings()
    x = torch.randn(batch, 5, head.in_features, dtype=head.weight.dtype)[:, -1:]
    seen = []
    handle = head.register_forward_pre_hook(lambda m, args: seen.append(args[0].stride()))
    try:
        assert torch.equal(head(x), nn.functional.linear(x.contiguous(), head.weight, head.bias))
    finally:
        handle.remove()
    assert seen == [(head.in_features, head.in_features, 1)]


@pytest.mark.parametrize("batch", [1, 2, INT8_MAX_ROWS + 1])
def test_int8_head_gives_strided_last_positions_the_contiguous_result(int8_system, batch):
    head = next(iter(int8_system.agents.values())).model.get_output_embeddings()
    x = torch.randn(batch, 5, head.in_features, dtype=torch.bfloat16)[:, -1:]
    assert torch.equal(head(x), head(x.contiguous()))


def test_cli_runs_with_dtype_int8(capsys):
    args = ["run", "--preset", "tiny-random", "What is 2+2?", "--dtype", "int8", "--rounds", "1"]
    assert main([*args, "--latent-steps", "2", "--max-new-tokens", "3"]) == 0
    assert "int8" in capsys.readouterr().err


@pytest.mark.parametrize("rows", [1, INT8_MAX_ROWS, INT8_MAX_ROWS + 1])
@pytest.mark.parametrize("bias", [False, True])
def test_step_op_equals_forward(rows, bias):
    """``Int8Linear.step_op``, the plain function ``FastSteps`` calls, picks the kernel ``forward`` picks."""
    torch.manual_seed(0)
    layer = Int8Linear(nn.Linear(32, 48, bias=bias).to(torch.bfloat16))
    x = torch.randn(rows, 32, dtype=torch.bfloat16)
    assert torch.equal(layer.step_op(rows)(x), layer(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantisation_is_symmetric_per_row_and_leaves_the_source_alone(dtype):
    """``Int8Linear`` rounds w / s with s = max |w| / 127 per output row (computed without float32 copies
    of the weight) and does not touch the layer it was built from."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 48).to(dtype)
    source = linear.weight.detach().clone()
    layer = Int8Linear(linear)
    assert torch.equal(linear.weight, source)
    scales = source.float().abs().amax(dim=1).clamp(min=1e-12) / 127
    assert torch.equal(layer.scales, scales.to(torch.bfloat16))
    expected = (source.float() / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
    assert torch.equal(layer.qweight, expected)
