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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from recursivemas.cache import cache_kwargs, new_cache
from recursivemas.errors import ConfigError, NonFiniteLatentError, PromptTooLongError
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


@dataclass
class Decoded:
    """Generated text per row and the number of generated tokens per row (EOS included)."""

    texts: list[str]
    num_tokens: list[int]
    seconds: float = 0.0


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
    """

    name: str
    model: PreTrainedModel
    tokenizer: Any
    template: PromptTemplate | None = None
    role: str = ""
    model_id: str = ""
    chat_template_kwargs: dict = field(default_factory=dict)

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

    def check_fits(self, batch: PromptBatch, extra: int, what: str) -> None:
        """Raise ``PromptTooLongError`` if the longest prompt plus ``extra`` positions exceed the context."""
        longest = max(batch.lengths)
        if longest + extra > self.max_context:
            raise PromptTooLongError(
                f"agent {self.name!r}: prompt of {longest} positions plus {extra} {what} exceeds its "
                f"context window of {self.max_context}; shorten the question or context, or lower "
                f"--latent-steps / --max-new-tokens"
            )

    # --- latent thoughts -------------------------------------------------------------------------

    def think(self, batch: PromptBatch, steps: int, inner: InnerLink, round_: int = 0) -> Thoughts:
        """KV-cached latent rollout of ``steps`` steps (SPEC §3).

        Step k feeds ``e_{k-1} = R_in(h_{k-1})`` (the prompt for k = 1), takes the last-layer hidden
        state ``h_k`` at the last position and keeps ``e_k = R_in(h_k)``. Costs one prompt pass plus
        ``steps - 1`` single-position passes.

        Returns ``Thoughts`` with hidden (B, m, d) in the model dtype and embeds (B, m, d) in the link's
        dtype (float32 unless the link was cast).
        """
        self.check_fits(batch, steps, "latent steps")
        cache = new_cache(self.model)
        mask = batch.mask
        pos = position_ids(mask)  # (B, T)
        x = batch.embeds  # (B, T, d)
        hidden, embeds = [], []
        for step in range(steps):
            out = self.backbone(
                inputs_embeds=x, attention_mask=mask, position_ids=pos, **cache_kwargs(self.backbone, cache)
            )
            h = out.last_hidden_state[:, -1]  # (B, d)
            e = inner(h)  # (B, d) in the link's dtype
            hidden.append(h)
            embeds.append(e)
            if step + 1 < steps:
                x = e.to(self.dtype)[:, None]  # (B, 1, d)
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                pos = pos[:, -1:] + 1
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
        self, batch: PromptBatch, gen: GenerationConfig, seeds: Sequence[int] | None = None
    ) -> Decoded:
        """Generate text from a spliced prompt batch with a KV cache.

        Greedy when ``gen.temperature == 0``; otherwise temperature + top-p sampling, each row drawing
        from its own generator seeded by ``seeds[i]`` (default ``gen.seed + i``), so a row's sample does
        not depend on the batch it ran in. Rows stop at an EOS token (counted) or ``max_new_tokens``.
        """
        start = time.perf_counter()
        self.check_fits(batch, gen.max_new_tokens, "new tokens")
        bsz = batch.embeds.shape[0]
        seeds = list(seeds) if seeds is not None else [gen.seed + i for i in range(bsz)]
        warpers = _warpers(gen)
        generators = (
            [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds] if warpers else []
        )
        eos = torch.tensor(self.eos_ids or [-1], device=self.device)
        cache = new_cache(self.model)
        mask, pos = batch.mask, position_ids(batch.mask)
        out = self.model(
            inputs_embeds=batch.embeds,
            attention_mask=mask,
            position_ids=pos,
            logits_to_keep=1,
            **cache_kwargs(self.model, cache),
        )
        done = torch.zeros(bsz, dtype=torch.bool, device=self.device)
        tokens: list[torch.Tensor] = []
        for _ in range(gen.max_new_tokens):
            logits = out.logits[:, -1].float()  # (B, V)
            nxt = _choose(logits, warpers, generators)  # (B,)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            tokens.append(nxt)
            done |= torch.isin(nxt, eos)
            if bool(done.all()) or len(tokens) == gen.max_new_tokens:
                break
            mask = torch.cat([mask, mask.new_ones(bsz, 1)], dim=1)
            pos = pos[:, -1:] + 1
            out = self.model(
                input_ids=nxt[:, None],
                attention_mask=mask,
                position_ids=pos,
                logits_to_keep=1,
                **cache_kwargs(self.model, cache),
            )
        generated = torch.stack(tokens, 1).tolist()  # (B, N)
        texts, counts = [], []
        for row in generated:
            n = next((i + 1 for i, t in enumerate(row) if t in self.eos_ids), len(row))
            counts.append(n)
            kept = row[: n - 1] if row[n - 1] in self.eos_ids else row[:n]  # EOS may not be a special token
            texts.append(self.tokenizer.decode(kept, skip_special_tokens=True).strip())
        return Decoded(texts, counts, time.perf_counter() - start)

    def decode_with_tools(
        self,
        batch: PromptBatch,
        gen: GenerationConfig,
        tools: ToolBox,
        seeds: Sequence[int] | None = None,
        prefix: str = "",
    ) -> tuple[Decoded, list[list[ToolCall]]]:
        """Generate text in which tool calls run (SPEC 5b, deliberation): row by row, decode until the
        text since the last result holds a complete call (``ToolBox.find_call``), run it, feed
        ``<result>...</result>`` into the same KV cache (the prompt is never re-encoded) and go on.
        ``gen.max_new_tokens`` bounds the generated tokens of the whole decode, calls included;
        ``prefix`` is text the prompt already ends with (e.g. an opening ``<python>`` tag): it counts as
        decoded text for finding calls and starts each returned text. Returns the texts (calls and
        results included) and each row's calls."""
        start = time.perf_counter()
        self.check_fits(batch, gen.max_new_tokens, "new tokens")
        seeds = list(seeds) if seeds is not None else [gen.seed + i for i in range(batch.embeds.shape[0])]
        texts, counts, calls = [], [], []
        for i, seed in enumerate(seeds):
            row = PromptBatch(batch.embeds[i : i + 1], batch.mask[i : i + 1], [], [])
            text, count, row_calls = self._decode_row_with_tools(row, gen, tools, seed, prefix)
            texts.append(text)
            counts.append(count)
            calls.append(row_calls)
        return Decoded(texts, counts, time.perf_counter() - start), calls

    def _decode_row_with_tools(
        self, row: PromptBatch, gen: GenerationConfig, tools: ToolBox, seed: int, prefix: str
    ) -> tuple[str, int, list[ToolCall]]:
        warpers = _warpers(gen)
        generators = [torch.Generator(device=self.device).manual_seed(int(seed))] if warpers else []
        stream = _CachedStream(self, row)
        done_text: list[str] = []  # transcript before the current segment (calls and results)
        segment: list[int] = []  # ids generated since the last result
        calls: list[ToolCall] = []
        generated = 0
        found = tools.find_call(prefix)
        if found is not None:  # the prompt already ends with a complete call: run it first
            calls.append(tools.call(*found, calls_so_far=0))
            done_text += [prefix, ToolBox.result_text(calls[0])]
            stream.feed(self.tokenizer(done_text[-1], add_special_tokens=False)["input_ids"])
        while generated < gen.max_new_tokens:
            token = int(_choose(stream.logits, warpers, generators))
            generated += 1
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
                segment = []
                feed += self.tokenizer(done_text[-1], add_special_tokens=False)["input_ids"]
                if stream.width + len(feed) + gen.max_new_tokens - generated > self.max_context:
                    break  # the result does not fit the context: stop with the transcript so far
            if generated == gen.max_new_tokens:
                break
            stream.feed(feed)
        tail = (prefix if not done_text else "") + self.tokenizer.decode(segment, skip_special_tokens=True)
        return ("".join(done_text) + tail).strip(), generated, calls


