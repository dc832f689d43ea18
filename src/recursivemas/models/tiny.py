"""Tiny random models of three architectures with two different tokenizers, built offline from config.

Used by the ``tiny-random`` preset and the tests: a Llama (d=64) and a Qwen3 (d=80) share a byte-level
BPE tokenizer with a ChatML chat template; a Gemma3 (d=96) has a SentencePiece-style (Metaspace) BPE
tokenizer with a different vocabulary and no chat template (so the plain prompt fallback is used).
Weights are drawn from a fixed seed, so every build is bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen3Config,
)

_CORPUS = """
The planner reads the question and writes a short plan. The critic checks the plan for mistakes.
The solver follows the plan, works step by step and puts the final answer in a box.
What is 12 plus 30? First add the tens, then add the ones: 12 + 30 = 42. The answer is 42.
A train travels 60 miles in 2 hours. Its speed is 60 / 2 = 30 miles per hour.
If x + 7 = 19 then x = 12. Multiply 3 by 14 to get 42. Divide 100 by 4 to get 25.
Alice has 5 apples and gives 2 to Bob, so she keeps 3 apples. The sum of 1, 2, 3 and 4 is 10.
Question: how many days are in a week? Answer: seven. The square of 9 is 81 and its root is 3.
Think about the problem, check each step, and report the result clearly with units.
You are a helpful assistant in a team of agents. Solve the question and explain your reasoning.
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 + - * / = ( ) [ ] { } , . ; : ? ! ' " % $ # @ & \\ _
"""

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _train(tokenizer: Tokenizer, trainer: trainers.Trainer) -> Tokenizer:
    lines = [line for line in _CORPUS.strip().splitlines() if line]
    tokenizer.train_from_iterator(lines * 4, trainer=trainer)
    return tokenizer


@cache
def _tokenizer_object(kind: str) -> str:
    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=420,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
        tok.decoder = decoders.Metaspace(prepend_scheme="never")
        trainer = trainers.BpeTrainer(
            vocab_size=360, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"], show_progress=False
        )
    return _train(tok, trainer).to_str()


def tiny_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """``"bytelevel"`` (ChatML template) or ``"metaspace"`` (no chat template), trained on our corpus."""
    obj = Tokenizer.from_str(_tokenizer_object(kind))
    if kind == "bytelevel":
        tok = PreTrainedTokenizerFast(
            tokenizer_object=obj, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
        )
        tok.chat_template = CHATML
    else:
        tok = PreTrainedTokenizerFast(
            tokenizer_object=obj, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>", unk_token="<unk>"
        )
    return tok


def _common(tok: PreTrainedTokenizerFast) -> dict:
    return dict(
        vocab_size=len(tok),
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        initializer_range=0.1,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
    )


def _llama(tok: PreTrainedTokenizerFast) -> PretrainedConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=128, **_common(tok))


def _qwen3(tok: PreTrainedTokenizerFast) -> PretrainedConfig:
    return Qwen3Config(hidden_size=80, intermediate_size=160, head_dim=20, **_common(tok))


def _gemma3(tok: PreTrainedTokenizerFast) -> PretrainedConfig:
    return Gemma3TextConfig(
        hidden_size=96,
        intermediate_size=192,
        head_dim=24,
        sliding_window=64,
        query_pre_attn_scalar=24,
        **_common(tok),
    )


# name -> (tokenizer kind, config builder, seed)
TINY_MODELS: dict[str, tuple[str, Callable[[PreTrainedTokenizerFast], PretrainedConfig], int]] = {
    "llama": ("bytelevel", _llama, 1),
    "qwen3": ("bytelevel", _qwen3, 2),
    "gemma3": ("metaspace", _gemma3, 3),
}


def tiny_model(
    name: str, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Build tiny random model ``name`` (one of ``TINY_MODELS``) and its tokenizer, deterministically."""
    kind, make_config, seed = TINY_MODELS[name]
    tok = tiny_tokenizer(kind)
    model = seeded_model(make_config(tok), seed)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.to(dtype).eval(), tok


def seeded_model(config: PretrainedConfig, seed: int) -> PreTrainedModel:
    """A float32 causal LM from ``config`` with weights drawn from ``seed`` (the global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
