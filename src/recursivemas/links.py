"""RecursiveLink modules: the only trainable parts of a RecursiveMAS system.

Two link kinds (SPEC §2), each in two forms:

* ``InnerLink`` (same agent, ``d -> d``) maps a last-layer hidden state to an input embedding, so an
  agent can feed its own thought back in as the next input:

  - paper form:   ``R_in(h) = A·h + W2·GELU(W1·h)``
  - release form: ``R_in(h) = LN_post(A·h + W2·GELU(W1·LN_pre(h)))``

  ``A`` is the identity unless the link carries a ``residual_proj`` (used by the training-free ridge
  initialisation); ``W1, W2`` are ``d x d`` with biases.

* ``OuterLink`` (agent i -> agent j, ``d_i -> d_j``) maps the sender's latent thoughts into the
  receiver's input-embedding space:

  - paper form:   ``R_out(h) = W3·h + W2·GELU(W1·h)``
  - release form: ``R_out(h) = LN_tgt(W3·h + W2·GELU(W1·LN_src(h)))``

  with ``W1: d_i -> 2·d_j``, ``W2: 2·d_j -> d_j``, ``W3: d_i -> d_j`` (all with biases).

An outer link may also read a causal window of the sender's preceding thoughts (``window = k > 1``):

  ``R_out(h)_t = W3·h_t + W2·GELU(W1·x_t + U·[x_{t-1}; ...; x_{t-k+1}])``

with ``x = LN_src(h)`` (release form) or ``h`` (paper form), zeros before the first thought and
``U: (k-1)·d_i -> 2·d_j`` without bias, zero at initialisation (so a widened link starts as the link it
was widened from). It lets one output vector merge several sender tokens, e.g. a name that the sender's
tokenizer splits in two but the receiver's writes as one token. A windowed link maps whole messages:
its input's second-to-last axis is the thought sequence.

Both optionally rescale every output vector to a fixed norm (``rescale_norm``), as the training-free
LatentMAS alignment does. Tensor names (``proj1``, ``proj2``, ``residual_proj``, ``pre_ln``,
``post_ln``, ``ln_source``, ``ln_target``) match the official release so its weights load.

Links compute in their own parameters' dtype (float32 unless the link was cast, e.g. ``.double()``
for float64 checks), whatever the agents' dtype; callers cast at the boundaries.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch
from torch import nn

from recursivemas.errors import ConfigError

Variant = Literal["paper", "release"]
VARIANTS: tuple[str, ...] = ("paper", "release")
MAX_WINDOW = 16
_UNINITIALISED = contextvars.ContextVar("recursivemas_links_uninitialised", default=False)


@contextlib.contextmanager
def uninitialised() -> Iterator[None]:
    """Within the block, links are built with their parameters allocated but not initialised (they hold
    whatever the memory held), and ``init_identity`` / ``init_default`` leave them so.

    For a caller that then overwrites every parameter, as loading a link checkpoint does (strictly: a
    missing tensor is an error); nothing else may run such a link. A preset with trained links builds
    its links three times before loading them (the system's, their identity re-initialisation, the
    checkpoint's), which is 0.4 s of a 2 s warm build when initialised.
    """
    token = _UNINITIALISED.set(True)
    try:
        yield
    finally:
        _UNINITIALISED.reset(token)


@dataclass(frozen=True)
class LinkConfig:
    """Shape and form of one link.

    Attributes:
        name: unique name in the system, e.g. ``"planner"`` (inner) or ``"planner->critic"`` (outer).
        kind: ``"inner"`` or ``"outer"``.
        src_dim: hidden size of the sending agent.
        dst_dim: input-embedding size of the receiving agent (``== src_dim`` for inner links).
        variant: ``"paper"`` or ``"release"`` (see module docstring).
        residual_proj: inner links only: learn a linear residual ``A`` instead of the identity.
        rescale_norm: if set, every output vector is rescaled to this L2 norm.
        window: outer links only: how many of the sender's thoughts (this one and the ``window - 1``
            before it) each output vector reads; 1 maps every thought on its own.
    """

    name: str
    kind: Literal["inner", "outer"]
    src_dim: int
    dst_dim: int
    variant: Variant = "paper"
    residual_proj: bool = False
    rescale_norm: float | None = None
    window: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("inner", "outer"):
            raise ConfigError(f"link {self.name!r}: kind must be 'inner' or 'outer', got {self.kind!r}")
        if self.variant not in VARIANTS:
            raise ConfigError(
                f"link {self.name!r}: variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}"
            )
        if self.src_dim <= 0 or self.dst_dim <= 0:
            raise ConfigError(
                f"link {self.name!r}: dims must be positive, got {self.src_dim}->{self.dst_dim}"
            )
        if self.kind == "inner" and self.src_dim != self.dst_dim:
            raise ConfigError(
                f"inner link {self.name!r} maps an agent to itself, so src_dim must equal dst_dim "
                f"(got {self.src_dim} and {self.dst_dim})"
            )
        if not 1 <= self.window <= MAX_WINDOW:
            raise ConfigError(f"link {self.name!r}: window must be 1-{MAX_WINDOW}, got {self.window}")
        if self.kind == "inner" and self.window != 1:
            raise ConfigError(
                f"inner link {self.name!r} feeds one thought back at a time, so its window must be 1 "
                f"(got {self.window}); windows are for outer links"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LinkConfig:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


class _Link(nn.Module):
    """Shared machinery: input dim check, norm rescaling, compute in the parameters' dtype."""

    config: LinkConfig

    def __init__(self, config: LinkConfig) -> None:
        super().__init__()
        self.config = config

    @staticmethod
    def _allocating() -> contextlib.AbstractContextManager:
        """Where a link's modules are created: on the meta device (no memory, no initialisation) inside
        ``uninitialised``, else as usual."""
        return torch.device("meta") if _UNINITIALISED.get() else contextlib.nullcontext()

    def _initialise(self) -> None:
        """Identity initialisation, or (inside ``uninitialised``) memory for the meta parameters."""
        if _UNINITIALISED.get():
            self.to_empty(device=torch.get_default_device())
        else:
            init_identity(self)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the link computes and returns in: its parameters' (float32 unless cast)."""
        return self.proj1.weight.dtype

    def _check_input(self, h: torch.Tensor) -> None:
        if h.shape[-1] != self.config.src_dim:
            raise ValueError(
                f"{self.config.kind} link {self.name!r} expects vectors of size {self.config.src_dim}, "
                f"got {h.shape[-1]}: the link was built for another agent"
            )

    def _rescale(self, y: torch.Tensor) -> torch.Tensor:
        if self.config.rescale_norm is None:
            return y
        return y * (self.config.rescale_norm / y.norm(dim=-1, keepdim=True).clamp_min(1e-6))


