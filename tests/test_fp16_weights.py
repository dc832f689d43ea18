"""``--dtype fp16w``: float32 agents whose Linear layers multiply by float16 weights (``quantize.Fp16Linear``,
fbgemm's float16 GEMM)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from recursivemas import loading, quantize
from recursivemas.agent import Agent
from recursivemas.cli import main
from recursivemas.errors import ConfigError
from recursivemas.loading import load_system
from recursivemas.models.tiny import tiny_model
from recursivemas.prompts import ROLE_TEMPLATES
from recursivemas.quantize import FP16_WEIGHTS, Fp16Linear, fp16_weight_model

from .test_fast_step import ARCHS, QUESTIONS, _batch, _with, teacher_forced_logits

pytestmark = pytest.mark.skipif(
    not quantize.has_fp16_weight_kernel(), reason="this torch has no fbgemm float16 kernel (not x86)"
)


def _rounded(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` with the weight rounded to float16 and everything else in float32."""
    bias = linear.bias if linear.bias is not None else 0
    return x @ linear.weight.detach().half().float().t() + bias


@pytest.mark.parametrize("rows", [1, 8, 9, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_fp16_linear_multiplies_by_the_float16_rounded_weight(rows, bias):
    """Every row count takes the one kernel, float32 in and out, with the float32 weight shared (not
    copied); the product is the float16-rounded weight's, not the float32 one's."""
    torch.manual_seed(0)
    linear = nn.Linear(96, 80, bias=bias)
    layer = Fp16Linear(linear)
    assert layer.weight.data_ptr() == linear.weight.data_ptr() and layer.form == FP16_WEIGHTS
    x = torch.randn(rows, 3, 96)
    out = layer(x)
    assert out.dtype == torch.float32 and out.shape == (rows, 3, 80)
    torch.testing.assert_close(out, _rounded(linear, x), atol=2e-6, rtol=1e-5)
    assert float((out - linear(x).detach()).abs().max()) > 1e-6  # the weight was rounded
    flat = x.reshape(-1, 96)
    assert torch.equal(layer.step_op(flat.shape[0])(flat), out.reshape(-1, 80))
    assert torch.equal(layer.dequantized(), linear.weight.detach().half().float())


def test_blocks_of_rows_give_the_whole_matrix_result(monkeypatch):
    """A weight packed in blocks of output rows (as Gemma-3's LM head is, to pack on several threads)
    multiplies bit for bit as packed whole, strided rows included."""
    linear = nn.Linear(64, 200, bias=True)
    whole = Fp16Linear(linear)
    monkeypatch.setattr(quantize, "FP16_BLOCK_ROWS", 64)
    blocks = Fp16Linear(linear)
    assert (len(whole.packed), len(blocks.packed)) == (1, 4)
    wide = torch.randn(8, 3 * 64)
    for rows in (1, 2, 8):
        x = wide[:rows, 64:128]  # rows 192 apart
        assert torch.equal(blocks.step_op(rows)(x), whole.step_op(rows)(x.contiguous()))
        assert torch.equal(blocks(x), whole(x))


def test_fp16w_needs_float32_layers_and_agents_on_the_cpu():
    with pytest.raises(ConfigError, match=r"packs float32 Linear layers.*not torch\.bfloat16"):
        Fp16Linear(nn.Linear(8, 8).to(torch.bfloat16))
    with pytest.raises(ConfigError, match="packs float32 agents"):
        quantize.fp16_weight_agents(load_system("tiny-random", None, "bfloat16", "cpu"))


def test_missing_kernel_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(quantize, "has_fp16_weight_kernel", lambda: False)
    with pytest.raises(
        ConfigError, match=r"fp16w needs fbgemm's float16 kernel.*use --dtype int8 or float32"
    ):
        load_system("tiny-random", None, FP16_WEIGHTS, "cpu")


def test_load_system_packs_every_layer_and_head_of_float32_agents():
    """``load_system(..., "fp16w")``: float32 agents, every backbone Linear and LM head an ``Fp16Linear``
    (a tied head still sharing the embedding's weight), fingerprints as float32's (checkpoints and shipped
    links match), and a latent run whose answers follow float32's logits to float16 rounding."""
    system = load_system("tiny-random", None, FP16_WEIGHTS, "cpu")
    reference = load_system("tiny-random", None, "float32", "cpu")
    for name, agent in system.agents.items():
        assert agent.dtype == torch.float32
        assert agent.fingerprint() == reference.agents[name].fingerprint()
        linears = [m for m in agent.backbone.modules() if isinstance(m, nn.Linear | Fp16Linear)]
        assert linears and all(isinstance(m, Fp16Linear) for m in linears)
        head = agent.model.get_output_embeddings()
        assert isinstance(head, Fp16Linear)
        if agent.model.config.tie_word_embeddings:
            assert head.weight.data_ptr() == agent.model.get_input_embeddings().weight.data_ptr()
    ids = torch.randint(3, 200, (len(QUESTIONS[:2]), 6), generator=torch.Generator().manual_seed(0))
    for name, agent in system.agents.items():
        logits = []
        for a in (agent, reference.agents[name]):
            batch = a.encode([a.fill(a.render(q, None, set()), {}) for q in QUESTIONS[:2]])
            logits.append(teacher_forced_logits(a, batch, ids)[0])  # (B, 1 + 6, V)
        ours, theirs = logits
        assert float((ours - theirs).abs().max()) <= 2e-3 * float(theirs.abs().max()), name
    assert system.run(QUESTIONS[:2], batch_size=2)[0].text is not None


@pytest.mark.parametrize("arch", ARCHS)
def test_fp16w_steps_follow_transformers(arch):
    """FastSteps (``Fp16Linear.step_op``) and transformers' forward (``Fp16Linear.forward``) run the same
    float32 kernel: teacher-forced decode logits agree to float32 rounding."""
    model, tok = tiny_model(arch, torch.float32)
    fp16_weight_model(model, model.model)
    assert {type(m) for m in model.modules() if isinstance(m, nn.Linear | Fp16Linear)} == {Fp16Linear}
    agent = Agent(name="a", model=model, tokenizer=tok, template=ROLE_TEMPLATES["solver"])
    batch = _batch(agent, QUESTIONS[:3])
    ids = torch.randint(3, len(tok), (3, 10), generator=torch.Generator().manual_seed(0))
    logits = {}
    for fast in (True, False):
        logits[fast], used = teacher_forced_logits(_with(agent, fast=fast), batch, ids)
        assert used == fast
    torch.testing.assert_close(logits[True], logits[False], atol=1e-4, rtol=1e-4)


def test_cli_runs_with_dtype_fp16w(capsys):
    args = ["run", "--preset", "tiny-random", "What is 2+2?", "--dtype", FP16_WEIGHTS, "--rounds", "1"]
    assert main([*args, "--latent-steps", "2", "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert f"({FP16_WEIGHTS} on cpu)" in err and "(agents in float32)" in err


@pytest.mark.parametrize(
    "asked, resolved, native, tip",
    [
        ("auto", "int8", False, True),
        ("int8", "int8", False, False),  # asked for by name: no advice
        ("auto", "int8", True, False),  # bfloat16 units: int8 over bfloat16 agents is the fast choice
        ("auto", "float32", False, False),
    ],
)
def test_auto_int8_on_cpus_without_bfloat16_units_suggests_fp16w(monkeypatch, asked, resolved, native, tip):
    monkeypatch.setattr(loading, "native_bfloat16", lambda: native)
    advice = loading.dtype_tip(asked, resolved)
    assert (advice is not None) == tip
    assert advice is None or f"--dtype {FP16_WEIGHTS}" in advice


def test_load_system_prints_the_dtype_tip(monkeypatch, capsys):
    monkeypatch.setattr(loading, "native_bfloat16", lambda: False)
    monkeypatch.setattr(quantize, "native_bfloat16", lambda: False)
    load_system("tiny-random", None, "auto", "cpu")
    assert (
        f"recursivemas: tip: this CPU has no bfloat16 units: --dtype {FP16_WEIGHTS}"
        in capsys.readouterr().err
    )
