"""The only module that touches transformers' KV-cache API.

The Cache API moves between transformers releases (``past_key_values=`` became ``cache=`` in 5.x,
layer classes changed); everything version-dependent lives here.
"""

from __future__ import annotations

import inspect
from collections.abc import Hashable
from dataclasses import dataclass
from functools import lru_cache

import torch
from transformers import Cache, DynamicCache, PreTrainedModel, StaticCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from transformers.masking_utils import create_masks_for_generate


def new_cache(model: PreTrainedModel, max_length: int | None = None) -> Cache:
    """An empty cache shaped for ``model`` (sliding-window layers included): a growing ``DynamicCache``, or
    with ``max_length`` a ``StaticCache`` preallocated for that many positions (fixed shapes, which
    ``torch.compile`` and CUDA graphs need)."""
    if max_length is None:
        return DynamicCache(config=model.config)
    return StaticCache(config=model.config, max_cache_len=max_length)


@lru_cache(maxsize=64)
def _cache_kwarg(forward_cls: type) -> str:
    params = inspect.signature(forward_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(module: torch.nn.Module, cache: Cache | None) -> dict:
    """Keyword arguments that hand ``cache`` to ``module.forward`` under this release's name."""
    return {_cache_kwarg(type(module)): cache, "use_cache": cache is not None}


def cache_length(cache: Cache) -> int:
    """Number of positions already stored in ``cache``."""
    return int(cache.get_seq_length())


def step_mask(
    module: PreTrainedModel, mask: torch.Tensor, cache: Cache, positions: torch.Tensor
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The attention mask of a one-position step over a static ``cache``, built before the forward as
    ``generate`` builds it for a compiled step: from the (B, past + 1) padding ``mask`` and the (B, 1)
    ``positions``, a (B, 1, 1, cache length) mask, or one per layer type (sliding-window models)."""
    build = getattr(module, "create_masks_for_generate", create_masks_for_generate)
    shape = torch.empty((mask.shape[0], 1, 0), dtype=module.dtype, device=mask.device)  # sizes only
    return build(
        config=module.config, inputs_embeds=shape, attention_mask=mask, cache=cache, position_ids=positions
    )


def cache_layers(cache: Cache) -> list[tuple[torch.Tensor, torch.Tensor, int | None]]:
    """Each layer of a dynamic ``cache`` as its (B, H_kv, held, D) keys and values and its sliding window
    (``None`` for a full layer; a sliding-window layer holds only its last ``window - 1`` positions, and
    what it drops is invisible to later steps, whatever the attention layer's own window)."""
    return [(layer.keys, layer.values, getattr(layer, "sliding_window", None)) for layer in cache.layers]


PREFIX_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)
"""Cache layer classes (exactly these) whose state is their keys and values alone, so a prefix's can be
kept and restored; linear-attention, SSM and indexed layers hold more and are never kept."""
LENGTH_DEPENDENT_ROPE = frozenset({"dynamic", "longrope"})
"""Rotary types whose frequencies depend on the sequence's length (dynamic NTK, LongRoPE): keys kept from a
shorter prompt were rotated for another length."""

PREFIX_MAX_BYTES = 1 << 30
"""Bytes of keys and values one ``PromptPrefixes`` keeps at most (the default preset's relay answers keep
14 MiB at batch 1, 115 MiB at batch 8)."""


@dataclass
class _Prompt:
    """One prompt pass: its inputs and the keys and values it left in its cache."""

    embeds: torch.Tensor  # (B, T, d)
    mask: torch.Tensor  # (B, T)
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (B, H_kv, T, D) keys, values

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer)


def prefix_reusable(model: PreTrainedModel) -> bool:
    """Whether ``model``'s prompt passes may start from keys and values another pass computed: not when its
    rotary embedding depends on the sequence's length (``LENGTH_DEPENDENT_ROPE``, in any layer type)."""
    config = getattr(model, "config", None)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    tables = rope.values() if all(isinstance(v, dict) for v in rope.values()) and rope else [rope]
    return not any(table.get("rope_type") in LENGTH_DEPENDENT_ROPE for table in tables)


class PromptPrefixes:
    """The last prompt pass of each agent in one run, so that the agent's next prompt pass that begins with
    the same columns runs only the columns after them (prefix caching).

    Within a run an agent's prompts repeat: every round renders the same system prompt, private notes and
    question before the slot where a message arrives, and left padding keeps those columns in place across
    rounds when what follows the slot keeps its length (latent messages of a fixed number of thoughts; a
    text message of another length shifts every column). ``shared`` finds the columns of a new (B, T, d)
    prompt that equal the last one's exactly (embeddings and padding mask, every row); the prompt pass then
    starts from ``cache`` (a dynamic cache holding their keys and values) and runs the other columns.
    Outputs equal a whole pass up to float rounding (the products see fewer rows) where the caller allows
    it: the model's rotary embedding does not depend on the length (``prefix_reusable``), and layers that
    pick their kernel by the input's rows see the same side of their threshold (``kernel_rows``).

    A pass is remembered (``keep``) by reference to its cache's tensors, which dynamic caches never write
    in place (they grow by concatenation). Not remembered: a cache with layers other than
    ``PREFIX_LAYERS`` (linear attention, state-space or indexed layers hold more than keys and values), one
    whose sliding-window layers dropped positions, and one that would take the keys and values kept past
    ``max_bytes`` (they stay alive until the object goes, beside the caches the passes after them
    allocate: a bound on what reuse adds to a run's memory). One object lives for one batch of a run
    (``RecursiveMAS.run``), while the weights cannot change; keys name an agent (or an agent's row).
    """

    def __init__(self, max_bytes: int = PREFIX_MAX_BYTES) -> None:
        self._last: dict[Hashable, _Prompt] = {}
        self.max_bytes = max_bytes

    def shared(self, key: Hashable, embeds: torch.Tensor, mask: torch.Tensor, kernel_rows: int = 0) -> int:
        """How many leading columns of the (B, T, d) ``embeds`` and (B, T) ``mask`` equal those of ``key``'s
        last prompt in every row; at most T - 1, since the last column's output is always computed. With
        ``kernel_rows`` (layers multiply inputs of up to that many rows by another kernel), a pass of more
        than ``kernel_rows`` rows (B x T) still runs more than ``kernel_rows`` rows: the same kernels."""
        last = self._last.get(key)
        if last is None or last.embeds.shape[0] != embeds.shape[0] or last.embeds.dtype != embeds.dtype:
            return 0
        bsz, width = mask.shape
        to_run = kernel_rows // bsz + 1 if bsz * width > kernel_rows else 1  # columns the pass must run
        n = max(min(last.embeds.shape[1], width - to_run), 0)
        same = (last.embeds[:, :n] == embeds[:, :n]).all(-1).all(0)  # (n,) column equal in every row
        same &= (last.mask[:, :n] == mask[:, :n]).all(0)
        differ = (~same).nonzero()  # (k, 1)
        return int(differ[0, 0]) if differ.shape[0] else n

    def start(
        self,
        key: Hashable,
        model: PreTrainedModel,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        kernel_rows: int,
    ) -> tuple[int, Cache]:
        """(``shared`` columns, a dynamic cache for ``model`` holding their keys and values): where a prompt
        pass of ``embeds`` (B, T, d) and ``mask`` (B, T) under ``key`` starts (0 and an empty cache when
        nothing is shared)."""
        shared = self.shared(key, embeds, mask, kernel_rows)
        return shared, self.cache(key, model, shared) if shared else new_cache(model)

    def cache(self, key: Hashable, model: PreTrainedModel, columns: int) -> Cache:
        """A new dynamic cache for ``model`` holding the keys and values of the first ``columns`` columns
        of ``key``'s last prompt."""
        cache = new_cache(model)
        for i, (keys, values) in enumerate(self._last[key].layers):
            cache.update(keys[:, :, :columns], values[:, :, :columns], i)
        return cache

    def keep(self, key: Hashable, embeds: torch.Tensor, mask: torch.Tensor, cache: Cache) -> None:
        """Remember the dynamic ``cache`` a prompt pass of ``embeds`` (B, T, d) and ``mask`` (B, T) filled
        as ``key``'s last prompt, unless a layer is not one of ``PREFIX_LAYERS`` or holds fewer than T
        positions, or it would pass ``max_bytes``."""
        self._last.pop(key, None)
        if any(type(layer) not in PREFIX_LAYERS for layer in cache.layers):
            return
        prompt = _Prompt(embeds, mask, [(keys, values) for keys, values, _ in cache_layers(cache)])
        if any(keys.shape[2] != embeds.shape[1] for keys, _ in prompt.layers):
            return
        if prompt.nbytes + sum(p.nbytes for p in self._last.values()) <= self.max_bytes:
            self._last[key] = prompt
