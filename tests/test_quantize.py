"""``--dtype int8``: int8 weight-only agents (``recursivemas.quantize``) and the LM-head input hook."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from recursivemas import models, quantize
from recursivemas.cli import main
from recursivemas.errors import ConfigError
from recursivemas.loading import load_system
from recursivemas.models import loaded_weight_files, weight_files
from recursivemas.models.tiny import tiny_model
from recursivemas.presets import build_from_specs
from recursivemas.quantize import (
    INT8_MAX_ROWS,
    Int4Linear,
    Int8Linear,
    LowBitLinear,
    int4_dequantized,
    quantize_module,
)
from recursivemas.system import RecursiveMAS

from .test_fast_step import four_bit_weights, teacher_forced_logits

QUESTIONS = ["What is 12 plus 30?", "If x + 7 = 19, what is x?"]


AGENT_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@pytest.fixture(scope="module", params=sorted(AGENT_DTYPES))
def int8_system(request):
    """``load_system(..., "int8")`` over bfloat16 agents (as on CPUs with bfloat16 units) and over float32
    agents (as on AVX2-only CPUs), both on any machine."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quantize, "native_bfloat16", lambda: request.param == "bfloat16")
        patch.delenv(quantize.LOW_BIT_AGENTS_ENV, raising=False)
        system = load_system("tiny-random", None, "int8", "cpu")
    assert {agent.dtype for agent in system.agents.values()} == {AGENT_DTYPES[request.param]}
    return system


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("rows", [1, INT8_MAX_ROWS, INT8_MAX_ROWS + 1, 40])
def test_int8_linear_is_close_to_the_linear_on_both_paths(rows):
    linear = nn.Linear(96, 80, bias=True)
    x = torch.randn(rows, 3, 96) if rows > INT8_MAX_ROWS else torch.randn(rows, 96)
    out = Int8Linear(linear)(x)
    assert out.dtype == torch.float32 and out.shape == (*x.shape[:-1], 80)  # a float32 layer stays float32
    assert _relative_error(out, linear(x)) < 0.02
    assert _relative_error(Int8Linear(linear).dequantized(), linear.weight) < 0.01


@pytest.mark.parametrize("dtype", sorted(AGENT_DTYPES))
def test_int8_linear_multiplies_many_rows_by_its_own_weight_exactly(dtype):
    """Prompt passes (more than ``INT8_MAX_ROWS`` rows) compute as ``--dtype bfloat16`` (or float32) does,
    with the weight the layer was loaded with (shared, not copied); only short inputs take the int8 kernel,
    in bfloat16, returning the layer's dtype."""
    linear = nn.Linear(96, 80, bias=True).to(AGENT_DTYPES[dtype])
    layer = Int8Linear(linear)
    assert layer.weight.data_ptr() == linear.weight.data_ptr()
    x = torch.randn(INT8_MAX_ROWS + 1, 96, dtype=AGENT_DTYPES[dtype])
    assert torch.equal(layer(x), linear(x))
    short = layer(x[:1])
    assert short.dtype == AGENT_DTYPES[dtype]
    assert not torch.equal(short, linear(x[:1]))  # the int8 path rounds the weight
    expected = x[:1].bfloat16().float() @ layer.dequantized().t() + linear.bias.float()
    assert _relative_error(short, expected) < 0.01  # bfloat16 inputs and output, int8 weight


def test_the_low_bit_agent_dtype_can_be_set(monkeypatch):
    """``$RECURSIVEMAS_LOW_BIT_AGENTS`` overrides the CPU's choice; another value is a clear error."""
    for native in (True, False):
        monkeypatch.setattr(quantize, "native_bfloat16", lambda native=native: native)
        for name, dtype in AGENT_DTYPES.items():
            monkeypatch.setenv(quantize.LOW_BIT_AGENTS_ENV, name)
            assert quantize.low_bit_agent_dtype() == dtype
    monkeypatch.setenv(quantize.LOW_BIT_AGENTS_ENV, "float16")
    with pytest.raises(
        ConfigError, match=r"RECURSIVEMAS_LOW_BIT_AGENTS='float16': use one of bfloat16, float32"
    ):
        load_system("tiny-random", None, "int8", "cpu")


