"""Inference: latent-KV-cache generation, batched generation, MTP speculative decoding, redundant experts.

* :mod:`dsv3.infer.generate`: :func:`generate` (one batch of equal-length prompts), :func:`generate_batch`
  (prompts of different lengths, left-padded), :func:`generate_texts`, per-layer expert-load collection.
* :mod:`dsv3.infer.speculative`: :func:`speculative_generate`, drafting with the MTP modules (report 5.4.3).
* :mod:`dsv3.infer.eplb`: :func:`rebalance_experts`, redundant-expert placement (report 3.4, deepseek-ai/EPLB).
* :mod:`dsv3.infer.replicate`: :func:`apply_placement`, a model with physical expert replicas.
"""

from dsv3.infer.eplb import rebalance_experts
from dsv3.infer.generate import ExpertLoadCollector, generate, generate_batch, generate_text, generate_texts
from dsv3.infer.replicate import apply_placement
from dsv3.infer.speculative import SpeculativeStats, speculative_generate

__all__ = [
    "rebalance_experts",
    "ExpertLoadCollector",
    "generate",
    "generate_batch",
    "generate_text",
    "generate_texts",
    "apply_placement",
    "SpeculativeStats",
    "speculative_generate",
]
