"""Activation recomputation policies, applied to a built model (report 3.2.3).

``apply_recompute(model, policy)`` installs a :class:`RecomputePolicy` in the ``recompute`` extension
point of every block (:class:`DecoderLayer`, main model and MTP modules alike); in training the block runs
its two residual branches (:meth:`DecoderLayer.attention`, :meth:`DecoderLayer.ffn`) through the policy,
which wraps regions in ``torch.utils.checkpoint`` (non-reentrant). Module names and parameters are
untouched, so checkpoints and the optimizer do not notice. Policies: ``none`` (everything autograd
saves), ``selective`` (the report's: RMSNorm and the MLA up-projection recomputed, SwiGLU keeping only its
inputs; the FFN left as it is under FP8) and ``full`` (each block keeps only its input). What each region
keeps is in docs/memory.md ("Recomputation policies"). Recomputation changes no result: the recomputed
forward is the same computation (routing included), and the MoE loads and bias update come from the
original forward only.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from dsv3.errors import ConfigError
from dsv3.layout import RECOMPUTE_MODES
from dsv3.model.block import DecoderLayer
from dsv3.model.ops import GROUPED_MM_OPS

_aten = torch.ops.aten


def _ops(*names: str) -> set:
    return {getattr(_aten, n).default for n in names if hasattr(_aten, n)}


# GEMM-like ops whose outputs the selective policy keeps.
MATMUL_OPS = _ops("mm", "addmm", "bmm", "_grouped_mm") | {GROUPED_MM_OPS[0]}
# Attention-core ops (the fused kernels of every backend) whose outputs are kept.
ATTENTION_OPS = _ops(
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)


def _save_only(ops: set):
    def policy(ctx, func, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if func in ops else CheckpointPolicy.PREFER_RECOMPUTE

    return functools.partial(create_selective_checkpoint_contexts, policy)


_KEEP_MATMULS = _save_only(MATMUL_OPS)
_KEEP_ATTENTION = _save_only(ATTENTION_OPS)


class RecomputePolicy:
    """How a :class:`DecoderLayer` runs in training; installed as ``layer.recompute`` (the block's
    extension point), consulted only with gradients on and no KV cache. This base class recomputes
    nothing; subclasses checkpoint regions of :meth:`attention` / :meth:`ffn` or the whole block."""

    name = "none"

    def block(
        self,
        layer: DecoderLayer,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        stats=None,
    ) -> torch.Tensor:
        """``x`` [B, T, d] -> [B, T, d]: ``h = x + attention(x); h + ffn(h)`` (``attn_mask``: the document mask;
        ``stats``: the forward's :class:`~dsv3.model.moe.RoutingStats`, recorded by layer key, so a
        recomputation counts nothing twice)."""
        h = x + self.attention(layer, x, cos, sin, attn_mask=attn_mask)
        return h + self.ffn(layer, h, stats)

    def mtp(
        self,
        layer,
        h_prev: torch.Tensor,
        emb: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        stats=None,
    ) -> torch.Tensor:
        """An MTP module (:class:`~dsv3.model.mtp.MTPLayer`): its input projection, then its block."""
        return self.block(layer, layer.project_input(h_prev, emb), cos, sin, attn_mask=attn_mask, stats=stats)

    def attention(
        self,
        layer: DecoderLayer,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return layer.attention(x, cos, sin, attn_mask=attn_mask)

    def ffn(self, layer: DecoderLayer, h: torch.Tensor, stats=None) -> torch.Tensor:
        return layer.ffn(h, stats)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SelectiveRecompute(RecomputePolicy):
    """The report's policy: RMSNorm, the MLA up-projections and SwiGLU outputs are recomputed."""

    name = "selective"

    def attention(self, layer, x, cos, sin, attn_mask=None):
        attn = layer.self_attn
        q_latent, kv_latent = checkpoint(
            lambda t: attn.compress(layer.input_layernorm(t)), x, use_reentrant=False, context_fn=_KEEP_MATMULS
        )
        return checkpoint(
            lambda q, kv: attn.attend(q, kv, cos, sin, attn_mask=attn_mask),
            q_latent,
            kv_latent,
            use_reentrant=False,
            context_fn=_KEEP_ATTENTION,
        )

    def ffn(self, layer, h, stats=None):
        if caches_fp8(layer) or communicates(layer):
            # (A distributed dispatcher: a recomputed region must never repeat an all-to-all.)
            # With the FP8 recipe the FFN keeps FP8 copies of its GEMM and SwiGLU inputs and recomputes
            # SwiGLU outputs already; a checkpointed region would store its full-precision GEMM outputs.
            return layer.ffn(h, stats)
        return checkpoint(functools.partial(layer.ffn, stats=stats), h, use_reentrant=False, context_fn=_KEEP_MATMULS)


class FullRecompute(RecomputePolicy):
    """Keep each block's input only; recompute the whole block in backward."""

    name = "full"

    def block(self, layer, x, cos, sin, attn_mask=None, stats=None):
        if communicates(layer):  # recompute the attention branch only: never repeat an all-to-all
            h = x + checkpoint(_PLAIN.attention, layer, x, cos, sin, attn_mask=attn_mask, use_reentrant=False)
            return h + _PLAIN.ffn(layer, h, stats)
        return checkpoint(_PLAIN.block, layer, x, cos, sin, attn_mask=attn_mask, stats=stats, use_reentrant=False)

    def mtp(self, layer, h_prev, emb, cos, sin, attn_mask=None, stats=None):
        if communicates(layer):
            return self.block(layer, layer.project_input(h_prev, emb), cos, sin, attn_mask=attn_mask, stats=stats)
        # The whole MTP module, its norms and eh_proj included, keeps only its two inputs.
        return checkpoint(
            _PLAIN.mtp, layer, h_prev, emb, cos, sin, attn_mask=attn_mask, stats=stats, use_reentrant=False
        )


_PLAIN = RecomputePolicy()


_POLICY_CLASSES = {"none": None, "selective": SelectiveRecompute, "full": FullRecompute}


def communicates(layer: DecoderLayer) -> bool:
    """Whether the block's MoE exchanges tokens with other ranks (expert parallelism): its FFN is then
    kept out of recomputed regions, so that backward never repeats a dispatch or combine."""
    dispatcher = getattr(layer.mlp, "dispatcher", None)
    return dispatcher is not None and getattr(dispatcher, "group", None) is not None


def caches_fp8(layer: DecoderLayer) -> bool:
    """Whether the block's FFN SwiGLUs cache FP8 inputs (the FP8 recipe marks them ``caches_fp8_inputs``)."""
    mlp = layer.mlp
    acts = (
        [mlp.act]
        if hasattr(mlp, "act")
        else [mlp.experts.act] + ([mlp.shared_experts.act] if mlp.shared_experts is not None else [])
    )
    return any(getattr(act, "caches_fp8_inputs", False) for act in acts)


def apply_recompute(model: torch.nn.Module, policy: str) -> torch.nn.Module:
    """Set the recomputation policy of every block of ``model`` (idempotent; ``none`` undoes it)."""
    if policy not in RECOMPUTE_MODES:
        raise ConfigError(f"recompute policy must be one of {', '.join(RECOMPUTE_MODES)}, got {policy!r}")
    cls = _POLICY_CLASSES[policy]
    for layer in model.modules():
        if isinstance(layer, DecoderLayer):
            layer.recompute = cls() if cls is not None else None
    return model
