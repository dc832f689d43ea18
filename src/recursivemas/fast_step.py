"""One-position steps without transformers' per-forward machinery (eager, inference only).

A latent step or a decode step runs one position through every layer. Through ``model(...)`` that
position pays for far more than its matrix products: the masks are rebuilt from the whole padding mask,
the cache grows by concatenation (every layer copies its keys and values), keyword arguments pass through
several decorators and an attention-function registry, and outputs are wrapped in dataclasses. On the
bundled models at batch 1 on a CPU that is about a fifth of a step (``benchmarks/roofline.py``).

``FastSteps`` runs the same layers from the model's own weights and modules (a plain ``nn.Linear`` as
``torch.mm`` on its weight, an ``Int8Linear`` through its ``step_op``, any other projection module called
as is), with what surrounds them kept to the minimum for one position:

- keys and values live in per-layer buffers of shape (B, H_kv, T + n, D) preallocated for the prompt
  plus ``n`` steps; the prompt's come from the transformers cache of the prompt pass, and step t writes
  its own into column t (one copy, no growth);
- the attention mask of step t is a (B, 1, 1, t + 1) additive mask (0 or -inf) from the padding mask (a
  sliding-window layer also drops columns <= t - window), built once per step and window and shared by
  the layers;
- grouped-query attention runs on the key/value heads: the (B, H, D) query becomes (B, H_kv, H / H_kv, D)
  so SDPA reads each key once (as transformers does for one query position);
- the rotary cos/sin of the position are computed once per step per layer type by the model's own
  ``rotary_emb``.

Each layer computes exactly what transformers' layer does (RMSNorms, q/k norms, rotary embedding, scaled
softmax attention, the residual pattern of Llama / Qwen or of Gemma-3's four norms), so outputs equal
``model(...)`` over a ``DynamicCache`` up to float rounding (float64 tests: 1e-10).

Supported: the model types in ``SUPPORTED`` (Llama, Qwen2, Qwen3, Gemma-3 text) without forward hooks on
the decoder's modules (plain projections and norms are not called as modules, so hooks would be skipped);
``FastSteps.supports`` says whether a model qualifies, and ``_Forwards`` falls back to ``model(...)``
otherwise, with gradients enabled (the buffers are written in place) and when steps are compiled or use
a static cache. Sliding-window layers keep every position in their buffer (transformers keeps the last
``window - 1``): more memory and attention work at prompts far beyond the window, same outputs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from transformers import Cache, PreTrainedModel

from .cache import cache_layers

SUPPORTED = frozenset({"llama", "qwen2", "qwen3", "gemma3_text"})
"""``config.model_type`` values whose decoder layers ``FastSteps`` reproduces."""


Op = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class _Layer:
    """One decoder layer's operations and attention settings, looked up once."""

    norm_in: Op  # a decoder layer always has these norms (``_norm`` maps None only to None)
    q: Op
    k: Op
    v: Op
    o: Op
    q_norm: Op | None
    k_norm: Op | None
    norm_attn: Op  # post_attention_layernorm: after attention (Gemma) or before the MLP (Llama)
    norm_pre_ff: Op | None  # Gemma: before the MLP
    norm_post_ff: Op | None  # Gemma: after the MLP
    gate: Op
    up: Op
    down: Op
    act: Op
    kind: str  # the layer type ("full_attention", "sliding_attention"): picks the rotary table
    window: int | None  # attend to columns > t - window (the attention's window or its cache layer's)
    scaling: float
    heads: int
    kv_heads: int
    head_dim: int


def _linear(module: torch.nn.Module, rows: int) -> Op:
    """A projection as a plain function of a 2-D (``rows``, in) input: ``torch.mm`` with the transposed
    weight (a view; saves ``F.linear``'s dispatch through ``matmul``) on a plain ``nn.Linear``; a module's
    own ``step_op(rows)`` if it has one (``Int8Linear``); else the module itself (adapters)."""
    if type(module) is torch.nn.Linear:
        weight_t, bias = module.weight.t(), module.bias  # (in, out) view
        if bias is None:
            return lambda x: torch.mm(x, weight_t)
        return lambda x: torch.addmm(bias, x, weight_t)
    step_op = getattr(module, "step_op", None)  # a module's own plain function for (rows, in) inputs
    return step_op(rows) if step_op is not None else module


def _norm(module: torch.nn.Module | None) -> Op | None:
    """An RMSNorm with transformers' semantics and rounding in fewer operators (``_normalized``). Llama
    / Qwen normalise in float32, cast back, then multiply by the weight; Gemma multiplies by (1 + weight)
    in float32, then casts. Any other norm module is called as is."""
    if module is None:
        return None
    weight = getattr(module, "weight", None)
    if type(module).__name__.startswith("Gemma") and hasattr(module, "eps"):
        scale, eps = 1.0 + weight.float(), module.eps  # (d,) float32
        return lambda x: (_normalized(x.float(), eps) * scale).to(x.dtype)
    if hasattr(module, "variance_epsilon") and weight is not None:
        eps = module.variance_epsilon
        return lambda x: weight * _normalized(x.float(), eps).to(x.dtype)
    return module


