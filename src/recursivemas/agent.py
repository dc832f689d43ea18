"""Agent: one frozen HuggingFace causal LM with its tokenizer and role prompt.

An agent can

* embed a spliced prompt (text segments + latent vectors, SPEC §4) into a left-padded batch;
* ``think()``: run ``m`` latent steps with a KV cache (SPEC §3), returning the raw last-layer hidden
  states ``H = [h_1..h_m]`` and ``E = [R_in(h_1)..R_in(h_m)]``;
* ``think_reference()``: the same rollout by re-encoding the whole sequence at every step, as the
  release does (for verification and benchmarks);
* ``decode()``: generate text (greedy or sampled) from a spliced prompt;
* ``decode_with_tools()``: the same, with tool calls run inside the decode (results fed into the cache).

Batches are left padded with zero vectors and attention mask 0; position ids are counted over real
positions only, so a row's result does not depend on the padding around it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import weakref
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from transformers import CompileConfig, PreTrainedModel
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from recursivemas.cache import PromptPrefixes, cache_kwargs, new_cache, prefix_reusable, step_mask
from recursivemas.errors import ConfigError, NonFiniteLatentError, PromptTooLongError
from recursivemas.fast_step import FastSteps
from recursivemas.links import InnerLink
from recursivemas.models import load_model
from recursivemas.prompts import PromptTemplate, Segment, SlotRef, render_prompt
from recursivemas.tools import ToolBox, ToolCall

# One row of a spliced prompt: text to tokenise with this agent's tokenizer, or latent vectors
# (k, d) already in this agent's input-embedding space.
Piece = str | torch.Tensor


@dataclass
class PromptBatch:
    """A left-padded batch of spliced prompts.

    Attributes:
        embeds: (B, T, d) input embeddings, zero at padding.
        mask: (B, T) attention mask, 0 at padding (left).
        text_tokens: per row, the number of text tokens in the prompt.
        latent_inputs: per row, the number of spliced latent vectors.
    """

    embeds: torch.Tensor
    mask: torch.Tensor
    text_tokens: list[int]
    latent_inputs: list[int]

    @property
    def lengths(self) -> list[int]:
        return self.mask.sum(-1).tolist()


@dataclass
class Thoughts:
    """Result of a latent rollout: ``hidden`` (B, m, d) raw states, ``embeds`` (B, m, d) = R_in(hidden)."""

    hidden: torch.Tensor
    embeds: torch.Tensor


MIN_TEMPERATURE = 1e-4
FINGERPRINT_ROWS = 1024


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings. ``temperature == 0`` means greedy; ``seed`` makes sampling reproducible."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        t = self.temperature
        if not math.isfinite(t) or t < 0 or 0 < t < MIN_TEMPERATURE:
            raise ConfigError(
                f"temperature must be 0 (greedy) or a finite value >= {MIN_TEMPERATURE}, got {t}"
            )
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.seed < 2**62:
            raise ConfigError(f"seed must be in [0, 2**62), got {self.seed}")


@dataclass(frozen=True)
class StepConfig:
    """How the one-position steps of ``Agent.think`` and ``Agent.decode`` run (the prompt pass and decodes
    with tools always run eagerly over a dynamic cache).

    Attributes:
        static_cache: keep keys and values in a ``StaticCache`` preallocated for the prompt plus the steps
            (rounded up to a multiple of ``cache_bucket``) instead of a growing ``DynamicCache``; each
            step's attention mask is built before its forward, as ``generate`` does with
            ``cache_implementation="static"``. Outputs equal the dynamic cache's up to float rounding.
        compile: run each step's forward through ``torch.compile``, compiled once per module and settings
            (as transformers' ``get_compiled_call``); implies ``static_cache``. The first calls compile
            (seconds on a GPU, up to minutes on a CPU); a new model class, batch size or cache length
            compiles again (after a second size, dynamo makes that dimension dynamic; batch 1 stays
            its own graph).
        compile_mode: the ``torch.compile`` mode for the inductor backend; ``None``: ``"reduce-overhead"``
            (CUDA graphs) on CUDA, ``"default"`` elsewhere.
        compile_backend: ``"inductor"`` generates kernels; ``"aot_eager"`` traces the same graph and runs it
            with eager kernels (quick to compile: for checks).
        cache_bucket: static caches hold a multiple of this many positions, so calls with nearby lengths
            share one compiled graph.
        fast: run eager steps over a dynamic cache through ``fast_step.FastSteps`` (the model's own
            layers without transformers' per-forward masks, cache growth and wrappers; a batch-1 step
            takes about a fifth less time on a CPU) where ``FastSteps.supports`` the model and gradients
            are off; ``False``: every step is a ``model(...)`` call.
        reuse_prefixes: when ``think`` or ``decode`` get a ``PromptPrefixes`` (``RecursiveMAS.run`` gives one
            per batch), a prompt pass whose first columns equal the agent's previous prompt pass's runs only
            the columns after them, over a cache holding theirs (with gradients off and a dynamic cache);
            ``False``: every prompt pass runs whole.
    """

    static_cache: bool = False
    compile: bool = False
    compile_mode: str | None = None
    compile_backend: str = "inductor"
    cache_bucket: int = 256
    fast: bool = True
    reuse_prefixes: bool = True

    def __post_init__(self) -> None:
        if self.cache_bucket < 1:
            raise ConfigError(f"cache_bucket must be >= 1, got {self.cache_bucket}")

    @property
    def static(self) -> bool:
        """Whether steps use a static cache (asked for, or needed by ``compile``)."""
        return self.static_cache or self.compile

    def cache_length(self, positions: int) -> int:
        """The static cache length for ``positions`` positions: the next multiple of ``cache_bucket``."""
        return -(-positions // self.cache_bucket) * self.cache_bucket

    def compile_config(self, device: torch.device) -> CompileConfig:
        """transformers' ``CompileConfig`` for steps on ``device``."""
        if self.compile_backend != "inductor":
            return CompileConfig(backend=self.compile_backend, mode=None)
        mode = self.compile_mode or ("reduce-overhead" if device.type == "cuda" else "default")
        return CompileConfig(backend="inductor", mode=mode)


GenerationSettings = GenerationConfig | Sequence[GenerationConfig]
"""One ``GenerationConfig`` for every row of a batch, or a sequence of them, one per row."""

TokenCallback = Callable[[int, str], None]
"""``on_token(row, text)``: called after each new token of batch row ``row`` with the row's text so far,
exactly what the decode would return for that row if it stopped there (an EOS token calls nothing)."""


def per_row(gen: GenerationSettings, rows: int, what: str = "rows") -> list[GenerationConfig]:
    """``rows`` generation configs: ``gen`` repeated, or ``gen`` itself if it is a sequence of that length.

    ``what`` names the rows in the error (``"rows"``, ``"inputs"``).
    """
    if isinstance(gen, GenerationConfig):
        return [gen] * rows
    gens = list(gen)
    if not all(isinstance(g, GenerationConfig) for g in gens):
        raise ConfigError("generation settings must be a GenerationConfig or a sequence of them, one per row")
    if len(gens) != rows:
        raise ConfigError(
            f"got {len(gens)} generation configs for {rows} {what}: pass one GenerationConfig for all of "
            f"them, or exactly one per {what.removesuffix('s')}"
        )
    return gens


def row_seeds(
    gen: GenerationSettings, rows: int, seeds: Sequence[int] | None = None, what: str = "rows"
) -> list[int]:
    """Each row's sampling seed: ``seeds`` if given; else ``gen.seed + i`` for one config, or each row's
    own config's ``seed`` for one config per row (so a row samples as it would alone)."""
    if seeds is not None:
        if len(seeds) != rows:
            raise ConfigError(f"got {len(seeds)} seeds for {rows} {what}")
        return [int(s) for s in seeds]
    if isinstance(gen, GenerationConfig):
        return [gen.seed + i for i in range(rows)]
    return [g.seed for g in per_row(gen, rows, what)]


@dataclass
class Decoded:
    """Generated text per row, the number of generated tokens per row (EOS included) and, per row, the
    generated token ids themselves (EOS included; tool results fed into the cache are not generated)."""

    texts: list[str]
    num_tokens: list[int]
    seconds: float = 0.0
    token_ids: list[list[int]] = field(default_factory=list)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask -> (B, T) positions counted over real tokens (0 at and before the first real one)."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def left_pad(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (T_i, d) rows into (B, T, d) embeddings with zeros on the left, and the (B, T) mask."""
    width = max(r.shape[0] for r in rows)
    d = rows[0].shape[-1]
    embeds = rows[0].new_zeros(len(rows), width, d)
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=rows[0].device)
    for i, row in enumerate(rows):
        embeds[i, width - row.shape[0] :] = row
        mask[i, width - row.shape[0] :] = 1
    return embeds, mask


