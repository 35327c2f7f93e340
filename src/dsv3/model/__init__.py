"""The DeepSeek-V3 model family as plain single-device PyTorch (no torch.distributed here)."""

from dsv3.model.mla import MLA, LatentKVCache
from dsv3.model.moe import MLP, Experts, LocalDispatcher, MoE, Router, RoutingStats, sequence_balance_loss
from dsv3.model.mtp import MTPLayer
from dsv3.model.norm import RMSNorm
from dsv3.model.transformer import CausalLMOutput, DeepseekV3ForCausalLM, DeepseekV3Model

__all__ = [
    "MLA",
    "LatentKVCache",
    "MLP",
    "MoE",
    "Experts",
    "LocalDispatcher",
    "Router",
    "RoutingStats",
    "sequence_balance_loss",
    "MTPLayer",
    "RMSNorm",
    "CausalLMOutput",
    "DeepseekV3ForCausalLM",
    "DeepseekV3Model",
]