class _CachedStream:
    """One row's KV-cached forward passes: the prompt, then any tokens fed after it."""

    def __init__(self, agent: Agent, row: PromptBatch) -> None:
        self.model, self.device = agent.model, agent.device
        self.cache = new_cache(self.model)
        self.mask, self.pos = row.mask, position_ids(row.mask)  # (1, T)
        self.logits = self._forward(inputs_embeds=row.embeds)  # (1, V) at the last position

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def feed(self, ids: list[int]) -> None:
        """Append ``ids`` to the cache; ``logits`` become those after the last of them."""
        n = len(ids)
        self.mask = torch.cat([self.mask, self.mask.new_ones(1, n)], dim=1)
        self.pos = self.pos[:, -1:] + torch.arange(1, n + 1, device=self.device)[None]
        self.logits = self._forward(input_ids=torch.tensor([ids], device=self.device))

    def _forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        out = self.model(
            **inputs,
            attention_mask=self.mask,
            position_ids=self.pos,
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


def _choose(logits: torch.Tensor, warpers: list, generators: list[torch.Generator]) -> torch.Tensor:
    """(B, V) logits -> (B,) next tokens: argmax without warpers, else one draw per row's generator."""
    if not warpers:
        return logits.argmax(-1)
    for warper in warpers:
        logits = warper(None, logits)
    probs = logits.softmax(-1)
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators, strict=True)])
