import pytest
import torch

from recursivemas.errors import ConfigError
from recursivemas.links import InnerLink, LinkConfig, OuterLink, count_parameters, init_default, widen


def test_identity_inner_link_is_identity():
    link = InnerLink(LinkConfig("a", "inner", 32, 32))
    h = torch.randn(3, 5, 32)
    assert torch.equal(link(h), h)


def test_identity_outer_link_same_dims_is_identity_and_rectangular_copies():
    h = torch.randn(4, 48)
    assert torch.equal(OuterLink(LinkConfig("a->b", "outer", 48, 48))(h), h)
    wider = OuterLink(LinkConfig("a->c", "outer", 48, 64))(h)
    assert torch.equal(wider[:, :48], h) and torch.equal(wider[:, 48:], torch.zeros(4, 16))


def test_default_init_changes_output():
    link = InnerLink(LinkConfig("a", "inner", 16, 16))
    init_default(link)
    h = torch.randn(2, 16)
    assert not torch.allclose(link(h), h)


def test_release_form_tensor_names_and_parameter_count():
    inner = InnerLink(LinkConfig("a", "inner", 16, 16, "release"))
    assert set(inner.state_dict()) == {
        "proj1.weight",
        "proj1.bias",
        "proj2.weight",
        "proj2.bias",
        "pre_ln.weight",
        "pre_ln.bias",
        "post_ln.weight",
        "post_ln.bias",
    }
    assert count_parameters(inner) == 2 * 16 * 16 + 6 * 16  # SPEC §2: 2d² + 6d
    outer = OuterLink(LinkConfig("a->b", "outer", 16, 8, "release"))
    shapes = {k: tuple(v.shape) for k, v in outer.state_dict().items()}
    assert shapes["proj1.weight"] == (16, 16) and shapes["proj2.weight"] == (8, 16)
    assert shapes["residual_proj.weight"] == (8, 16) and shapes["ln_source.weight"] == (16,)
    assert shapes["ln_target.weight"] == (8,)


def test_release_form_normalises_output():
    link = InnerLink(LinkConfig("a", "inner", 16, 16, "release"))
    y = link(torch.randn(5, 16) * 10)
    assert torch.allclose(y.mean(-1), torch.zeros(5), atol=1e-5)


def test_rescale_norm():
    link = OuterLink(LinkConfig("a->b", "outer", 8, 8, rescale_norm=3.0))
    assert torch.allclose(link(torch.randn(6, 8)).norm(dim=-1), torch.full((6,), 3.0))


def test_wrong_input_dim_names_the_link():
    link = OuterLink(LinkConfig("planner->critic", "outer", 16, 8))
    with pytest.raises(ValueError, match="planner->critic"):
        link(torch.randn(2, 12))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="x", kind="inner", src_dim=8, dst_dim=9), "src_dim must equal dst_dim"),
        (dict(name="x", kind="sideways", src_dim=8, dst_dim=8), "kind"),
        (dict(name="x", kind="outer", src_dim=8, dst_dim=8, variant="fancy"), "variant"),
        (dict(name="x", kind="outer", src_dim=0, dst_dim=8), "positive"),
    ],
)
def test_bad_link_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LinkConfig(**kwargs)


def test_links_accept_bfloat16_and_compute_in_float32():
    link = InnerLink(LinkConfig("a", "inner", 16, 16))
    assert link(torch.randn(2, 16, dtype=torch.bfloat16)).dtype == torch.float32


def _perturb(link: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in link.parameters():
            p.add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize("variant", ["paper", "release"])
def test_widened_outer_link_starts_equal_and_reads_only_preceding_thoughts(variant):
    link = OuterLink(LinkConfig("a->b", "outer", 8, 6, variant))
    _perturb(link)
    wide = widen(link, 3)
    assert wide.config.window == 3 and tuple(wide.window_proj.weight.shape) == (12, 16)
    h = torch.randn(2, 5, 8)  # (B, m, d_i)
    assert torch.equal(wide(h), link(h))  # zero window weights: the link it was widened from
    _perturb(wide)
    y = wide(h)
    changed = h.clone()
    changed[:, 2] = torch.randn(2, 8)
    moved = (wide(changed) - y).abs().amax(-1)  # (B, m)
    assert torch.all(moved[:, :2] == 0)  # causal: earlier outputs never see later thoughts
    assert torch.all(moved[:, 2:5] > 1e-3)  # thought 2 reaches outputs 2, 3 and 4 (window 3)
    far = h.clone()
    far[:, 0] = torch.randn(2, 8)
    assert torch.all((wide(far) - y).abs().amax(-1)[:, 3:] == 0)  # outside the window: untouched


def test_widening_keeps_trained_window_weights_and_refuses_to_narrow():
    link = widen(OuterLink(LinkConfig("a->b", "outer", 4, 4)), 2)
    _perturb(link)
    wider = widen(link, 4)
    assert torch.equal(wider.window_proj.weight[:, :4], link.window_proj.weight)
    assert torch.all(wider.window_proj.weight[:, 4:] == 0)
    h = torch.randn(3, 6, 4)
    assert torch.allclose(wider(h), link(h), atol=1e-6)
    with pytest.raises(ConfigError, match="cannot be narrowed"):
        widen(link, 1)
    with pytest.raises(ValueError, match="sequence of thoughts"):
        link(torch.randn(4))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="x", kind="inner", src_dim=8, dst_dim=8, window=2), "windows are for outer links"),
        (dict(name="x", kind="outer", src_dim=8, dst_dim=8, window=0), "window must be"),
        (dict(name="x", kind="outer", src_dim=8, dst_dim=8, window=99), "window must be"),
    ],
)
def test_bad_window(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LinkConfig(**kwargs)
