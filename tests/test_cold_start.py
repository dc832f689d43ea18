"""Start-up shortcuts (issue 13 goal 4) that must not change what is built: links of a preset with trained
links are allocated uninitialised and then loaded from the checkpoint."""

import pytest
import torch

from recursivemas import presets
from recursivemas.links import InnerLink, LinkConfig, OuterLink, init_default, init_identity, uninitialised
from recursivemas.presets import _TINY_AGENTS, build_from_specs


def test_uninitialised_links_are_allocated_and_left_alone():
    inner, outer = LinkConfig("a", "inner", 8, 8), LinkConfig("a->b", "outer", 8, 12, variant="release")
    with uninitialised():
        links = [InnerLink(inner), OuterLink(outer)]
        for link in links:
            for p in link.parameters():
                p.data.fill_(7.0)
            init_identity(link)
            init_default(link)
    for link in links:
        assert all(p.device.type == "cpu" and not p.is_meta for p in link.parameters())
        assert all(bool((p == 7.0).all()) for p in link.parameters())  # neither init touched them
    assert links[1].ln_source.weight.shape == (8,) and links[1].proj1.weight.shape == (24, 8)
    fresh = InnerLink(inner)  # outside the block, identity as before
    assert not fresh.proj2.weight.any()
    h = torch.randn(3, 8)
    assert torch.equal(fresh(h), h)
    init_identity(links[0])
    assert not links[0].proj2.weight.any()


def test_uninitialised_ends_with_its_block_even_on_error():
    with pytest.raises(RuntimeError), uninitialised():
        raise RuntimeError
    assert not InnerLink(LinkConfig("a", "inner", 4, 4)).proj2.weight.any()


def test_trained_links_load_exactly_into_uninitialised_links(tmp_path):
    """A system built with init "trained" has exactly the saved links, every tensor of every link."""
    source = build_from_specs(_TINY_AGENTS, init="default", rounds=1, latent_steps=2)
    source.save_pretrained(str(tmp_path))
    loaded = build_from_specs(_TINY_AGENTS, init="trained", links=tmp_path, rounds=1, latent_steps=2)
    saved, got = source.links.state_dict(), loaded.links.state_dict()
    assert sorted(saved) == sorted(got) and len(saved) > 20
    assert all(torch.equal(saved[k], got[k]) for k in saved)
    prompt = ["What is 2 plus 3?"]
    assert (
        source.run(prompt, rounds=1, latent_steps=2)[0].text
        == loaded.run(prompt, rounds=1, latent_steps=2)[0].text
    )


def test_a_link_the_checkpoint_lacks_keeps_the_identity_start(tmp_path, monkeypatch):
    """Links built for a checkpoint start uninitialised; one the checkpoint does not replace is
    initialised as before (identity), never left holding whatever the memory held."""
    build_from_specs(_TINY_AGENTS, init="default", rounds=1).save_pretrained(str(tmp_path))
    monkeypatch.setattr(presets, "load_links", lambda system, directory: system)  # replaces nothing
    system = build_from_specs(_TINY_AGENTS, init="trained", links=tmp_path, rounds=1)
    for group in system.links.values():
        for link in group.values():
            assert not link.proj2.weight.any() and not link.proj2.bias.any()
            assert torch.isfinite(link.proj1.weight).all() and link.proj1.weight.abs().sum() > 0
    h = torch.randn(2, system.links["inner"]["planner"].config.src_dim)
    assert torch.equal(system.links["inner"]["planner"](h), h)
