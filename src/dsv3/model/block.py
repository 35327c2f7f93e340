"""One Transformer block: pre-norm MLA attention, then a dense SwiGLU MLP or DeepSeekMoE."""

from __future__ import annotations

import torch
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model.mla import MLA, LatentKVCache
from dsv3.model.moe import MLP, MoE, RoutingStats
from dsv3.model.norm import RMSNorm


class DecoderLayer(nn.Module):
    """``h = x + MLA(RMSNorm(x)); out = h + FFN(RMSNorm(h))``.

    Args:
        config: the model configuration.
        layer_idx: the layer's index (decides dense vs MoE via ``config.is_moe_layer``).
        cache_idx: its slot in a :class:`LatentKVCache` (defaults to ``layer_idx``).
    """

    def __init__(self, config: ModelConfig, layer_idx: int, cache_idx: int | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config, layer_idx if cache_idx is None else cache_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = (
            MoE(config, layer_idx)
            if config.is_moe_layer(layer_idx)
            else MLP(config.hidden_size, config.intermediate_size)
        )
        # Extension point: a recomputation policy (dsv3.memory.recompute) that runs the block in training.
        # It must provide ``block(layer, x, cos, sin, stats) -> [B, T, d]``; None runs the plain forward.
        self.recompute = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LatentKVCache | None = None,
        start_pos: int = 0,
        attn_mask: torch.Tensor | None = None,
        stats: RoutingStats | None = None,
    ) -> torch.Tensor:
        """``x`` [B, T, d] -> [B, T, d]; ``attn_mask``: the document mask (see :meth:`MLA.forward`); an MoE
        block records its loads/balance loss into ``stats``."""
        if self.recompute is not None and cache is None and torch.is_grad_enabled():
            return self.recompute.block(self, x, cos, sin, attn_mask=attn_mask, stats=stats)
        h = x + self.attention(x, cos, sin, cache, start_pos, attn_mask)
        return h + self.ffn(h, stats)

    # The two residual branches; recomputation policies wrap these (see dsv3.memory.recompute).
    def attention(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LatentKVCache | None = None,
        start_pos: int = 0,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The attention branch ``MLA(RMSNorm(x))``."""
        return self.self_attn(self.input_layernorm(x), cos, sin, cache, start_pos, attn_mask)

    def ffn(self, h: torch.Tensor, stats: RoutingStats | None = None) -> torch.Tensor:
        """The feed-forward branch ``FFN(RMSNorm(h))``."""
        if isinstance(self.mlp, MoE):
            return self.mlp(self.post_attention_layernorm(h), stats)
        return self.mlp(self.post_attention_layernorm(h))
