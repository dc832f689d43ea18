"""The bundled-model cache under concurrent readers, in-place corruption and edited manifests (issue 11,
item 14). A fake bundled model with a seconds-free conversion stands in for the real ones, in a
temporary cache root, so the real cache is never touched."""

import dataclasses
import fcntl
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer, GemmaTokenizer
from transformers.tokenization_utils_tokenizers import TokenizersBackend

from recursivemas import models
from recursivemas.cli import main
from recursivemas.models import bundled

NAME = "fake-tiny"
WEIGHTS = bytes(range(256)) * 64


@dataclass
class FakeModel:
    """A bundled model whose conversion writes two small files; counts conversions, and can be held."""

    exports: list[Path] = field(default_factory=list)
    hold: threading.Event | None = None

    def export(self, gguf: Path, out: Path, **_) -> None:
        if self.hold is not None:
            assert self.hold.wait(30)
        out.mkdir()
        (out / "config.json").write_text(json.dumps({"source": gguf.name}))
        (out / "model.safetensors").write_bytes(WEIGHTS)
        self.exports.append(out)

    @property
    def folder(self) -> Path:
        return bundled.model_dir(NAME)

    @property
    def weights(self) -> Path:
        return self.folder / "model.safetensors"


@pytest.fixture
def fake(tmp_path, monkeypatch) -> FakeModel:
    monkeypatch.setenv(bundled.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(bundled.VERIFY_ENV, raising=False)
    model = FakeModel()
    spec = bundled.BundledModel(
        NAME, "Fake", "Llama", 8, 1, 16, "1K", "none", "pip install fake", lambda work: work / "fake.gguf"
    )
    monkeypatch.setitem(bundled.BUNDLED, NAME, spec)
    monkeypatch.setattr(bundled, "_export", model.export)
    bundled.ensure_cached(NAME)
    assert len(model.exports) == 1
    return model


def _corrupt_in_place(path: Path) -> None:
    """Flip one byte, keeping the file's size and modification time."""
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _edit_manifest(folder: Path, edit) -> None:
    manifest = json.loads((folder / bundled.MANIFEST).read_text())
    edit(manifest)
    (folder / bundled.MANIFEST).write_text(json.dumps(manifest))


def _lock_file() -> Path:
    return bundled.model_dir(NAME).parent / f".{NAME}.lock"


def _can_lock(how: int) -> bool:
    """Whether another open file could take the cache lock ``how`` right now (without waiting)."""
    with _lock_file().open("a") as handle:
        try:
            fcntl.flock(handle, how | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


@pytest.mark.probe("model-cache")
def test_a_reader_holds_a_shared_lock_and_a_rebuild_waits_for_it(fake):
    inside, leave = threading.Event(), threading.Event()
    read = []

    def reader() -> None:
        with bundled.cached(NAME) as folder:
            inside.set()
            assert leave.wait(30)
            read.append((folder / "model.safetensors").read_bytes())  # still there: no rebuild yet

    thread = threading.Thread(target=reader)
    thread.start()
    assert inside.wait(30)
    assert _can_lock(fcntl.LOCK_SH) and not _can_lock(fcntl.LOCK_EX)  # readers share, rebuilds wait
    _edit_manifest(fake.folder, lambda m: m["files"]["config.json"].update(size=1))
    rebuild = threading.Thread(target=bundled.ensure_cached, args=(NAME,))
    rebuild.start()
    time.sleep(0.5)
    assert len(fake.exports) == 1  # the rebuild waits while the reader reads
    leave.set()
    thread.join(30)
    rebuild.join(30)
    assert read == [WEIGHTS] and len(fake.exports) == 2 and bundled.is_cached(NAME)


@pytest.mark.probe("model-cache")
def test_a_reader_waits_for_a_rebuild_in_progress(fake):
    fake.weights.unlink()
    fake.hold = threading.Event()
    rebuild = threading.Thread(target=bundled.ensure_cached, args=(NAME,))
    rebuild.start()
    deadline = time.monotonic() + 30
    while not _lock_file().exists() or _can_lock(fcntl.LOCK_SH):  # until the rebuild holds its lock
        assert time.monotonic() < deadline
        time.sleep(0.01)
    seen = []

    def reader() -> None:
        with bundled.cached(NAME) as folder:
            seen.append((folder / "model.safetensors").read_bytes())

    thread = threading.Thread(target=reader)
    thread.start()
    time.sleep(0.5)
    assert seen == []  # no read while the rebuild runs
    fake.hold.set()
    rebuild.join(30)
    thread.join(30)
    assert seen == [WEIGHTS] and len(fake.exports) == 2


@pytest.mark.probe("model-cache")
def test_same_size_same_mtime_corruption_is_caught_by_verification(fake, monkeypatch, capsys):
    _corrupt_in_place(fake.weights)
    assert bundled.cache_problem(NAME, verify=True) == "model.safetensors does not match its checksum"
    monkeypatch.setenv(bundled.VERIFY_ENV, "1")  # every load hashes every file
    assert bundled.cache_problem(NAME) == "model.safetensors does not match its checksum"
    bundled.ensure_cached(NAME)
    assert fake.weights.read_bytes() == WEIGHTS and len(fake.exports) == 2
    assert "does not match its checksum); rebuilding it" in capsys.readouterr().err


def test_a_verified_load_hashes_each_file_once_and_still_rebuilds(fake, monkeypatch, capsys):
    """``load_models`` with $RECURSIVEMAS_VERIFY_CACHE: the side-by-side pre-check does not hash, the load's
    own check does (once), so a cache corrupted in place is still rebuilt."""
    monkeypatch.setenv(bundled.VERIFY_ENV, "1")
    monkeypatch.setattr(models, "_from_pretrained", lambda spec, path, dtype, device: (spec, path))
    hashed: list[str] = []
    sha256_file = bundled.sha256_file
    monkeypatch.setattr(bundled, "sha256_file", lambda path: hashed.append(path.name) or sha256_file(path))
    assert models.load_models([NAME]) == {NAME: (NAME, str(fake.folder))}
    assert sorted(hashed) == ["config.json", "model.safetensors"] and len(fake.exports) == 1
    _corrupt_in_place(fake.weights)
    models.load_models([NAME])
    assert fake.weights.read_bytes() == WEIGHTS and len(fake.exports) == 2
    assert "does not match its checksum); rebuilding it" in capsys.readouterr().err


@pytest.mark.probe("model-cache")
def test_models_verify_rebuilds_a_cache_corrupted_in_place(fake, capsys):
    _corrupt_in_place(fake.weights)
    assert main(["models", "--verify"]) == 0
    out, err = capsys.readouterr()
    assert "does not match its checksum); rebuilding it" in err
    assert f"{NAME}: " in out and f"cached in {fake.folder}, every file matches its SHA-256" in out
    assert fake.weights.read_bytes() == WEIGHTS and len(fake.exports) == 2
    assert main(["models", "--verify"]) == 0 and len(fake.exports) == 2  # intact: nothing rebuilt


@pytest.mark.probe("model-cache")
def test_an_edited_manifest_is_detected_and_rebuilt(fake, capsys):
    record = json.loads((fake.folder / bundled.MANIFEST).read_text())["files"]["model.safetensors"]
    _corrupt_in_place(fake.weights)
    sha = bundled.sha256_file(fake.weights)
    _edit_manifest(fake.folder, lambda m: m["files"]["model.safetensors"].update(sha256=sha))
    assert (
        bundled.cache_problem(NAME, verify=True) == "manifest.json was edited (its checksum does not match)"
    )
    bundled.ensure_cached(NAME)
    assert "manifest.json was edited" in capsys.readouterr().err
    manifest = json.loads((fake.folder / bundled.MANIFEST).read_text())
    assert manifest["files"]["model.safetensors"]["sha256"] == record["sha256"]
    assert manifest["checksum"] == bundled.manifest_checksum(manifest) and len(fake.exports) == 2


@pytest.mark.probe("model-cache")
def test_a_cache_in_an_older_format_is_converted_again(fake, capsys):
    for signed in (True, False):  # format 1 manifests were written without a checksum at first

        def older(manifest: dict, signed: bool = signed) -> None:
            manifest["format_version"] = 1  # its tokenizer files load the slow way
            manifest.pop("checksum")
            if signed:
                manifest["checksum"] = bundled.manifest_checksum(manifest)

        exports = len(fake.exports)
        _edit_manifest(fake.folder, older)
        assert bundled.cache_problem(NAME) == "cache format 1 of another recursivemas version"
        bundled.ensure_cached(NAME)
        assert "cache format 1 of another recursivemas version); rebuilding it" in capsys.readouterr().err
        assert bundled.is_cached(NAME) and len(fake.exports) == exports + 1


def test_a_manifest_without_its_checksum_is_an_edited_one(fake):
    _edit_manifest(fake.folder, lambda m: m.pop("checksum"))
    assert bundled.cache_problem(NAME) == "manifest.json was edited (its checksum does not match)"
    bundled.ensure_cached(NAME)
    assert bundled.is_cached(NAME) and len(fake.exports) == 2


def test_models_convert_converts_what_is_missing_and_keeps_the_rest(fake, monkeypatch, capsys):
    for name in [n for n in bundled.BUNDLED if n != NAME]:  # only the fake one: the real ones take minutes
        monkeypatch.delitem(bundled.BUNDLED, name)
    assert main(["models", "--convert"]) == 0 and len(fake.exports) == 1  # cached: left alone
    fake.weights.unlink()
    assert main(["models", "--convert"]) == 0 and len(fake.exports) == 2
    assert f"cached in {fake.folder}" in capsys.readouterr().out and bundled.is_cached(NAME)


def _tiny_gguf(path: Path) -> str:
    """A GGUF file with a vocabulary, scores, a number and one float32 tensor."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.block_count", 2)
    writer.add_array("tokenizer.ggml.tokens", ["<unk>", "a", "b", "ab", "▁é"])
    writer.add_array("tokenizer.ggml.scores", [0.0, -1.0, -2.0, -3.0, -4.5])
    writer.add_tensor("token_embd.weight", np.arange(20, dtype=np.float32).reshape(5, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_a_conversion_parses_each_gguf_once(tmp_path):
    """transformers builds a ``gguf.GGUFReader`` for the tokenizer's config, the config and the weights;
    within a conversion they share one per file, which reads a plain ``ndarray`` view of the file (a
    ``numpy.memmap`` runs Python code for every slice the reader takes) into the same fields and tensors.
    Outside it every call parses again, through a memmap."""
    gguf = pytest.importorskip("gguf")
    a, b = _tiny_gguf(tmp_path / "a.gguf"), _tiny_gguf(tmp_path / "b.gguf")
    with bundled._gguf_parsed_once():
        first = gguf.GGUFReader(a)
        assert gguf.GGUFReader(a) is first and gguf.GGUFReader(b) is not first
    plain = gguf.GGUFReader(a)
    assert plain is not first and isinstance(first, gguf.GGUFReader)
    assert type(first.data) is np.ndarray and type(plain.data) is np.memmap
    assert list(first.fields) == list(plain.fields)
    for key, theirs in plain.fields.items():
        ours = first.fields[key]
        assert (ours.data, ours.types) == (theirs.data, theirs.types)
        assert [bytes(part) for part in ours.parts] == [bytes(part) for part in theirs.parts]
    assert [t.name for t in first.tensors] == [t.name for t in plain.tensors] == ["token_embd.weight"]
    assert np.array_equal(first.tensors[0].data, plain.tensors[0].data)


def test_a_conversion_parses_transformers_metadata_once(monkeypatch):
    """The tokenizer's config and the config each ask transformers' legacy loader for the metadata of the
    same file: within a conversion one parse serves both, each caller getting its own copy of the config;
    a load of the weights (``return_tensors=True``) still goes through."""
    legacy = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    calls = []

    def load(path, return_tensors=False, **kwargs):
        calls.append((path, return_tensors))
        return {"config": {"layers": [1]}, "tokenizer": {"tokens": ["a"]}}

    monkeypatch.setattr(legacy, "load_gguf_checkpoint", load)
    with bundled._gguf_parsed_once():
        legacy.load_gguf_checkpoint("a.gguf")["config"]["layers"].append(2)  # a caller's edit stays its own
        assert legacy.load_gguf_checkpoint("a.gguf", return_tensors=False)["config"] == {"layers": [1]}
        legacy.load_gguf_checkpoint("a.gguf", return_tensors=True, model_to_load=None)
        legacy.load_gguf_checkpoint("b.gguf")
    assert legacy.load_gguf_checkpoint is load
    assert calls == [("a.gguf", False), ("a.gguf", True), ("b.gguf", False)]


def test_a_model_specific_tokenizer_is_saved_to_load_natively(tmp_path):
    """The cache saves a class-specific tokenizer (Gemma's, whose loads rebuild the vocabulary in Python)
    to load as a ``TokenizersBackend``: same tokens, added tokens, chat template and padding side."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "a", "b", "▁", "ab"]
    original = GemmaTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[("a", "b")])
    original.add_tokens(["<tool>"])
    original.chat_template = "{{ messages[0]['content'] }}"
    original.save_pretrained(tmp_path)
    bundled._record_native_tokenizer(original, tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded) is TokenizersBackend and loaded.padding_side == original.padding_side == "left"
    assert loaded.added_tokens_decoder == original.added_tokens_decoder
    assert loaded.chat_template == original.chat_template
    texts = ["ab ba", "a<tool>b", "<bos>ab<eos>", "c"]
    assert loaded(texts, padding=True).data == original(texts, padding=True).data
    assert loaded.decode(loaded("ab a").input_ids) == original.decode(original("ab a").input_ids)


def test_merges_saved_as_strings_tokenize_as_the_pairs(tmp_path):
    """``tokenizer.json`` merges rewritten from pairs into "a b" strings (tokenizers parses them faster):
    the same vocabulary, merges and tokens; a merge with a space in a part keeps its pairs."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(["<unk>", "a", "b", "c", "ab", "abc", "bc", "Ġ", "Ġa", "Ġab"])}
    merges = [("a", "b"), ("ab", "c"), ("b", "c"), ("Ġ", "a"), ("Ġa", "b")]
    pairs = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    pairs.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    path = tmp_path / "tokenizer.json"
    pairs.save(str(path))
    assert isinstance(json.loads(path.read_text())["model"]["merges"][0], list)
    assert bundled._merges_as_strings(path)
    assert json.loads(path.read_text())["model"]["merges"] == ["a b", "ab c", "b c", "Ġ a", "Ġa b"]
    strings = Tokenizer.from_file(str(path))
    assert strings.get_vocab() == pairs.get_vocab()
    texts = ["abc ab bc", "cab abab", "a b c", "abcabc"]
    assert [e.ids for e in strings.encode_batch(texts)] == [e.ids for e in pairs.encode_batch(texts)]

    spaced = Tokenizer(models.BPE(vocab={**vocab, "a ": 10, "a b": 11}, merges=[*merges, ("a ", "b")]))
    spaced.save(str(path))
    before = path.read_text()
    assert not bundled._merges_as_strings(path) and path.read_text() == before


def test_a_rebuild_that_does_not_help_is_a_clear_error(fake, monkeypatch):
    monkeypatch.setattr(bundled, "convert", lambda spec: None)
    fake.weights.unlink()
    with pytest.raises(bundled.ConfigError, match=r"still unusable after a rebuild.*remove .* and retry"):
        bundled.ensure_cached(NAME)


def test_idle_cpus_are_measured_within_this_process_s_share():
    assert 0.0 <= bundled._idle_cpus(0.05) <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize(("idle", "children"), [(1.0, False), (2.0, False), (3.0, True)])
def test_models_convert_side_by_side_only_with_two_idle_cpus(fake, monkeypatch, idle, children):
    """One idle CPU goes to the largest tokenizer (beside its weights); other models need a second."""
    monkeypatch.setattr(bundled, "_idle_cpus", lambda: idle)
    started = []
    monkeypatch.setattr(bundled.subprocess, "Popen", lambda args, **kw: started.append(args[3]) or _Done())
    other = dataclasses.replace(bundled.BUNDLED[NAME], name="fake-other", vocab_size=8)
    monkeypatch.setitem(bundled.BUNDLED, other.name, other)
    fake.weights.unlink()
    bundled.ensure_all_cached([other.name, NAME])
    assert started == (["fake-other"] if children else [])
    assert bundled.is_cached(NAME) and bundled.is_cached(other.name) == (not children)


class _Done:
    """A child process that has finished without error (its model is not converted)."""

    returncode = 0

    def communicate(self):
        return "", None

    def poll(self):
        return 0