def test_low_bit_agents_are_bfloat16_only_where_the_cpu_multiplies_it(monkeypatch):
    """``load_system`` loads int8 / int4 agents in bfloat16 on CPUs with bfloat16 units, float32 on others
    (AVX2 only: bfloat16 prompt passes there cost more than the int8 steps save)."""
    monkeypatch.delenv(quantize.LOW_BIT_AGENTS_ENV, raising=False)
    for native, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(quantize, "native_bfloat16", lambda native=native: native)
        assert quantize.low_bit_agent_dtype() == dtype
        for agent in load_system("tiny-random", None, "int8", "cpu").agents.values():
            assert agent.dtype == dtype
            assert {m.weight.dtype for m in agent.model.modules() if isinstance(m, LowBitLinear)} == {dtype}
    monkeypatch.undo()
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    assert all(hasattr(torch.cpu, probe) for probe in probes)  # a renamed probe would silently mean float32
    assert quantize.native_bfloat16() == any(getattr(torch.cpu, probe)() for probe in probes)


def test_quantize_module_replaces_every_linear():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4), nn.LayerNorm(4)))
    assert quantize_module(model) == 2
    assert not any(isinstance(m, nn.Linear) for m in model.modules())


def test_int8_system_quantises_backbones_and_keeps_links_float32(int8_system):
    reference = load_system("tiny-random", None, "float32", "cpu")
    dtypes = {agent.dtype for agent in int8_system.agents.values()}
    assert len(dtypes) == 1 and dtypes <= set(AGENT_DTYPES.values())
    for name, agent in int8_system.agents.items():
        assert not any(isinstance(m, nn.Linear) for m in agent.backbone.modules())
        assert any(isinstance(m, Int8Linear) for m in agent.backbone.modules())
        head = agent.model.get_output_embeddings()
        assert isinstance(head, Int8Linear) and head.weight.dtype == agent.dtype
        if agent.model.config.get_text_config().tie_word_embeddings:  # still one table
            assert head.weight.data_ptr() == agent.model.get_input_embeddings().weight.data_ptr()
        assert agent.fingerprint() == reference.agents[name].fingerprint()
    assert {p.dtype for p in int8_system.links.parameters()} == {torch.float32}


def test_int8_steps_follow_their_agents_dtype(int8_system):
    """Int8 weights change the tiny models' one-position step logits by about 2% of their scale against the
    agents' own dtype (measured: 2.0-2.5% against bfloat16, 1.6-1.9% against float32; a wrong scale or
    layout shows at 50% and more), teacher-forced on the same tokens so that near-tied greedy choices of
    random tiny models cannot make the inputs part."""
    dtype = next(iter(int8_system.agents.values())).dtype
    reference = load_system("tiny-random", None, models.dtype_name(dtype), "cpu")
    ids = torch.randint(3, 200, (len(QUESTIONS), 8), generator=torch.Generator().manual_seed(0))
    for name, agent in int8_system.agents.items():
        logits = []
        for a in (agent, reference.agents[name]):
            batch = a.encode([a.fill(a.render(q, None, set()), {}) for q in QUESTIONS])
            logits.append(teacher_forced_logits(a, batch, ids)[0][:, 1:])  # the steps: (B, 8, V)
        ours, theirs = logits
        assert float((ours - theirs).abs().max()) <= 0.06 * float(theirs.abs().max()), name


def test_missing_kernel_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(quantize, "has_int4_kernel", lambda: False)
    with pytest.raises(ConfigError, match=r"int4 needs PyTorch's CPU int4 kernel.*install"):
        load_system("tiny-random", None, "int4", "cpu")
    monkeypatch.delattr(torch, quantize.INT8_KERNEL)
    with pytest.raises(ConfigError, match=r"int8 weight-only kernel.*install"):
        load_system("tiny-random", None, "int8", "cpu")