class InnerLink(_Link):
    """``R_in``: last hidden state -> input embedding of the same agent (``(..., d) -> (..., d)``)."""

    def __init__(self, config: LinkConfig) -> None:
        if config.kind != "inner":
            raise ConfigError(f"InnerLink needs kind='inner', got {config.kind!r} for {config.name!r}")
        super().__init__(config)
        d = config.src_dim
        with self._allocating():
            self.proj1 = nn.Linear(d, d)
            self.proj2 = nn.Linear(d, d)
            self.residual_proj = nn.Linear(d, d, bias=False) if config.residual_proj else None
            if config.variant == "release":
                self.pre_ln = nn.LayerNorm(d)
                self.post_ln = nn.LayerNorm(d)
        self._initialise()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``h``: (..., d) in any dtype -> (..., d) in the link's dtype (float32 unless cast)."""
        self._check_input(h)
        h = h.to(self.dtype)
        x = self.pre_ln(h) if self.config.variant == "release" else h
        base = self.residual_proj(h) if self.residual_proj is not None else h
        y = base + self.proj2(nn.functional.gelu(self.proj1(x)))
        if self.config.variant == "release":
            y = self.post_ln(y)
        return self._rescale(y)


class OuterLink(_Link):
    """``R_out``: sender's embedding space -> receiver's embedding space (``(..., d_i) -> (..., d_j)``)."""

    def __init__(self, config: LinkConfig) -> None:
        if config.kind != "outer":
            raise ConfigError(f"OuterLink needs kind='outer', got {config.kind!r} for {config.name!r}")
        super().__init__(config)
        d_i, d_j = config.src_dim, config.dst_dim
        with self._allocating():
            self.proj1 = nn.Linear(d_i, 2 * d_j)
            self.proj2 = nn.Linear(2 * d_j, d_j)
            self.residual_proj = nn.Linear(d_i, d_j)
            self.window_proj = (
                nn.Linear((config.window - 1) * d_i, 2 * d_j, bias=False) if config.window > 1 else None
            )
            if config.variant == "release":
                self.ln_source = nn.LayerNorm(d_i)
                self.ln_target = nn.LayerNorm(d_j)
        self._initialise()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``h``: (..., d_i) in any dtype -> (..., d_j) in the link's dtype (float32 unless cast); a
        windowed link needs (..., m, d_i), a sequence of m thoughts."""
        self._check_input(h)
        h = h.to(self.dtype)
        x = self.ln_source(h) if self.config.variant == "release" else h
        pre = self.proj1(x)  # (..., m, 2·d_j)
        if self.window_proj is not None:
            pre = pre + self.window_proj(_preceding(x, self.config.window - 1))
        y = self.residual_proj(h) + self.proj2(nn.functional.gelu(pre))
        if self.config.variant == "release":
            y = self.ln_target(y)
        return self._rescale(y)


def _preceding(x: torch.Tensor, k: int) -> torch.Tensor:
    """``[x_{t-1}; ...; x_{t-k}]`` for every position t, zeros before the start: (..., m, d) ->
    (..., m, k·d)."""
    if x.dim() < 2:
        raise ValueError(
            f"a windowed outer link maps a sequence of thoughts (..., m, d), got shape {tuple(x.shape)}"
        )
    m = x.shape[-2]
    padded = nn.functional.pad(x, (0, 0, k, 0))  # (..., k + m, d)
    return torch.cat([padded[..., k - s : k - s + m, :] for s in range(1, k + 1)], dim=-1)


def widen(link: OuterLink, window: int) -> OuterLink:
    """A copy of ``link`` that also reads ``window - 1`` preceding thoughts, equal to ``link`` until
    trained (its window weights start at zero). Narrowing is refused: it would drop trained weights."""
    if window < link.config.window:
        raise ConfigError(
            f"link {link.name!r} already reads a window of {link.config.window}; it cannot be narrowed "
            f"to {window} without losing trained weights"
        )
    if window == link.config.window:
        return link
    wide = OuterLink(replace(link.config, window=window)).to(
        device=link.proj1.weight.device, dtype=link.dtype
    )
    state = link.state_dict()
    narrow = state.pop("window_proj.weight", None)  # (2·d_j, (k_old - 1)·d_i) or absent
    state["window_proj.weight"] = torch.zeros_like(wide.window_proj.weight)
    if narrow is not None:
        state["window_proj.weight"][:, : narrow.shape[1]] = narrow  # the nearest thoughts come first
    wide.load_state_dict(state)
    return wide


def build_link(config: LinkConfig) -> InnerLink | OuterLink:
    """Instantiate the module a ``LinkConfig`` describes (identity-initialised)."""
    return InnerLink(config) if config.kind == "inner" else OuterLink(config)


@torch.no_grad()
def init_identity(link: InnerLink | OuterLink) -> None:
    """Identity start: last projection zero, residual ``A``/``W3`` the (rectangular) identity.

    In paper form an identity-initialised link is exactly the identity (for outer links between
    different sizes: the first ``min(d_i, d_j)`` coordinates are copied, the rest are zero). In release
    form the output is still normalised by the final LayerNorm. Nothing inside ``uninitialised``.
    """
    if _UNINITIALISED.get():
        return
    nn.init.kaiming_uniform_(link.proj1.weight, a=5**0.5)
    nn.init.zeros_(link.proj1.bias)
    nn.init.zeros_(link.proj2.weight)
    nn.init.zeros_(link.proj2.bias)
    if getattr(link, "window_proj", None) is not None:
        nn.init.zeros_(link.window_proj.weight)
    if link.residual_proj is not None:
        link.residual_proj.weight.copy_(torch.eye(*link.residual_proj.weight.shape))
        if link.residual_proj.bias is not None:
            nn.init.zeros_(link.residual_proj.bias)


@torch.no_grad()
def init_default(link: InnerLink | OuterLink) -> None:
    """PyTorch's default ``nn.Linear`` initialisation for every projection (nothing inside
    ``uninitialised``)."""
    if _UNINITIALISED.get():
        return
    for module in link.modules():
        if isinstance(module, nn.Linear):
            module.reset_parameters()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
