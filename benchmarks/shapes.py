"""Random agents with the shapes of real small models, for timing without downloads.

``smollm2-shape``: Llama, d=576, 30 layers, 9 heads / 3 KV heads, MLP 1536 (SmolLM2-135M).
``gemma3-shape``: Gemma3, d=640, 18 layers, 4 heads / 1 KV head, head dim 256, MLP 2048 (Gemma-3-270M).
The vocabularies are the tiny tokenizers' (hundreds of tokens), so the LM head is cheaper than the
real models'; latent steps never use the LM head, so rollout timings are unaffected. ``rollout.py``
(``--shape``), ``modes.py`` (``--system shaped``) and ``decode_vs_generate.py`` (``--models``, by the
names in ``SHAPES``) run on them, which lets the GPU benchmarks run where the bundled GGUFs cannot go.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

from recursivemas import Agent
from recursivemas.models.tiny import tiny_tokenizer
from recursivemas.patterns import sequential


def _common(tok) -> dict:
    return dict(
        vocab_size=len(tok),
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
    )


SHAPES = ("smollm2-shape", "gemma3-shape")


def shaped_agent(
    shape: str,
    name: str,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    **agent_kwargs,
) -> Agent:
    """A random ``shape`` model (initialised in float32 from ``seed``, then cast to ``dtype`` on
    ``device``) as agent ``name``; ``agent_kwargs`` go to ``Agent`` (template, step_config, ...)."""
    if shape == "smollm2-shape":
        tok = tiny_tokenizer("bytelevel")
        config = LlamaConfig(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            **_common(tok),
        )
    elif shape == "gemma3-shape":
        tok = tiny_tokenizer("metaspace")
        config = Gemma3TextConfig(
            hidden_size=640,
            intermediate_size=2048,
            num_hidden_layers=18,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            sliding_window=512,
            **_common(tok),
        )
    else:
        raise ValueError(f"unknown shape {shape!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device=device, dtype=dtype)
    model.generation_config.eos_token_id = tok.eos_token_id
    return Agent(name=name, model=model, tokenizer=tok, model_id=shape, **agent_kwargs)


def shaped_system(
    rounds: int = 3,
    latent_steps: int = 16,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """Planner (smollm2-shape) -> Critic (gemma3-shape) -> Solver (smollm2-shape), training-free links
    (float32, on the agents' device), agents in ``dtype`` on ``device``."""
    return sequential(
        shaped_agent("smollm2-shape", "planner", 1, dtype, device),
        shaped_agent("gemma3-shape", "critic", 2, dtype, device),
        shaped_agent("smollm2-shape", "solver", 3, dtype, device),
        rounds=rounds,
        latent_steps=latent_steps,
    )