def _normalized(x: torch.Tensor, eps: float) -> torch.Tensor:
    """(..., d) -> x * rsqrt(mean(x^2, -1) + eps), rounded as transformers' ``pow(2).mean`` on a CPU
    (where ``mean`` is ``sum`` then a division) with half the operator calls."""
    inv = (x * x).sum(-1, keepdim=True)  # (..., 1)
    return x * inv.div_(x.shape[-1]).add_(eps).rsqrt_()


def _layer(module: torch.nn.Module, kind: str, rows: int) -> _Layer:
    """A decoder layer's operations for (``rows``, d) inputs of layer type ``kind``."""
    attn, mlp = module.self_attn, module.mlp
    linear = partial(_linear, rows=rows)
    return _Layer(
        norm_in=_norm(module.input_layernorm),
        q=linear(attn.q_proj),
        k=linear(attn.k_proj),
        v=linear(attn.v_proj),
        o=linear(attn.o_proj),
        q_norm=_norm(getattr(attn, "q_norm", None)),
        k_norm=_norm(getattr(attn, "k_norm", None)),
        norm_attn=_norm(module.post_attention_layernorm),
        norm_pre_ff=_norm(getattr(module, "pre_feedforward_layernorm", None)),
        norm_post_ff=_norm(getattr(module, "post_feedforward_layernorm", None)),
        gate=linear(mlp.gate_proj),
        up=linear(mlp.up_proj),
        down=linear(mlp.down_proj),
        act=mlp.act_fn,
        kind=kind,
        window=getattr(attn, "sliding_window", None),
        scaling=float(attn.scaling),
        heads=attn.config.num_attention_heads,
        kv_heads=attn.config.num_key_value_heads,
        head_dim=attn.head_dim,
    )


