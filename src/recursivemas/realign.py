"""Training-free link initialisations.

* Inner links — ridge realignment (LatentMAS): the linear map ``W_a`` (d x d) that best sends the LM
  head's rows to the input-embedding rows,

      W_a = (W_outᵀ W_out + λ I)⁻¹ W_outᵀ W_in,     λ = 1e-5,

  with ``W_out`` (V x d) the LM head and ``W_in`` (V x d) the input embeddings; then every output is
  rescaled to the mean input-embedding norm. A hidden state ``h`` (1 x d) maps to ``h · W_a``.

* Outer links — shared-token bridge: on the tokens both vocabularies contain (matched by their decoded
  text, surrounding whitespace removed), fit the ridge least-squares map ``W`` (d_i x d_j) from the
  sender's input embeddings ``X`` (n x d_i) to the receiver's ``Y`` (n x d_j),

      W = (Xᵀ X + λ' I)⁻¹ Xᵀ Y,     λ' = 1e-3 · trace(Xᵀ X) / d_i,

  then rescale outputs to the receiver's mean input-embedding norm. Since an outer link receives
  ``R_in(H)`` (vectors in the sender's input-embedding space), this passes the nearest meaning across
  tokenizers before any training.

Both set the residual projection to the fitted map and leave the MLP branch at zero, so the result
is still an ordinary, trainable link.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from recursivemas.errors import ConfigError
from recursivemas.fileio import atomic_write
from recursivemas.links import InnerLink, LinkConfig, OuterLink
from recursivemas.models import dtype_name
from recursivemas.models.bundled import cache_root

if TYPE_CHECKING:
    from recursivemas.agent import Agent

logger = logging.getLogger(__name__)

REALIGN_VERSION = 3  # bump when the fitting changes, so cached maps are refitted (2: tied scale from
# the whole tables; version 1 stored NaN maps for tied models whose row 0 is zero; 3: keys name the agents'
# dtypes, since fingerprints do not: a bfloat16 model's embedding norms differ from float32's by ~0.1%)
INNER_RIDGE_LAMBDA = 1e-5
BRIDGE_RELATIVE_LAMBDA = 1e-3


def _model_key(agent: Agent) -> str:
    """The agent's fingerprint (the same in any dtype) and its dtype: fits read the embeddings as loaded."""
    return f"{agent.fingerprint()}-{dtype_name(agent.dtype)}"


def ridge_realignment(
    w_out: torch.Tensor, w_in: torch.Tensor, lam: float = INNER_RIDGE_LAMBDA
) -> torch.Tensor:
    """(V, d) LM head, (V, d) input embeddings -> (d, d) ``W_a`` (float32), solved in float64."""
    a = w_out.double()
    gram = a.T @ a + lam * torch.eye(a.shape[1], dtype=torch.float64, device=a.device)  # (d, d)
    return torch.linalg.solve(gram, a.T @ w_in.double()).float()


def tied_ridge_realignment(
    w_out: torch.Tensor, scale: float, lam: float = INNER_RIDGE_LAMBDA
) -> torch.Tensor:
    """``ridge_realignment(w_out, scale · w_out)`` with one (d, d) product instead of two.

    For tied embeddings (the LM head is the embedding table; Gemma also multiplies inputs by a scale).
    """
    w_out = w_out.float()
    gram = (w_out.T @ w_out).double()  # (d, d)
    eye = torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
    return torch.linalg.solve(gram + lam * eye, scale * gram).float()


def vocabulary_by_text(tokenizer: Any, strip: bool = True) -> dict[str, int]:
    """Decoded text (stripped unless ``strip=False``) -> lowest token id with that text; special and
    partial-byte tokens skipped, and empty texts (whitespace-only ones too when stripping)."""
    special = set(tokenizer.all_special_ids)
    ids = [[i] for i in range(len(tokenizer))]
    backend = getattr(tokenizer, "backend_tokenizer", None)  # the Rust tokenizer: ~10x faster here
    if backend is not None:
        texts = backend.decode_batch(ids, skip_special_tokens=False)
    else:
        texts = tokenizer.batch_decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    table: dict[str, int] = {}
    for i, text in enumerate(texts):
        key = text.strip() if strip else text
        if i in special or not key or "\ufffd" in key:
            continue
        table.setdefault(key, i)
    return table


def shared_token_ids(src: dict[str, int], dst: dict[str, int]) -> tuple[list[int], list[int]]:
    """Aligned id lists of the tokens two ``vocabulary_by_text`` tables share."""
    common = sorted(set(src) & set(dst))
    return [src[t] for t in common], [dst[t] for t in common]


def least_squares_bridge(
    x: torch.Tensor, y: torch.Tensor, rel_lam: float = BRIDGE_RELATIVE_LAMBDA
) -> torch.Tensor:
    """(n, d_i) sources, (n, d_j) targets -> (d_i, d_j) ridge solution ``W`` with ``x·W ≈ y`` (float32)."""
    if x.shape[0] != y.shape[0]:
        raise ConfigError(f"bridge needs paired rows, got {x.shape[0]} and {y.shape[0]}")
    if x.shape[0] == 0:
        raise ConfigError(
            "the two tokenizers share no token text, so no training-free bridge can be fitted; "
            "use init='identity' or train the links"
        )
    xd, yd = x.double(), y.double()
    gram = xd.T @ xd  # (d_i, d_i)
    lam = rel_lam * float(gram.trace()) / gram.shape[0]
    gram = gram + lam * torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
    return torch.linalg.solve(gram, xd.T @ yd).float()


