"""Training-free initialisations carry meaning before any training."""

import pytest
import torch

from recursivemas import build_preset, realign
from recursivemas.errors import ConfigError
from recursivemas.links import LinkConfig, OuterLink
from recursivemas.realign import mean_row_norm


def test_ridge_realignment_of_tied_embeddings_is_near_identity():
    w = torch.randn(500, 32)
    w_a = realign.ridge_realignment(w, w)
    torch.testing.assert_close(w_a, torch.eye(32), atol=1e-4, rtol=0)


def test_ridge_realignment_maps_head_rows_to_embedding_rows():
    w_out, w_in = torch.randn(400, 24), torch.randn(400, 24)
    w_a = realign.ridge_realignment(w_out, w_in)
    direct = torch.linalg.lstsq(w_out, w_in).solution
    torch.testing.assert_close(w_a, direct, atol=1e-3, rtol=1e-3)


def test_shared_tokens_are_matched_by_text_across_tokenizer_families(tiny_system):
    planner, critic = tiny_system.agents["planner"], tiny_system.agents["critic"]
    src_ids, dst_ids = realign.shared_token_ids(
        realign.vocabulary_by_text(planner.tokenizer), realign.vocabulary_by_text(critic.tokenizer)
    )
    assert len(src_ids) > 100
    for s, d in list(zip(src_ids, dst_ids, strict=True))[:50]:
        assert planner.tokenizer.decode([s]).strip() == critic.tokenizer.decode([d]).strip()


def test_bridge_sends_shared_tokens_to_their_counterparts(tiny_system):
    """After the bridge, most shared tokens land nearest to the same token in the receiver's space."""
    planner, critic = tiny_system.agents["planner"], tiny_system.agents["critic"]
    src_ids, dst_ids = realign.shared_token_ids(
        realign.vocabulary_by_text(planner.tokenizer), realign.vocabulary_by_text(critic.tokenizer)
    )
    x = planner.input_embedding_matrix()[src_ids]
    y_all = critic.input_embedding_matrix()
    link = tiny_system.links["outer"]["planner->critic"]
    with torch.no_grad():
        mapped = link(x)  # (n, d_dst)
    cos = torch.nn.functional.normalize(mapped, dim=-1) @ torch.nn.functional.normalize(y_all, dim=-1).T
    hit = (cos.argmax(-1) == torch.tensor(dst_ids)).float().mean()
    untrained = OuterLink(LinkConfig("p->c", "outer", planner.hidden_size, critic.hidden_size))
    with torch.no_grad():
        cos0 = (
            torch.nn.functional.normalize(untrained(x), dim=-1)
            @ torch.nn.functional.normalize(y_all, dim=-1).T
        )
    base = (cos0.argmax(-1) == torch.tensor(dst_ids)).float().mean()
    assert hit > 0.8 and base < 0.1
    assert torch.allclose(
        mapped.norm(dim=-1), torch.full((len(src_ids),), y_all.norm(dim=-1).mean()), rtol=1e-4
    )


def test_tied_ridge_equals_general_ridge():
    w = torch.randn(300, 16)
    torch.testing.assert_close(
        realign.tied_ridge_realignment(w, 2.5), realign.ridge_realignment(w, 2.5 * w), atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_tied_model_with_a_zero_first_row_gets_a_finite_realignment(family):
    """``from_config`` zeroes the padding row; with pad id 0 and tied tables the scale was once 0/0.
    Gemma multiplies its input embeddings by sqrt(d): the tied fit must find that scale."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

    from recursivemas import Agent
    from recursivemas.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer("bytelevel")
    shape = dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True, pad_token_id=0,
    )  # fmt: skip
    config = LlamaConfig(**shape) if family == "llama" else Gemma3TextConfig(head_dim=16, **shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert model.get_input_embeddings().weight[0].abs().sum() == 0
    agent = Agent(name="a", model=model, tokenizer=tok)
    w_a = realign.TrainingFreeLinks("paper", cache=False).inner(agent).residual_proj.weight.T
    expected = realign.ridge_realignment(agent.output_embedding_matrix(), agent.input_embedding_matrix())
    assert torch.isfinite(w_a).all()
    torch.testing.assert_close(w_a, expected, atol=1e-4, rtol=1e-4)


def test_a_non_finite_fit_is_refused_and_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("RECURSIVEMAS_CACHE", str(tmp_path))
    links = realign.TrainingFreeLinks("paper")
    with pytest.raises(ConfigError, match="not finite"):
        links._fitted("inner-x", lambda: (torch.full((2, 2), float("nan")), 1.0))
    with pytest.raises(ConfigError, match="not finite"):
        links._fitted("inner-y", lambda: (torch.eye(2), float("nan")))
    assert not (tmp_path / "realign").exists()


def test_fitted_maps_are_cached_on_disk_and_refitted_when_corrupt(tmp_path, monkeypatch):
    monkeypatch.setenv("RECURSIVEMAS_CACHE", str(tmp_path))
    first = build_preset("tiny-random", rounds=1, latent_steps=2)
    files = sorted((tmp_path / "realign").iterdir())
    assert len(files) == 3 + 3  # inner: 3 models; outer: 3 edges

    def no_fitting(*args):
        raise AssertionError("fitted again although cached")

    monkeypatch.setattr(realign.TrainingFreeLinks, "_fit_bridge", no_fitting)
    monkeypatch.setattr(realign.TrainingFreeLinks, "_fit_ridge", no_fitting)
    second = build_preset("tiny-random", rounds=1, latent_steps=2)
    for name, link in first.links["outer"].items():
        assert torch.equal(link.residual_proj.weight, second.links["outer"][name].residual_proj.weight)
    assert first.inner("critic").config == second.inner("critic").config

    monkeypatch.undo()
    monkeypatch.setenv("RECURSIVEMAS_CACHE", str(tmp_path))
    outer_file = next(f for f in files if f.name.startswith("outer-"))
    outer_file.write_bytes(b"garbage")
    third = build_preset("tiny-random", rounds=1, latent_steps=2)
    for name, link in first.links["outer"].items():
        torch.testing.assert_close(link.residual_proj.weight, third.links["outer"][name].residual_proj.weight)
    assert outer_file.read_bytes() != b"garbage"


def test_fits_are_cached_per_dtype(tmp_path, monkeypatch):
    """A bfloat16 model's embeddings have other norms than the same model's in float32 (0.14% on the tiny
    Gemma3), and fingerprints are the same in both: a bfloat16 build's cached fit must not reach a float32
    build (it did, failing the norm check above whenever a bfloat16 test ran first)."""
    monkeypatch.setenv("RECURSIVEMAS_CACHE", str(tmp_path))
    bf16 = build_preset("tiny-random", rounds=1, latent_steps=2, dtype=torch.bfloat16)
    fp32 = build_preset("tiny-random", rounds=1, latent_steps=2)
    critic_bf16, critic_fp32 = bf16.agents["critic"], fp32.agents["critic"]
    assert critic_bf16.fingerprint() == critic_fp32.fingerprint()
    norms = {
        dtype: system.links["outer"]["planner->critic"].config.rescale_norm
        for dtype, system in (("bfloat16", bf16), ("float32", fp32))
    }
    assert norms["float32"] == pytest.approx(mean_row_norm(critic_fp32.input_embedding_matrix()), rel=1e-6)
    assert norms["bfloat16"] == pytest.approx(mean_row_norm(critic_bf16.input_embedding_matrix()), rel=1e-6)
    assert norms["float32"] != norms["bfloat16"]