@dataclass
class Agent:
    """A frozen causal LM acting under a role.

    Attributes:
        name: unique name in a system (``"planner"``).
        model: any ``AutoModelForCausalLM``; put in eval mode with gradients off.
        tokenizer: its tokenizer.
        template: the role prompt; ``None`` lets a pattern builder pick the default for ``role``.
        role: the role (defaults to ``name``).
        model_id: HF id, local path or registry name the model came from (recorded in checkpoints).
        chat_template_kwargs: extra arguments for ``apply_chat_template`` (e.g. ``enable_thinking``).
        step_config: how latent and decode steps run (eager over a dynamic cache by default; a static
            cache and ``torch.compile`` for GPUs, see ``StepConfig``).
    """

    name: str
    model: PreTrainedModel
    tokenizer: Any
    template: PromptTemplate | None = None
    role: str = ""
    model_id: str = ""
    chat_template_kwargs: dict = field(default_factory=dict)
    step_config: StepConfig = field(default_factory=StepConfig)

    def __post_init__(self) -> None:
        self._embedding = self.model.get_input_embeddings()
        if not self.name.isidentifier():
            raise ConfigError(f"agent name {self.name!r} must be a Python identifier (letters, digits, _)")
        self.role = self.role or self.name
        self.model.eval()
        self.model.requires_grad_(False)
        if self.device.type == "cpu":
            # Dequantised GGUF weights drive CPU matmuls into denormal floats, 20-25x slower (measured on
            # SmolLM2). Flushing them to zero is process-wide and changes results by less than rounding.
            torch.set_flush_denormal(True)
        _row_major_head_inputs(self.model.get_output_embeddings())
        getter = getattr(self.model, "get_decoder", None)
        self.backbone = getter() if getter is not None else self.model.base_model
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        self._lens_table: torch.Tensor | None = None
        self._fingerprint: str | None = None
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.eos_ids[0] if self.eos_ids else 0

    @classmethod
    def from_pretrained(
        cls,
        model_id: str,
        name: str,
        template: PromptTemplate | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        **kwargs: Any,
    ) -> Agent:
        """Load an agent from a registry name, HF id or local path (see ``recursivemas.models``)."""
        model, tokenizer = load_model(model_id, dtype, str(device))
        return cls(
            name=name, model=model, tokenizer=tokenizer, template=template, model_id=model_id, **kwargs
        )

    # --- properties ------------------------------------------------------------------------------

    @property
    def hidden_size(self) -> int:
        return int(self._embedding.weight.shape[-1])

    @property
    def device(self) -> torch.device:
        return self._embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self._embedding.weight.dtype

    @property
    def max_context(self) -> int:
        config = self.model.config.get_text_config()
        return int(getattr(config, "max_position_embeddings", None) or 2**31)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(…,) token ids -> (…, d) input embeddings, exactly as the model embeds ``input_ids``."""
        return self._embedding(ids.to(self.device))

    @torch.no_grad()
    def input_embedding_matrix(self, chunk: int = 16384) -> torch.Tensor:
        """(V, d) float32 input embeddings of every token (embedding scales such as Gemma's included)."""
        vocab = self._embedding.weight.shape[0]
        ids = torch.arange(vocab, device=self.device)
        return torch.cat([self.embed(ids[i : i + chunk]).float() for i in range(0, vocab, chunk)])

    @torch.no_grad()
    def nearest_tokens(self, vectors: torch.Tensor, k: int) -> list[list[str]]:
        """(n, d) vectors -> for each, the ``k`` tokens whose input embeddings are closest in cosine."""
        if self._lens_table is None:
            self._lens_table = torch.nn.functional.normalize(self.input_embedding_matrix(), dim=-1)  # (V, d)
        sims = (
            torch.nn.functional.normalize(vectors.float().to(self.device), dim=-1) @ self._lens_table.T
        )  # (n, V)
        top = sims.topk(k, dim=-1).indices.tolist()
        return [self.tokenizer.convert_ids_to_tokens(row) for row in top]

    def fingerprint(self) -> str:
        """A short hash of the model: class, sizes, and strided samples of its input embeddings and LM head.

        Weights are rounded to bfloat16 first, so the model loaded in float32 or bfloat16 hashes the same.
        Computed once per agent.
        """
        if self._fingerprint is None:
            config = self.model.config.get_text_config()
            digest = hashlib.sha256()
            digest.update(
                json.dumps(
                    [
                        type(self.model).__name__,
                        config.hidden_size,
                        config.num_hidden_layers,
                        self._embedding.weight.shape[0],
                    ]
                ).encode()
            )
            for weight in (self._embedding.weight, self.model.get_output_embeddings().weight):
                stride = max(1, weight.shape[0] // FINGERPRINT_ROWS)
                digest.update(weight.detach()[::stride].to(torch.bfloat16).float().cpu().numpy().tobytes())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def output_embedding_matrix(self) -> torch.Tensor:
        """(V, d) float32 LM-head weights."""
        return self.model.get_output_embeddings().weight.detach().float()

    # --- prompts ---------------------------------------------------------------------------------

    def render(self, question: str, context: str | None, present: set[str], round_: int = 1) -> list[Segment]:
        """This agent's prompt in round ``round_`` as text segments and slot markers."""
        if self.template is None:
            raise ConfigError(f"agent {self.name!r} has no prompt template")
        return render_prompt(
            self.tokenizer, self.template, question, context, present, self.chat_template_kwargs, round_
        )

    def encode(self, rows: Sequence[Sequence[Piece]]) -> PromptBatch:
        """Embed spliced prompt rows (text pieces tokenised here, latent pieces as given) and left-pad."""
        texts = [p for row in rows for p in row if isinstance(p, str)]
        ids = iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
        embedded, text_tokens, latent_inputs = [], [], []
        for row in rows:
            parts, n_text, n_latent = [], 0, 0
            for piece in row:
                if isinstance(piece, str):
                    piece_ids = torch.tensor(next(ids), dtype=torch.long, device=self.device)
                    parts.append(self.embed(piece_ids))
                    n_text += len(piece_ids)
                else:
                    parts.append(piece.to(device=self.device, dtype=self.dtype))
                    n_latent += piece.shape[0]
            embedded.append(torch.cat(parts))
            text_tokens.append(n_text)
            latent_inputs.append(n_latent)
        embeds, mask = left_pad(embedded)
        return PromptBatch(embeds, mask, text_tokens, latent_inputs)

    def fill(self, segments: Sequence[Segment], values: dict[str, Piece]) -> list[Piece]:
        """Replace every ``SlotRef`` in rendered segments by its value (text or latent vectors)."""
        return [values[s.name] if isinstance(s, SlotRef) else s for s in segments]

    def check_fits(self, batch: PromptBatch, extra: int | Sequence[int], what: str) -> None:
        """Raise ``PromptTooLongError`` if a prompt plus its ``extra`` positions (one number for every row,
        or one per row) exceeds the context."""
        extras = [extra] * len(batch.lengths) if isinstance(extra, int) else list(extra)
        length, more = max(zip(batch.lengths, extras, strict=True), key=sum)
        if length + more > self.max_context:
            raise PromptTooLongError(
                f"agent {self.name!r}: prompt of {length} positions plus {more} {what} exceeds its "
                f"context window of {self.max_context}; shorten the question or context, or lower "
                f"--latent-steps / --max-new-tokens"
            )

    def reusing(self, prefixes: PromptPrefixes | None) -> PromptPrefixes | None:
        """``prefixes`` if this agent's prompt passes may start after shared columns now (its
        ``step_config.reuse_prefixes``, gradients off: the kept keys and values carry no graph, and a
        rotary embedding that does not depend on the length: ``cache.prefix_reusable``)."""
        if prefixes is None or not self.step_config.reuse_prefixes or torch.is_grad_enabled():
            return None
        return prefixes if prefix_reusable(self.model) else None

    def kernel_rows(self) -> int:
        """The most input rows for which a layer of the model uses another kernel than for more rows
        (``quantize.LowBitLinear.kernel_rows``: int8 and int4 layers); 0 when none does."""
        return max((getattr(m, "kernel_rows", 0) for m in self.model.modules()), default=0)

    # --- latent thoughts -------------------------------------------------------------------------

    def think(
        self,
        batch: PromptBatch,
        steps: int,
        inner: InnerLink,
        round_: int = 0,
        prefixes: PromptPrefixes | None = None,
    ) -> Thoughts:
        """KV-cached latent rollout of ``steps`` steps (SPEC §3).

        Step k feeds ``e_{k-1} = R_in(h_{k-1})`` (the prompt for k = 1), takes the last-layer hidden
        state ``h_k`` at the last position and keeps ``e_k = R_in(h_k)``. Costs one prompt pass plus
        ``steps - 1`` single-position passes (run as ``step_config`` says). With ``prefixes`` (one run's),
        the prompt pass skips the columns it shares with this agent's previous one.

        Returns ``Thoughts`` with hidden (B, m, d) in the model dtype and embeds (B, m, d) in the link's
        dtype (float32 unless the link was cast).
        """
        self.check_fits(batch, steps, "latent steps")
        forwards = _Forwards(self, self.backbone, batch, steps - 1, _last_hidden, prefixes)
        h = forwards.prompt(batch.embeds)  # (B, d) at the last prompt position
        hidden, embeds = [h], [inner(h)]  # embeds in the link's dtype
        for _ in range(steps - 1):
            h = forwards.step(inputs_embeds=embeds[-1].to(self.dtype)[:, None])  # (B, d)
            hidden.append(h)
            embeds.append(inner(h))
        thoughts = Thoughts(torch.stack(hidden, 1), torch.stack(embeds, 1))
        self._check_finite(thoughts, round_)
        return thoughts

    def think_reference(self, batch: PromptBatch, steps: int, inner: InnerLink, round_: int = 0) -> Thoughts:
        """The same rollout as ``think`` but re-encoding the whole sequence each step (no cache)."""
        self.check_fits(batch, steps, "latent steps")
        x, mask = batch.embeds, batch.mask
        hidden, embeds = [], []
        for _ in range(steps):
            out = self.backbone(
                inputs_embeds=x,
                attention_mask=mask,
                position_ids=position_ids(mask),
                **cache_kwargs(self.backbone, None),
            )
            h = out.last_hidden_state[:, -1]  # (B, d)
            e = inner(h)  # (B, d)
            hidden.append(h)
            embeds.append(e)
            x = torch.cat([x, e.to(self.dtype)[:, None]], dim=1)  # (B, T + k, d)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        thoughts = Thoughts(torch.stack(hidden, 1), torch.stack(embeds, 1))
        self._check_finite(thoughts, round_)
        return thoughts

    def _check_finite(self, thoughts: Thoughts, round_: int) -> None:
        for what, t in (("hidden states", thoughts.hidden), ("latent embeddings", thoughts.embeds)):
            if not torch.isfinite(t).all():
                rows = sorted({int(i) for i in (~torch.isfinite(t)).nonzero()[:, 0].tolist()})
                raise NonFiniteLatentError(
                    f"NaN/inf in the {what} of agent {self.name!r} in round {round_} (batch rows {rows}); "
                    f"check the link weights or use a more stable --dtype (float32)"
                )

    # --- text ------------------------------------------------------------------------------------

    def decode(
        self,
        batch: PromptBatch,
        gen: GenerationSettings,
        seeds: Sequence[int] | None = None,
        on_token: TokenCallback | None = None,
        prefixes: PromptPrefixes | None = None,
    ) -> Decoded:
        """Generate text from a spliced prompt batch with a KV cache.

        ``gen`` is one ``GenerationConfig`` for all B rows or a sequence of B, one per row. A row is greedy
        when its ``temperature == 0``; otherwise it samples with its own temperature + top-p from its own
        generator seeded by ``seeds[i]`` (default: ``row_seeds``), so a row's text does not depend on the
        batch it ran in or on the other rows' settings. Each row stops at an EOS token (counted) or at its
        own ``max_new_tokens``. ``on_token`` (see ``TokenCallback``) streams each row's text as it grows.
        With ``prefixes``, the prompt pass skips the columns it shares with this agent's previous one.
        """
        start = time.perf_counter()
        bsz = batch.embeds.shape[0]
        gens = per_row(gen, bsz)
        limits = [g.max_new_tokens for g in gens]
        self.check_fits(batch, limits, "new tokens")
        samplers = [
            _sampler(g, s, self.device) for g, s in zip(gens, row_seeds(gen, bsz, seeds), strict=True)
        ]
        eos = torch.tensor(self.eos_ids or [-1], device=self.device)
        last_step = torch.tensor(limits, device=self.device)  # (B,) a row is done after this many tokens
        forwards = _Forwards(
            self, self.model, batch, max(limits) - 1, _last_logits, prefixes, logits_to_keep=1
        )
        logits = forwards.prompt(batch.embeds)  # (B, V) float32
        done = torch.zeros(bsz, dtype=torch.bool, device=self.device)
        so_far: list[list[int]] = [[] for _ in range(bsz)]  # each row's tokens before EOS, for on_token
        tokens: list[torch.Tensor] = []
        for step in range(1, max(limits) + 1):
            nxt = _choose(logits, samplers)  # (B,)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            tokens.append(nxt)
            if on_token is not None:
                self._report(nxt, done, so_far, on_token)
            done |= torch.isin(nxt, eos) | (last_step <= step)
            if bool(done.all()):
                break
            logits = forwards.step(input_ids=nxt[:, None])  # (B, V)
        generated = torch.stack(tokens, 1).tolist()  # (B, N), pad after a row is done
        rows = [self._finish(row[:limit]) for row, limit in zip(generated, limits, strict=True)]
        return Decoded(
            [text for text, _ in rows],
            [n for _, n in rows],
            time.perf_counter() - start,
            [row[:n] for row, (_, n) in zip(generated, rows, strict=True)],
        )

    def _text(self, ids: Sequence[int]) -> str:
        """Generated ids (EOS excluded) -> the text a decode returns."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def _finish(self, ids: list[int]) -> tuple[str, int]:
        """One row's generated ids, up to its limit -> (its text, its token count with the EOS)."""
        n = next((i + 1 for i, t in enumerate(ids) if t in self.eos_ids), len(ids))
        kept = ids[: n - 1] if ids[n - 1] in self.eos_ids else ids[:n]  # EOS may not be a special token
        return self._text(kept), n

    def _report(
        self, nxt: torch.Tensor, done: torch.Tensor, so_far: list[list[int]], on_token: TokenCallback
    ) -> None:
        """Append this step's (B,) tokens to the rows that were still going (``done`` before the step) and
        call ``on_token`` with the text of each row that got a token other than EOS."""
        for i, (token, finished) in enumerate(zip(nxt.tolist(), done.tolist(), strict=True)):
            if not finished and token not in self.eos_ids:
                so_far[i].append(token)
                on_token(i, self._text(so_far[i]))

    def decode_with_tools(
        self,
        batch: PromptBatch,
        gen: GenerationSettings,
        tools: ToolBox,
        seeds: Sequence[int] | None = None,
        prefix: str = "",
        on_token: TokenCallback | None = None,
        prefixes: PromptPrefixes | None = None,
    ) -> tuple[Decoded, list[list[ToolCall]]]:
        """Generate text in which tool calls run (SPEC 5b, deliberation): row by row, decode until the
        text since the last result holds a complete call (``ToolBox.find_call``), run it, feed
        ``<result>...</result>`` into the same KV cache (the prompt is never re-encoded) and go on.
        ``gen`` is one ``GenerationConfig`` or one per row, as in ``decode``; a row's ``max_new_tokens``
        bounds the generated tokens of its whole decode, calls included; ``prefix`` is text the prompt
        already ends with (e.g. an opening ``<python>`` tag): it counts as decoded text for finding calls
        and starts each returned text. ``on_token`` gets each row's text so far (calls and results
        included) after each of its tokens. Returns the texts (calls and results included) and each
        row's calls."""
        start = time.perf_counter()
        bsz = batch.embeds.shape[0]
        gens = per_row(gen, bsz)
        self.check_fits(batch, [g.max_new_tokens for g in gens], "new tokens")
        texts, ids, calls = [], [], []
        for i, (row_gen, seed) in enumerate(zip(gens, row_seeds(gen, bsz, seeds), strict=True)):
            row = PromptBatch(batch.embeds[i : i + 1], batch.mask[i : i + 1], [], [])
            report = None if on_token is None else partial(on_token, i)
            stream = _CachedStream(self, row, prefixes, (self.name, i))  # row i's own prompts
            text, row_ids, row_calls = self._decode_row_with_tools(
                stream, row_gen, tools, seed, prefix, report
            )
            texts.append(text)
            ids.append(row_ids)
            calls.append(row_calls)
        decoded = Decoded(texts, [len(r) for r in ids], time.perf_counter() - start, ids)
        return decoded, calls

    def _decode_row_with_tools(
        self,
        stream: _CachedStream,
        gen: GenerationConfig,
        tools: ToolBox,
        seed: int,
        prefix: str,
        on_text: Callable[[str], None] | None,
    ) -> tuple[str, list[int], list[ToolCall]]:
        """One row's decode with tools after its prompt pass (``stream``) -> (its text, its generated ids
        with the EOS, its calls)."""
        sampler = _sampler(gen, seed, self.device)
        done_text: list[str] = []  # transcript before the current segment (calls and results)
        segment: list[int] = []  # ids generated since the last result
        calls: list[ToolCall] = []
        generated: list[int] = []  # every generated id, EOS included
        found = tools.find_call(prefix)
        if found is not None:  # the prompt already ends with a complete call: run it first
            calls.append(tools.call(*found, calls_so_far=0))
            done_text += [prefix, ToolBox.result_text(calls[0])]
            stream.feed(self.tokenizer(done_text[-1], add_special_tokens=False)["input_ids"])
        while len(generated) < gen.max_new_tokens:
            token = int(_choose(stream.logits, [sampler]))
            generated.append(token)
            if token in self.eos_ids:
                break
            segment.append(token)
            feed = [token]
            text = (prefix if not done_text else "") + self.tokenizer.decode(
                segment, skip_special_tokens=True
            )
            piece = self.tokenizer.decode([token])
            found = tools.find_call(text) if ">" in piece or "`" in piece else None
            if found is not None:
                calls.append(tools.call(*found, calls_so_far=len(calls)))
                done_text += [text, ToolBox.result_text(calls[-1])]
                segment, text = [], ""
                feed += self.tokenizer(done_text[-1], add_special_tokens=False)["input_ids"]
            if on_text is not None:
                on_text(("".join(done_text) + text).strip())
            if (
                found is not None
                and stream.width + len(feed) + gen.max_new_tokens - len(generated) > self.max_context
            ):
                break  # the result does not fit the context: stop with the transcript so far
            if len(generated) == gen.max_new_tokens:
                break
            stream.feed(feed)
        tail = (prefix if not done_text else "") + self.tokenizer.decode(segment, skip_special_tokens=True)
        return ("".join(done_text) + tail).strip(), generated, calls


RECOMPILE_LIMIT = 64
_COMPILED: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, Callable]] = weakref.WeakKeyDictionary()


