"""A text-like hand-off as a differentiable module, for comparing gradient flow with RecursiveLinks.

Decoding a token and re-embedding it is, softened, ``y = T^T · softmax(W_out · x / tau)``: score ``x``
against the sender's vocabulary, then take the expected receiver embedding ``T`` of the token. Its
Jacobian is ``T^T (diag(p) - p p^T) W_out / tau``, which vanishes as the distribution ``p`` sharpens
(low entropy), so gradients fade across rounds (SPEC §6). ``softmax_bridges`` swaps every link of a
system for such a bridge:

* inner (agent -> itself): ``W_out`` = the agent's LM head, ``T`` = its input embeddings;
* outer (i -> j): ``W_out`` = the sender's LM head applied to the sender-space message, ``T`` row ``v``
  = the receiver's embedding of the token whose text equals token ``v``'s (zero when none does).
"""

from __future__ import annotations

import torch
from torch import nn

from recursivemas.agent import Agent
from recursivemas.realign import shared_token_ids, vocabulary_by_text
from recursivemas.system import RecursiveMAS


class SoftmaxBridge(nn.Module):
    """``(..., d_src) -> (..., d_dst)``: ``T^T softmax(W_out x / tau)`` in float32 (no trainable weights)."""

    def __init__(self, w_out: torch.Tensor, table: torch.Tensor, temperature: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("w_out", w_out.float())  # (V, d_src)
        self.register_buffer("table", table.float())  # (V, d_dst)
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(x.float() @ self.w_out.T / self.temperature, dim=-1)  # (..., V)
        return probs @ self.table  # (..., d_dst)


def receiver_table(src: Agent, dst: Agent) -> torch.Tensor:
    """(V_src, d_dst): row ``v`` = ``dst``'s input embedding of the token spelled like ``src`` token ``v``."""
    if src.tokenizer is dst.tokenizer:
        return dst.input_embedding_matrix()
    src_ids, dst_ids = shared_token_ids(vocabulary_by_text(src.tokenizer), vocabulary_by_text(dst.tokenizer))
    table = torch.zeros(src.output_embedding_matrix().shape[0], dst.hidden_size)
    table[src_ids] = dst.input_embedding_matrix()[dst_ids].cpu()
    return table.to(src.device)


def softmax_bridges(system: RecursiveMAS, temperature: float = 1.0) -> RecursiveMAS:
    """A system on the same agents whose every link is a ``SoftmaxBridge`` (the text-like baseline)."""
    bridged = RecursiveMAS(list(system.agents.values()), system.config)
    for name, agent in system.agents.items():
        table = agent.input_embedding_matrix()
        bridged.links["inner"][name] = SoftmaxBridge(agent.output_embedding_matrix(), table, temperature)
    for edge in system.config.edges:
        src, dst = system.agents[edge.src], system.agents[edge.dst]
        bridge = SoftmaxBridge(src.output_embedding_matrix(), receiver_table(src, dst), temperature)
        bridged.links["outer"][edge.key] = bridge.to(src.device)
    return bridged