def test_int8_needs_bfloat16_or_float32_agents_on_the_cpu():
    with pytest.raises(ConfigError, match="bfloat16 or float32 agents"):
        quantize.quantize_agents(load_system("tiny-random", None, "float16", "cpu"))
    with pytest.raises(ConfigError, match=r"bfloat16 or float32 Linear layers, not torch\.float16"):
        Int8Linear(nn.Linear(8, 8).half())
    with pytest.raises(ConfigError, match="unknown --dtype"):
        load_system("tiny-random", None, "int2", "cpu")


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
    x = torch.randn(batch, 5, head.in_features, dtype=head.weight.dtype)[:, -1:]
    assert torch.equal(head(x), head(x.contiguous()))


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_cli_runs_with_dtype_int8_and_int4(capsys, dtype):
    args = ["run", "--preset", "tiny-random", "What is 2+2?", "--dtype", dtype, "--rounds", "1"]
    assert main([*args, "--latent-steps", "2", "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert f"({dtype} on cpu)" in err
    assert f"(agents in {models.dtype_name(quantize.low_bit_agent_dtype())})" in err


@pytest.mark.parametrize("rows", [1, INT8_MAX_ROWS, INT8_MAX_ROWS + 1])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", sorted(AGENT_DTYPES))
def test_step_op_equals_forward(rows, bias, dtype):
    """``Int8Linear.step_op``, the plain function ``FastSteps`` calls, picks the kernel ``forward`` picks."""
    torch.manual_seed(0)
    layer = Int8Linear(nn.Linear(32, 48, bias=bias).to(AGENT_DTYPES[dtype]))
    x = torch.randn(rows, 32, dtype=AGENT_DTYPES[dtype])
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


def _four_bit_linear(out: int, inputs: int, bias: bool = False) -> nn.Linear:
    torch.manual_seed(0)
    linear = nn.Linear(inputs, out, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(int4_dequantized(*quantize.quantize_weight_int4(linear.weight)))
    return linear.to(torch.bfloat16)


@pytest.mark.parametrize("bias", [False, True])
def test_four_bit_weights_take_int4_and_keep_their_values(bias):
    """A weight that is 4-bit per group of 32 inputs (as Q4_1 GGUFs store SmolLM2's layers) becomes an
    ``Int4Linear`` whose products equal the bfloat16 layer's up to bfloat16 rounding (the int8 form is off by
    about 1%), for up to ``INT8_MAX_ROWS`` rows; more rows take the bfloat16 weight exactly."""
    linear = _four_bit_linear(96, 64, bias)
    assert isinstance(quantize.quantized_linear(linear), Int8Linear)  # --dtype int8: no int4 layers
    layer = quantize.quantized_linear(linear, int4=True)
    assert isinstance(layer, Int4Linear) and layer.weight.data_ptr() == linear.weight.data_ptr()
    assert _relative_error(layer.dequantized(), linear.weight) < 0.004
    for rows in (1, INT8_MAX_ROWS):
        x = torch.randn(rows, 64, dtype=torch.bfloat16)
        assert _relative_error(layer(x), linear(x)) < 0.008
        assert torch.equal(layer.step_op(rows)(x), layer(x))
    x = torch.randn(INT8_MAX_ROWS + 1, 64, dtype=torch.bfloat16)
    assert torch.equal(layer(x), linear(x))


@pytest.mark.parametrize("form", ["int8", "int4"])
def test_low_bit_products_take_rows_strided_apart(form):
    """Row-major rows that are not packed together (a slice of wider rows, as FastSteps' attention output
    can be at batch 8) give the packed rows' result; torch's int4 kernel crashed on them."""
    linear = _four_bit_linear(96, 64) if form == "int4" else nn.Linear(64, 96).to(torch.bfloat16)
    layer = quantize.quantized_linear(linear, int4=True)
    assert layer.form == form
    wide = torch.randn(INT8_MAX_ROWS, 3 * 64, dtype=torch.bfloat16)
    for rows in (2, INT8_MAX_ROWS):
        x = wide[:rows, 64:128]  # (rows, 64), rows 192 apart
        assert not x.is_contiguous()
        assert torch.equal(layer.step_op(rows)(x), layer.step_op(rows)(x.contiguous()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_choosing_and_quantising_a_layer_leaves_its_source_alone(dtype):
    for linear in (_four_bit_linear(96, 64).to(dtype), nn.Linear(64, 96).to(dtype)):
        source = linear.weight.detach().clone()
        quantize.quantized_linear(linear, int4=True)
        assert torch.equal(linear.weight, source)


def test_other_weights_and_shapes_take_int8():
    """Random weights (int4 would be 4-9 times int8's error) and shapes the int4 kernel cannot take (out
    not a multiple of 16, in not of 32) stay int8."""
    for linear in (nn.Linear(64, 96), _four_bit_linear(88, 64), nn.Linear(80, 96)):
        assert isinstance(quantize.quantized_linear(linear, int4=True), Int8Linear)


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory):
    """Tiny Llama (its layers 4-bit per group, as SmolLM2's: int4) and Gemma3 (random: int8) saved as local
    model folders (safetensors + tokenizer), as users pass them."""
    root = tmp_path_factory.mktemp("models")
    folders = {}
    for name in ("llama", "gemma3"):
        model, tok = tiny_model(name)
        if name == "llama":
            four_bit_weights(model)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        folders[name] = str(root / name)
    return folders


def _int8_folder_system(folders: dict[str, str], cache: Path, int4: bool = True) -> RecursiveMAS:
    return quantize.quantize_agents(_folder_system(folders), cache_dir=cache, int4=int4)


def _cache_forms(cache: Path) -> list[str]:
    """``<folder name>-<form>`` of every cache file (``<folder>-<folder hash>-<form>-<version hash>``)."""
    return sorted("-".join(f.name.split("-")[0:3:2]) for f in cache.iterdir())


def _folder_system(folders: dict[str, str], dtype: torch.dtype = torch.bfloat16) -> RecursiveMAS:
    agents = {"planner": folders["llama"], "critic": folders["gemma3"], "solver": folders["llama"]}
    return build_from_specs(agents, dtype=dtype)


def _int8_buffers(system: RecursiveMAS) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": t
        for name, agent in system.agents.items()
        for key, t in agent.model.state_dict().items()
        if key.rpartition(".")[2] in ("qweight", "scales", "qweight4", "scales_and_zeros")
    }


def test_int8_cache_gives_the_weights_quantisation_gives(model_folders, tmp_path, capsys):
    """The first int8 load of a model folder saves its int8 weights; later loads read them (the
    quantisation itself is not run) and hold exactly the same layers; models not loaded from a folder
    (tiny-random, built from a config) are quantised every time, with nothing cached."""
    cache = tmp_path / "int8"
    first = _int8_buffers(_int8_folder_system(model_folders, cache))
    assert _cache_forms(cache) == ["gemma3-int4", "llama-int4"]
    calls = []
    original = quantize.quantize_weight
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quantize, "quantize_weight", lambda w: calls.append(w.shape) or original(w))
        second = _int8_buffers(_int8_folder_system(model_folders, cache))
    assert first.keys() == second.keys() and len(first) > 20
    assert {k.rpartition(".")[2] for k in first} == {"qweight", "scales", "qweight4", "scales_and_zeros"}
    assert all(torch.equal(first[k], second[k]) for k in first)
    # read into torch's own (64-byte aligned) memory: the int8 kernel crashed at 8 rows on mapped weights
    assert all(t.data_ptr() % 64 == 0 for t in second.values())
    assert calls and all(shape[0] <= 4 for shape in calls)  # only the spot-checked rows
    assert "stale" not in capsys.readouterr().err
    quantize.quantize_agents(load_system("tiny-random", None, "bfloat16", "cpu"), cache_dir=tmp_path / "none")
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("damage", ["weights", "codes", "truncate", "touch"])
def test_stale_or_broken_int8_cache_is_rewritten(model_folders, tmp_path, capsys, damage):
    """A cache file that no longer matches its model (the folder's weights rewritten, its int4 codes
    changed, the file truncated or its model files touched) is said to be stale and requantised, never
    used."""
    folders = dict(model_folders)
    folders["llama"] = str(tmp_path / "llama")
    shutil.copytree(model_folders["llama"], folders["llama"])
    cache = tmp_path / "int8"
    _int8_folder_system(folders, cache)
    (cached,) = cache.glob("llama-*")
    if damage == "weights":  # same names, sizes and times, other weights: the spot check catches it
        weights = Path(folders["llama"]) / "model.safetensors"
        stat = weights.stat()
        tensors = load_file(weights)
        # only the int4 layers' weights (rows reversed: still 4-bit, same shapes)
        flipped = {k: torch.flip(v, dims=[0]).contiguous() if "_proj" in k else v for k, v in tensors.items()}
        save_file(flipped, weights, {"format": "pt"})
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    elif damage == "codes":  # every 4-bit code q -> 15 - q, scales kept: the kernel check catches it
        with safe_open(str(cached), framework="pt") as f:
            metadata = f.metadata()
        tensors = load_file(cached)
        changed = {k: 255 - v if k.endswith(".qweight4") else v for k, v in tensors.items()}
        save_file(changed, cached, metadata)
    elif damage == "truncate":
        cached.write_bytes(cached.read_bytes()[:1000])
    else:
        os.utime(Path(folders["llama"]) / "model.safetensors")
    capsys.readouterr()
    system = _int8_folder_system(folders, cache)
    assert f"{cached} is stale" in capsys.readouterr().err
    expected = _int8_buffers(quantize.quantize_agents(_folder_system(folders), int4=True))
    got = _int8_buffers(system)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    _int8_folder_system(folders, cache)  # rewritten: no longer stale
    assert "stale" not in capsys.readouterr().err


def test_int8_cache_is_keyed_to_the_files_the_weights_were_loaded_from(model_folders, tmp_path, capsys):
    """Weight files rewritten after a model loaded (before it is quantised) leave its cache keyed to the
    files it came from, so the new files' first load requantises."""
    folders = dict(model_folders)
    folders["llama"] = str(tmp_path / "llama")
    shutil.copytree(model_folders["llama"], folders["llama"])
    cache = tmp_path / "int8"
    old = _folder_system(folders)
    weights = Path(folders["llama"]) / "model.safetensors"
    tensors = load_file(weights)
    flipped = {k: torch.flip(v, dims=[0]).contiguous() for k, v in tensors.items()}
    save_file(flipped, weights, {"format": "pt"})
    quantize.quantize_agents(old, cache_dir=cache, int4=True)  # the old weights, keyed to the old files
    capsys.readouterr()
    new = _int8_folder_system(folders, cache)
    assert "is stale, its model's files, the format or torch changed" in capsys.readouterr().err
    expected = _int8_buffers(quantize.quantize_agents(_folder_system(folders), int4=True))
    assert all(torch.equal(_int8_buffers(new)[k], expected[k]) for k in expected)
    recorded = loaded_weight_files(new.agents["planner"].model)
    assert recorded == (str(Path(folders["llama"]).resolve()), weight_files(Path(folders["llama"])))
    assert weight_files(tmp_path / "missing") == []


def test_weights_changed_while_loading_get_no_cache(model_folders, monkeypatch):
    """A model whose weight files changed between the start and the end of its load records none, so no
    cache is read or written for it."""
    stamps = iter([[("model.safetensors", 1, 1)], [("model.safetensors", 1, 2)]])
    monkeypatch.setattr(models, "weight_files", lambda folder: next(stamps))
    model, _ = models.load_model(model_folders["llama"], torch.bfloat16)
    assert loaded_weight_files(model) is None


def test_int8_and_int4_caches_are_separate_files(model_folders, tmp_path):
    """``--dtype int8`` keeps every layer int8, even 4-bit ones, and caches apart from ``--dtype int4``."""
    cache = tmp_path / "int8"
    int4 = _int8_buffers(_int8_folder_system(model_folders, cache, int4=True))
    for _ in range(2):  # quantised, then from its own cache
        int8 = _int8_buffers(_int8_folder_system(model_folders, cache, int4=False))
        assert {k.rpartition(".")[2] for k in int8} == {"qweight", "scales"}
    assert {k.rpartition(".")[2] for k in int4} == {"qweight", "scales", "qweight4", "scales_and_zeros"}
    assert len(list(cache.iterdir())) == 4


def test_float32_agents_cache_apart_from_bfloat16_ones(model_folders, tmp_path):
    """Float32 agents (AVX2-only CPUs) quantise their float32 weights, which can round to other codes than
    the same weights in bfloat16: their files are their own, and writing one keeps the other's."""
    cache = tmp_path / "int8"
    bf16 = _int8_buffers(_int8_folder_system(model_folders, cache, int4=False))
    for _ in range(2):  # quantised, then from its own cache
        system = quantize.quantize_agents(
            _folder_system(model_folders, torch.float32), cache_dir=cache, int4=False
        )
        fp32 = _int8_buffers(system)
        assert {agent.dtype for agent in system.agents.values()} == {torch.float32}
    assert fp32.keys() == bf16.keys()
    assert any(not torch.equal(fp32[k], bf16[k]) for k in fp32)
    assert _cache_forms(cache) == ["gemma3-int8", "gemma3-int8_float32", "llama-int8", "llama-int8_float32"]
    assert _int8_buffers(_int8_folder_system(model_folders, cache, int4=False)).keys() == bf16.keys()
    assert len(list(cache.iterdir())) == 4
    for _ in range(2):  # int4 over float32 agents: the Llama's 4-bit layers, quantised then cached
        system = quantize.quantize_agents(
            _folder_system(model_folders, torch.float32), cache_dir=cache, int4=True
        )
        assert {k.rpartition(".")[2] for k in _int8_buffers(system)} >= {"qweight4", "scales_and_zeros"}
    assert len(list(cache.iterdir())) == 6
    assert "llama-int4_float32" in _cache_forms(cache)


def test_load_system_int4_takes_exact_layers_and_caches_them(model_folders, tmp_path, monkeypatch):
    """``--dtype int4`` through ``load_system`` (a checkpoint over local model folders): the 4-bit Llama's
    layers become ``Int4Linear``s, the random Gemma3's stay int8, and each form is cached in its own file."""
    monkeypatch.setenv("RECURSIVEMAS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(quantize, "native_bfloat16", lambda: True)  # bfloat16 agents, the forms' plain names
    _folder_system(model_folders).save_pretrained(str(tmp_path / "ckpt"))
    for dtype, forms in (("int4", {Int4Linear, Int8Linear}), ("int8", {Int8Linear})):
        system = load_system(None, str(tmp_path / "ckpt"), dtype, "cpu")
        planner = {type(m) for m in system.agents["planner"].model.modules() if isinstance(m, LowBitLinear)}
        assert planner == forms
        critic = {type(m) for m in system.agents["critic"].model.modules() if isinstance(m, LowBitLinear)}
        assert critic == {Int8Linear}
    assert _cache_forms(tmp_path / "cache" / "int8") == [
        "gemma3-int4",
        "gemma3-int8",
        "llama-int4",
        "llama-int8",
    ]


def test_a_new_cache_file_replaces_the_folders_files_for_other_torch_versions(model_folders, tmp_path):
    cache = tmp_path / "int8"
    _int8_folder_system(model_folders, cache, int4=False)
    kept = sorted(cache.iterdir())
    older = [cache / kept[0].name.replace(kept[0].name.rsplit("-", 1)[1], "0123456789ab.safetensors")]
    unrelated = cache / "llama-ffffffffffff-int8-0123456789ab.safetensors"  # another folder named llama
    for f in (*older, unrelated):
        f.write_bytes(b"old")
    for f in kept:
        f.unlink()
    _int8_folder_system(model_folders, cache, int4=False)
    assert sorted(cache.iterdir()) == sorted([*kept, unrelated])


def test_quantised_dtypes_on_a_gpu_are_refused_before_loading(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(quantize, "quantize_agents", lambda *a, **k: pytest.fail("loaded"))
    for dtype in ("int8", "int4"):
        with pytest.raises(ConfigError, match=f"--dtype {dtype} runs on the CPU only"):
            load_system("tiny-random", None, dtype, "cuda")


def test_unwritable_int8_cache_still_loads(model_folders, tmp_path, capsys):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    system = _int8_folder_system(model_folders, blocked / "int8")
    assert "could not cache quantised weights" in capsys.readouterr().err
    assert any(isinstance(m, Int8Linear) for m in system.agents["planner"].model.modules())