def _compiled(module: torch.nn.Module, config: CompileConfig) -> Callable:
    """``module``'s call through ``torch.compile`` under ``config``, made once per module and config (as
    transformers' ``get_compiled_call``, which a backbone without generation settings does not offer), so
    agents sharing a model share its compiled graphs."""
    calls = _COMPILED.setdefault(module, {})
    key = repr(config.to_dict())
    if key not in calls:
        # transformers' forward wrappers share one code object across model classes, so one system's graphs
        # (per model class, batch size and cache length) can pass dynamo's default limit of 8 per code object,
        # past which it falls back to eager without an error.
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
        calls[key] = torch.compile(module.__call__, **config.to_dict())
    return calls[key]


def _last_hidden(out: Any) -> torch.Tensor:
    """A backbone's output -> (B, d) last-layer hidden states at the last position."""
    return out.last_hidden_state[:, -1]


def _last_logits(out: Any) -> torch.Tensor:
    """A causal LM's output -> (B, V) float32 logits at the last position."""
    return out.logits[:, -1].float()


class _Forwards:
    """The forward passes of one latent rollout or decode over one KV cache: an eager prompt pass, then
    one-position steps, run as the agent's ``StepConfig`` says (eager over a dynamic cache by default).

    ``module`` is the backbone (latent steps) or the causal LM (decode steps); ``steps`` bounds the
    one-position steps after the prompt (it sizes a static cache); ``last`` picks the (B, ...) output at
    the last position; ``prefixes`` (``PromptPrefixes``) lets the prompt pass start after the columns it
    shares with the agent's previous one; ``kwargs`` go to every forward (``logits_to_keep``).
    """

    def __init__(
        self,
        agent: Agent,
        module: PreTrainedModel,
        batch: PromptBatch,
        steps: int,
        last: Callable[[Any], torch.Tensor],
        prefixes: PromptPrefixes | None = None,
        **kwargs: Any,
    ) -> None:
        config = agent.step_config
        self.module, self.last, self.static, self.compiled = module, last, config.static, config.compile
        self.steps, self.model, self.key = steps, agent.model, agent.name
        self.prefixes = agent.reusing(prefixes) if not config.static else None
        self.kernel_rows = agent.kernel_rows() if self.prefixes is not None else 0
        length = config.cache_length(batch.mask.shape[1] + steps) if config.static else None
        self.cache = new_cache(agent.model, length)
        self.kwargs = {**cache_kwargs(module, self.cache), **kwargs}
        self.call = _compiled(module, config.compile_config(agent.device)) if config.compile else module
        self.mask, self.pos = batch.mask, position_ids(batch.mask)  # (B, T)
        self.backbone = agent.backbone
        self.head = agent.model.get_output_embeddings() if module is agent.model else None
        self.fast: FastSteps | None = None
        self.use_fast = config.fast and not config.static and FastSteps.supports(agent.model)

    def prompt(self, embeds: torch.Tensor) -> torch.Tensor:
        """Run the (B, T, d) prompt embeddings (always eager) -> the output at its last position. With
        prefixes, only columns ``shared``.. run, over a cache holding the first ``shared``."""
        shared = 0
        if self.prefixes is not None:
            shared, self.cache = self.prefixes.start(
                self.key, self.model, embeds, self.mask, self.kernel_rows
            )
            self.kwargs = {**self.kwargs, **cache_kwargs(self.module, self.cache)}
        out = self.module(
            inputs_embeds=embeds[:, shared:],  # (B, T - shared, d)
            attention_mask=self.mask,  # (B, T): the cached columns' and the new ones'
            position_ids=self.pos[:, shared:],
            **self.kwargs,
        )
        if self.prefixes is not None:
            self.prefixes.keep(self.key, embeds, self.mask, self.cache)
        if self.use_fast and not torch.is_grad_enabled():  # FastSteps writes its buffers in place
            self.fast = FastSteps(self.backbone, self.cache, self.mask, self.pos, self.steps, self.head)
            self.cache, self.kwargs = None, {}  # FastSteps holds its own copy of the keys and values
        return self.last(out)

    def step(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Run one position (``input_ids`` (B, 1) or ``inputs_embeds`` (B, 1, d)) -> its output."""
        if self.fast is not None:
            return self.fast.step(**inputs)
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)  # (B, t + 1)
        self.pos = self.pos[:, -1:] + 1  # (B, 1)
        mask = step_mask(self.module, self.mask, self.cache, self.pos) if self.static else self.mask
        out = self.last(self.call(**inputs, attention_mask=mask, position_ids=self.pos, **self.kwargs))
        return out.clone() if self.compiled else out  # CUDA graphs overwrite their outputs on the next replay


class _CachedStream:
    """One row's KV-cached forward passes: the prompt, then any tokens fed after it. With ``prefixes``, the
    prompt pass starts after the columns it shares with the last prompt kept under ``key``."""

    def __init__(
        self,
        agent: Agent,
        row: PromptBatch,
        prefixes: PromptPrefixes | None = None,
        key: Hashable = "",
    ) -> None:
        self.model, self.device = agent.model, agent.device
        self.mask, self.pos = row.mask, position_ids(row.mask)  # (1, T)
        prefixes = agent.reusing(prefixes)
        if prefixes is None:
            shared, self.cache = 0, new_cache(self.model)
        else:
            shared, self.cache = prefixes.start(key, self.model, row.embeds, row.mask, agent.kernel_rows())
        self.logits = self._forward(self.pos[:, shared:], inputs_embeds=row.embeds[:, shared:])  # (1, V)
        if prefixes is not None:
            prefixes.keep(key, row.embeds, row.mask, self.cache)

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def feed(self, ids: list[int]) -> None:
        """Append ``ids`` to the cache; ``logits`` become those after the last of them."""
        n = len(ids)
        self.mask = torch.cat([self.mask, self.mask.new_ones(1, n)], dim=1)
        self.pos = self.pos[:, -1:] + torch.arange(1, n + 1, device=self.device)[None]
        self.logits = self._forward(self.pos, input_ids=torch.tensor([ids], device=self.device))

    def _forward(self, positions: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        """The (1, V) float32 logits at the last of ``inputs``' positions (``positions``, (1, n))."""
        out = self.model(
            **inputs,
            attention_mask=self.mask,
            position_ids=positions,
            logits_to_keep=1,
            **cache_kwargs(self.model, self.cache),
        )
        return out.logits[:, -1].float()


def _eos_ids(model: PreTrainedModel, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if source is None:
            continue
        for i in [source] if isinstance(source, int) else source:
            if i not in ids:
                ids.append(int(i))
    return ids


def _warpers(gen: GenerationConfig) -> list:
    if gen.temperature == 0:
        return []
    warpers: list = [TemperatureLogitsWarper(gen.temperature)]
    if gen.top_p < 1:
        warpers.append(TopPLogitsWarper(gen.top_p))
    return warpers


@dataclass
class _Sampler:
    """One sampled row's rule: its warpers (temperature, top-p) and its own generator."""

    warpers: list
    generator: torch.Generator

    def draw(self, logits: torch.Tensor) -> torch.Tensor:
        """(1, V) logits -> (1,) a token drawn from the warped distribution."""
        for warper in self.warpers:
            logits = warper(None, logits)
        return torch.multinomial(logits.softmax(-1), 1, generator=self.generator)[:, 0]


def _sampler(gen: GenerationConfig, seed: int, device: torch.device) -> _Sampler | None:
    """A row's sampler under ``gen`` seeded with ``seed``, or ``None`` for a greedy row."""
    warpers = _warpers(gen)
    if not warpers:
        return None
    return _Sampler(warpers, torch.Generator(device=device).manual_seed(int(seed)))


def _choose(logits: torch.Tensor, samplers: Sequence[_Sampler | None]) -> torch.Tensor:
    """(B, V) logits -> (B,) next tokens: argmax for greedy rows (``None``), one draw for each other row."""
    nxt = logits.argmax(-1)
    for i, sampler in enumerate(samplers):
        if sampler is not None:
            nxt[i : i + 1] = sampler.draw(logits[i : i + 1])
    return nxt


def _row_major_head_inputs(head: torch.nn.Module | None) -> None:
    """Make ``head`` (an LM head, possibly shared by several agents) copy its input to row-major strides.

    transformers slices the last position (``logits_to_keep=1``) as a strided view; ``F.linear`` on a
    strided (B, 1, d) bfloat16 input expands the (V, d) weight to (B, d, V) and copies it (15 s for Gemma-3's
    262k-row head at batch 8 on these CPUs, against 0.06 s row-major; float32 takes twice as long
    strided). ``contiguous()`` is not enough: a (1, 1, d) slice counts as contiguous whatever its batch
    stride, and ``F.linear`` still takes the copying path for it. Registered once per head.
    """
    if head is None or getattr(head, "_row_major_inputs", False):
        return
    head.register_forward_pre_hook(_row_major_args)
    head._row_major_inputs = True


def _row_major_args(module: torch.nn.Module, args: tuple) -> tuple:
    """A forward pre-hook: the positional tensor arguments copied to row-major strides."""
    return tuple(
        a.clone(memory_format=torch.contiguous_format) if isinstance(a, torch.Tensor) else a for a in args
    )