def _rotation(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(B, D) cos and sin of each row's position -> (B, D, D) ``R`` with ``x @ R`` = transformers' rotary
    embedding ``x * cos + rotate_half(x) * sin`` (halves layout: ``rotate_half(x) = cat(-x2, x1)``), so
    queries and keys of every head rotate in one batched product."""
    half = cos.shape[-1] // 2
    rot = torch.diag_embed(cos)  # (B, D, D)
    idx = torch.arange(half, device=cos.device)
    rot[:, idx + half, idx] = -sin[:, :half]  # out[j] gets -x[j + h] sin[j] for j < h
    rot[:, idx, idx + half] = sin[:, half:]  # out[j + h] gets x[j] sin[j + h]
    return rot


class FastSteps:
    """The one-position steps after a prompt pass, over preallocated key/value buffers.

    Built from the transformers cache the prompt pass filled, the (B, T) padding mask and (B, T) position
    ids of the prompt, and ``steps``, the most one-position steps to come. ``step`` runs one position and
    returns the (B, d) last-layer hidden state (after the final norm), or with ``head`` (the LM head) the
    (B, V) float32 logits.
    """

    def __init__(
        self,
        backbone: PreTrainedModel,
        cache: Cache,
        mask: torch.Tensor,
        positions: torch.Tensor,
        steps: int,
        head: torch.nn.Module | None = None,
    ) -> None:
        config = backbone.config
        kinds = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        self.layers = [_layer(m, kind, mask.shape[0]) for m, kind in zip(backbone.layers, kinds, strict=True)]
        self.norm, self.embed, self.head = _norm(backbone.norm), backbone.embed_tokens, head
        self.softcap = getattr(config, "final_logit_softcapping", None) if head is not None else None
        self.rotary = _rotary(backbone.rotary_emb)
        bsz, width = mask.shape
        self.length = width  # positions held so far
        self.valid = torch.zeros(bsz, width + steps, dtype=torch.bool, device=mask.device)  # (B, T + n)
        self.valid[:, :width] = mask.bool()
        self.pos = positions[:, -1:]  # (B, 1)
        self.keys, self.values = [], []
        for layer, (k, v, cache_window) in zip(self.layers, cache_layers(cache), strict=True):
            windows = [w for w in (layer.window, cache_window) if w is not None]
            layer.window = min(windows) if windows else None  # a position the cache dropped is not seen
            shape = (bsz, layer.kv_heads, width + steps, layer.head_dim)
            keys, values = k.new_zeros(shape), v.new_zeros(shape)  # (B, H_kv, T + n, D)
            held = k.shape[2]  # a sliding-window layer may hold only its last window - 1 positions
            keys[:, :, width - held : width] = k
            values[:, :, width - held : width] = v
            self.keys.append(keys)
            self.values.append(values)
        self.windows = {layer.window for layer in self.layers}  # one mask per distinct window a step
        self.kinds = {layer.kind for layer in self.layers}  # one rotary matrix per layer type a step

    @staticmethod
    def supports(model: PreTrainedModel) -> bool:
        """Whether ``model`` (a backbone or causal LM) has decoder layers ``FastSteps`` reproduces."""
        config = model.config
        if getattr(config, "model_type", None) not in SUPPORTED:
            return False
        if getattr(config, "use_bidirectional_attention", False):
            return False
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        if hasattr(decoder, "rotary_emb_local"):  # releases with one rotary module per layer type
            return False
        return not any(m._forward_hooks or m._forward_pre_hooks for m in decoder.modules())

    def step(
        self, inputs_embeds: torch.Tensor | None = None, input_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One position, given as the model takes it ((B, 1, d) ``inputs_embeds`` or (B, 1) ``input_ids``)
        -> its (B, d) hidden state, or with a head its (B, V) float32 logits."""
        x = (self.embed(input_ids) if inputs_embeds is None else inputs_embeds)[:, 0]  # (B, d)
        t = self.length
        if t >= self.valid.shape[1]:
            raise RuntimeError(
                f"FastSteps was sized for {self.valid.shape[1]} positions; step {t + 1} does not fit"
            )
        self.valid[:, t] = True
        self.pos = self.pos + 1
        bias = {w: self._bias(t, w, x.dtype) for w in self.windows}  # (B, 1, 1, t + 1) each
        wide = torch.promote_types(x.dtype, torch.float32)  # CPU bfloat16 bmm is 10x slower
        rotation = {}
        for kind in self.kinds:
            cos, sin = self.rotary(x, self.pos, kind)  # (B, 1, D) each, in x's dtype
            rotation[kind] = _rotation(cos[:, 0].to(wide), sin[:, 0].to(wide))  # (B, D, D)
        for i, layer in enumerate(self.layers):
            x = self._layer(i, layer, x, t, bias[layer.window], rotation[layer.kind])
        self.length = t + 1
        h = self.norm(x)  # (B, d)
        if self.head is None:
            return h
        logits = self.head(h).float()  # (B, V)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _bias(self, t: int, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """(B, 1, 1, t + 1) additive attention mask of position t: 0 where it may attend (a real token,
        within ``window`` if set), -inf elsewhere."""
        allowed = self.valid[:, None, None, : t + 1]
        outside = t - window + 1 if window is not None else 0  # columns 0 .. t - window
        if outside > 0:
            allowed = allowed.clone()
            allowed[..., :outside] = False
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
            ~allowed, float("-inf")
        )

    def _layer(
        self, i: int, layer: _Layer, x: torch.Tensor, t: int, bias: torch.Tensor, rotation: torch.Tensor
    ) -> torch.Tensor:
        """One decoder layer on the (B, d) position ``t``, writing its key and value into the buffers.

        Attention of the one query per head: softmax(q K^T * scaling + bias) V over columns 0..t (SDPA); the
        H query heads are viewed as (H_kv, G) so each group reads its key/value head once."""
        bsz, heads, kv_heads, dim = x.shape[0], layer.heads, layer.kv_heads, layer.head_dim
        y = layer.norm_in(x)
        q = layer.q(y).view(bsz, heads, dim)  # (B, H, D)
        k = layer.k(y).view(bsz, kv_heads, dim)  # (B, H_kv, D)
        v = layer.v(y).view(bsz, kv_heads, dim)
        if layer.q_norm is not None:
            q, k = layer.q_norm(q), layer.k_norm(k)
        qk = torch.cat((q, k), 1).to(rotation.dtype)  # (B, H + H_kv, D)
        qk = torch.bmm(qk, rotation).to(x.dtype)  # rotated
        keys, values = self.keys[i], self.values[i]
        keys[:, :, t] = qk[:, heads:]
        values[:, :, t] = v
        query = qk[:, :heads].view(bsz, kv_heads, heads // kv_heads, dim)  # (B, H_kv, G, D)
        out = F.scaled_dot_product_attention(
            query, keys[:, :, : t + 1], values[:, :, : t + 1], attn_mask=bias, scale=layer.scaling
        )  # (B, H_kv, G, D)
        y = layer.o(out.reshape(bsz, heads * dim))  # (B, d)
        if layer.norm_pre_ff is None:  # Llama / Qwen: x + attn(norm(x)), then x + mlp(norm(x))
            x = x + y
            return x + _mlp(layer, layer.norm_attn(x))
        x = x + layer.norm_attn(y)  # Gemma-3: norms after attention and around the MLP
        return x + layer.norm_post_ff(_mlp(layer, layer.norm_pre_ff(x)))


def _mlp(layer: _Layer, y: torch.Tensor) -> torch.Tensor:
    """The gated MLP of transformers' Llama / Qwen / Gemma layers: down(act(gate(y)) * up(y)), (B, d)."""
    return layer.down(layer.act(layer.gate(y)) * layer.up(y))


def _rotary(
    module: torch.nn.Module,
) -> Callable[[torch.Tensor, torch.Tensor, str], tuple[torch.Tensor, torch.Tensor]]:
    """The model's rotary embedding as ``f(x, positions, layer_type) -> (cos, sin)``, whether or not its
    ``forward`` takes a layer type (Gemma-3 has one rotary table per layer type)."""
    if "layer_type" in inspect.signature(module.forward).parameters:
        return lambda x, pos, kind: module(x, pos, kind)
    return lambda x, pos, kind: module(x, pos)
