"""Activation recomputation policies, applied to a built model (report 3.2.3).

``apply_recompute(model, policy)`` rewires the two residual branches of every block
(:meth:`DecoderLayer.attention` and :meth:`DecoderLayer.ffn`, main model and MTP
modules alike) through ``torch.utils.checkpoint`` (non-reentrant). Module names and
parameters are untouched, so checkpoints and the optimizer do not notice.

Policies (what each block keeps for backward; the rest is recomputed in backward):

``none``
    everything autograd saves.
``selective`` (the report's: "recomputation of RMSNorm and MLA up-projection", SwiGLU
    keeping only its inputs)
    - attention branch, split in two regions: (1) RMSNorm + down-projections keeps the
      block input x and the un-normalised latents W^DQ x and [W^DKV; W^KR] x; (2) latent
      RMSNorms, up-projections W^UQ/W^QR, W^UK/W^UV, RoPE, attention core and W^O keep
      only the attention core's outputs (o and the softmax log-sum-exp). RMSNorm
      outputs, q, k, v and the W^O input are recomputed.
    - FFN branch: keeps the outputs of the GEMMs (router logits, the SwiGLU inputs
      gate/up, expert outputs); recomputes the RMSNorm output, the token dispatch
      copies and the SwiGLU output. With the FP8 recipe the FFN is left as it is: its
      GEMM and SwiGLU inputs are already cached in FP8 and SwiGLU outputs recomputed,
      while a checkpointed region would keep its full-precision GEMM outputs.
``full``
    keeps only each block's input and recomputes the whole block.

Recomputation changes no result: the recomputed forward is the same computation
(routing included), and the MoE load statistics and bias update come from the
original forward only (the model reads them from its per-forward
:class:`~dsv3.model.moe.RoutingStats` before backward; a recomputation records the same
layer key again, which counts nothing twice), so every token is counted once.
"""

from __future__ import annotations

import functools
import types

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from dsv3.errors import ConfigError
from dsv3.model.block import DecoderLayer
from dsv3.model.mla import LatentKVCache
from dsv3.model.ops import GROUPED_MM_OPS, swiglu

POLICIES = ("none", "selective", "full")

_aten = torch.ops.aten


def _ops(*names: str) -> set:
    return {getattr(_aten, n).default for n in names if hasattr(_aten, n)}


# GEMM-like ops whose outputs the selective policy keeps.
MATMUL_OPS = _ops("mm", "addmm", "bmm", "_grouped_mm") | {GROUPED_MM_OPS[0]}
# Attention-core ops (the fused kernels of every backend) whose outputs are kept.
ATTENTION_OPS = _ops("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                     "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")


def _save_only(ops: set):
    def policy(ctx, func, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if func in ops else CheckpointPolicy.PREFER_RECOMPUTE

    return functools.partial(create_selective_checkpoint_contexts, policy)


_KEEP_MATMULS = _save_only(MATMUL_OPS)
_KEEP_ATTENTION = _save_only(ATTENTION_OPS)


def _recomputing() -> bool:
    return torch.is_grad_enabled()


def _selective_attention(layer: DecoderLayer, x, cos, sin, cache=None, start_pos=0):
    attn = layer.self_attn
    if cache is not None or not _recomputing():
        return DecoderLayer.attention(layer, x, cos, sin, cache, start_pos)
    q_latent, kv_latent = checkpoint(lambda t: attn.compress(layer.input_layernorm(t)), x,
                                     use_reentrant=False, context_fn=_KEEP_MATMULS)
    return checkpoint(lambda q, kv: attn.attend(q, kv, cos, sin), q_latent, kv_latent,
                      use_reentrant=False, context_fn=_KEEP_ATTENTION)


def _caches_fp8(layer: DecoderLayer) -> bool:
    """Whether the FFN's SwiGLUs already cache FP8 inputs (FP8 recipe): then nothing large is left to drop."""
    mlp = layer.mlp
    acts = [mlp.act] if hasattr(mlp, "act") else [mlp.experts.act] + (
        [mlp.shared_experts.act] if mlp.shared_experts is not None else [])
    return any(act is not swiglu for act in acts)


def _selective_ffn(layer: DecoderLayer, h, stats=None):
    if not _recomputing() or _caches_fp8(layer):
        # With the FP8 recipe the FFN keeps FP8 copies of its GEMM and SwiGLU inputs and recomputes
        # SwiGLU outputs already; a checkpointed region would store its full-precision GEMM outputs.
        return DecoderLayer.ffn(layer, h, stats)
    return checkpoint(functools.partial(DecoderLayer.ffn, layer, stats=stats), h, use_reentrant=False,
                      context_fn=_KEEP_MATMULS)


def _full_forward(layer: DecoderLayer, original, *args, **kwargs):
    decoding = any(isinstance(a, LatentKVCache) for a in (*args, *kwargs.values()))
    if decoding or not _recomputing():
        return original(*args, **kwargs)
    return checkpoint(original, *args, use_reentrant=False, **kwargs)


def apply_recompute(model: torch.nn.Module, policy: str) -> torch.nn.Module:
    """Set the recomputation policy of every block of ``model`` (idempotent; ``none`` undoes it)."""
    if policy not in POLICIES:
        raise ConfigError(f"recompute policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    for layer in model.modules():
        if not isinstance(layer, DecoderLayer):
            continue
        for name in ("attention", "ffn", "forward"):  # back to the class methods
            layer.__dict__.pop(name, None)
        if policy == "selective":
            layer.attention = types.MethodType(_selective_attention, layer)
            layer.ffn = types.MethodType(_selective_ffn, layer)
        elif policy == "full":
            layer.forward = functools.partial(_full_forward, layer, layer.forward)
        layer.recompute_policy = policy
    return model
