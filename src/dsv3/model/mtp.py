"""Multi-Token Prediction modules (report 2.2).

Module k (1 <= k <= D) combines the previous depth's representation with the
embedding of the token k positions ahead and runs one Transformer block:

    h'^k_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)]     (enorm, hnorm, eh_proj)
    h^k_{1:T-k} = TRM_k(h'^k_{1:T-k})
    P^k_{i+k+1} = OutHead(h^k_i)                                 (shared_head.norm, then the main head)

(The concatenation order [enorm(Emb); hnorm(h)] is the released weights' order.)
The embedding Emb and the output head are the main model's own modules, passed in
at call time, so there is one storage and one gradient for each.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model.block import DecoderLayer
from dsv3.model.norm import RMSNorm


class SharedHead(nn.Module):
    """The MTP module's final norm; the projection itself is the main model's ``lm_head``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """MTP module k: ``enorm``, ``hnorm``, ``eh_proj`` (2d -> d), a full block, ``shared_head.norm``.

    Its block is built as layer ``num_hidden_layers + k - 1`` (the index the Hugging
    Face checkpoint stores it under), so it is an MoE block when that layer would be.
    """

    def __init__(self, config: ModelConfig, depth: int) -> None:
        layer_idx = config.num_hidden_layers + depth - 1
        super().__init__(config, layer_idx, cache_idx=layer_idx)
        d = config.hidden_size
        self.depth = depth
        self.enorm = RMSNorm(d, config.rms_norm_eps)
        self.hnorm = RMSNorm(d, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.shared_head = SharedHead(config)

    def forward(
        self,
        h_prev: torch.Tensor,
        emb: torch.Tensor,  # type: ignore[override]
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache=None,
        start_pos: int = 0,
        attn_mask: torch.Tensor | None = None,
        stats=None,
    ) -> torch.Tensor:
        """``h_prev`` = h^{k-1}_{1:T-k} and ``emb`` = Emb(t_{k+1:T}), both [B, T-k, d]; returns h^k [B, T-k, d].

        With a :class:`~dsv3.model.mla.LatentKVCache` holding slot ``num_hidden_layers + k - 1``
        (speculative decoding), the block attends over its cached earlier positions; ``start_pos``
        is the position of ``h_prev[:, 0]``. ``attn_mask``: the document mask of positions 1..T-k
        of packed sequences (training path, see :meth:`MLA.forward`). ``stats``: an optional
        :class:`~dsv3.model.moe.RoutingStats` the MoE block records into.
        """
        if self.recompute is not None and cache is None and torch.is_grad_enabled():
            return self.recompute.mtp(self, h_prev, emb, cos, sin, attn_mask=attn_mask, stats=stats)
        return super().forward(
            self.project_input(h_prev, emb), cos, sin, cache, start_pos, attn_mask=attn_mask, stats=stats
        )

    def project_input(self, h_prev: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """h'^k = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)]: two [B, T-k, d] -> [B, T-k, d]."""
        return self.eh_proj(torch.cat((self.enorm(emb), self.hnorm(h_prev)), dim=-1))
