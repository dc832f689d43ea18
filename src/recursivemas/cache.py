"""The only module that touches transformers' KV-cache API.

The Cache API moves between transformers releases (``past_key_values=`` became ``cache=`` in 5.x,
layer classes changed); everything version-dependent lives here.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch
from transformers import Cache, DynamicCache, PreTrainedModel, StaticCache
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