def mean_row_norm(matrix: torch.Tensor) -> float:
    return float(matrix.float().norm(dim=-1).mean())


class TrainingFreeLinks:
    """Builds training-free links for a system's agents.

    Each model's tables are computed once per build (agents often share a model), and every fitted map
    is kept on disk under ``$RECURSIVEMAS_CACHE/realign/``, keyed by the models' fingerprints, so the
    next build of the same system skips the fitting (seconds for the bundled models). A cache file that
    cannot be read is ignored and rewritten.
    """

    def __init__(self, variant: str, cache: bool = True) -> None:
        self.variant = variant
        self.cache = cache
        self._embeddings: dict[int, torch.Tensor] = {}
        self._vocab: dict[int, dict[str, int]] = {}

    def embeddings(self, agent: Agent) -> torch.Tensor:
        """(V, d) float32 input embeddings of ``agent``'s model."""
        key = id(agent.model)
        if key not in self._embeddings:
            self._embeddings[key] = agent.input_embedding_matrix()
        return self._embeddings[key]

    def vocabulary(self, agent: Agent) -> dict[str, int]:
        key = id(agent.tokenizer)
        if key not in self._vocab:
            self._vocab[key] = vocabulary_by_text(agent.tokenizer)
        return self._vocab[key]

    def inner(self, agent: Agent) -> InnerLink:
        """Ridge realignment ``W_a`` as the residual projection; outputs rescaled to the mean norm."""
        w_a, norm = self._fitted(f"inner-{_model_key(agent)}", lambda: self._fit_ridge(agent))
        d = agent.hidden_size
        link = InnerLink(
            LinkConfig(agent.name, "inner", d, d, self.variant, residual_proj=True, rescale_norm=norm)
        )
        with torch.no_grad():
            link.residual_proj.weight.copy_(w_a.T)
        return link

    def outer(self, name: str, src: Agent, dst: Agent) -> OuterLink:
        """Shared-token least-squares bridge as ``W3``; outputs rescaled to the receiver's mean norm."""
        key = f"outer-{_model_key(src)}-{len(src.tokenizer)}-{_model_key(dst)}-{len(dst.tokenizer)}"
        w, norm = self._fitted(key, lambda: self._fit_bridge(src, dst))
        link = OuterLink(
            LinkConfig(name, "outer", src.hidden_size, dst.hidden_size, self.variant, rescale_norm=norm)
        )
        with torch.no_grad():
            link.residual_proj.weight.copy_(w.T)
        return link

    def _fit_ridge(self, agent: Agent) -> tuple[torch.Tensor, float]:
        w_out, w_in = agent.output_embedding_matrix(), self.embeddings(agent)
        head, table = agent.model.get_output_embeddings().weight, agent.model.get_input_embeddings().weight
        if head.data_ptr() == table.data_ptr():  # tied: W_in = scale · W_out
            # the whole tables' norms: a single row can be zero (``padding_idx`` rows start at zero)
            w_a = tied_ridge_realignment(w_out, float(w_in.norm() / w_out.norm()))
        else:
            w_a = ridge_realignment(w_out, w_in)
        return w_a, mean_row_norm(w_in)

    def _fit_bridge(self, src: Agent, dst: Agent) -> tuple[torch.Tensor, float]:
        src_ids, dst_ids = shared_token_ids(self.vocabulary(src), self.vocabulary(dst))
        y_all = self.embeddings(dst)  # (V_j, d_j)
        w = least_squares_bridge(self.embeddings(src)[src_ids], y_all[dst_ids])  # (d_i, d_j)
        return w, mean_row_norm(y_all)

    def _fitted(self, key: str, fit: Callable[[], tuple[torch.Tensor, float]]) -> tuple[torch.Tensor, float]:
        """The (matrix, norm) stored under ``key``, fitting and storing it first if needed."""
        path = cache_root() / "realign" / f"{key}-v{REALIGN_VERSION}.safetensors"
        if self.cache and path.is_file():
            try:
                with safe_open(path, framework="pt") as f:
                    return f.get_tensor("matrix"), float(f.metadata()["norm"])
            except Exception as err:  # a corrupt or truncated file: refit below and overwrite it
                logger.warning("ignoring unreadable realignment cache %s (%s)", path, err)
        matrix, norm = fit()
        if not (torch.isfinite(matrix).all() and math.isfinite(norm)):
            raise ConfigError(
                f"the training-free fit {key!r} is not finite: the model's embedding tables hold NaN/inf "
                "or are all zero; check the model's weights, or build with init 'identity' instead"
            )
        if self.cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(
                path, lambda p: save_file({"matrix": matrix.contiguous()}, p, metadata={"norm": repr(norm)})
            )
        return matrix, norm
