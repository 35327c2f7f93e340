"""The activations a training step keeps for backward, itemised tensor by tensor.

Each :class:`ActItem` is one storage that stays alive between a layer's forward and its backward: its
name (the Hugging Face module path that keeps it), the operator that keeps it, its elements per token of
the micro-batch on one device, its format and bytes per token (FP8 tile scales and padding included),
the recomputation policies that keep it (:mod:`dsv3.memory.recompute`) and how TP, sequence parallelism
and expert parallelism split it (``sp``, ``tp``, ``rep``, ``expert``). The table follows dsv3's
implementation (:mod:`dsv3.model`, :mod:`dsv3.fp8`) and ``bench/plan_vs_measured.py`` checks it against
the bytes a real forward leaves alive (:func:`dsv3.memory.measure.activation_bytes`). What each operator
keeps, under each policy and with ``--fp8``, is written out in docs/planner.md ("The activation items").
"""

from __future__ import annotations

import dataclasses
import math

from dsv3.config import ModelConfig
from dsv3.plan.act_items import ALL, NO_RECOMPUTE, NOT_FULL, SELECTIVE_ONLY, SPLITS, ActItem, Items, bytes_per_token
from dsv3.plan.layout import Layout
from dsv3.plan.precision import Precision

__all__ = [
    "ALL",
    "NO_RECOMPUTE",
    "NOT_FULL",
    "SELECTIVE_ONLY",
    "SPLITS",
    "ActItem",
    "bytes_per_token",
    "attention_items",
    "ffn_items",
    "decoder_layer_items",
    "embedding_items",
    "rope_items",
    "head_items",
    "mtp_items",
]


def attention_items(
    cfg: ModelConfig, layout: Layout, prec: Precision, prefix: str = "", tokens: int | None = None
) -> list[ActItem]:
    """Kept tensors of one layer's input RMSNorm and Multi-head Latent Attention."""
    it = Items(cfg, layout, prec, prefix, tokens)
    _input_norm_items(it, cfg)
    _latent_items(it, cfg)
    _attention_core_items(it, cfg)
    return it.items


def _input_norm_items(it: Items, cfg: ModelConfig) -> None:
    """The layer's input RMSNorm and its output, the input of the two down-projections (d)."""
    d, a, st = cfg.hidden_size, it.prec.activations, it.prec.stats
    it.add("input_layernorm.input", "layer input h (residual stream)", "RMSNorm", d, a, ALL, "sp")
    it.add("input_layernorm.rstd", "1/RMS per token", "RMSNorm", 1, st, NO_RECOMPUTE, "sp")
    q_down = "q_a_proj" if cfg.q_lora_rank else "q_proj"
    if it.fp8:  # each FP8 Linear caches its own copy of the shared input
        for proj in (q_down, "kv_a_proj_with_mqa"):
            it.linear_input(
                f"self_attn.{proj}.input", f"normalised h (input of {proj})", "Linear", d, NO_RECOMPUTE, "sp"
            )
    else:
        it.add(
            "input_layernorm.output",
            f"normalised h (input of {q_down}, kv_a_proj_with_mqa)",
            "Linear",
            d,
            a,
            NO_RECOMPUTE,
            "sp",
        )


def _latent_items(it: Items, cfg: ModelConfig) -> None:
    """The query latent c_t^Q (d_c'), the KV latent c_t^KV (d_c) with the RoPE key, and the cast RoPE tables."""
    h, qk, dc, dr = cfg.num_attention_heads, cfg.qk_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    a, st = it.prec.activations, it.prec.stats
    if cfg.q_lora_rank:
        dq = cfg.q_lora_rank
        it.add(
            "self_attn.q_a_proj.output", "query latent W^DQ h (q_a_layernorm input)", "RMSNorm", dq, a, NOT_FULL, "rep"
        )
        it.add("self_attn.q_a_layernorm.rstd", "1/RMS of the query latent", "RMSNorm", 1, st, NO_RECOMPUTE, "rep")
        it.linear_input("self_attn.q_a_layernorm.output", "c_t^Q (q_b_proj input)", "Linear", dq, NO_RECOMPUTE, "rep")
    else:  # without q compression the query comes straight from q_proj, the region-1 GEMM under selective
        it.add(
            "self_attn.q_proj.output",
            "queries W^Q h (GEMM output cached by the selective region)",
            "checkpoint",
            h * qk,
            a,
            SELECTIVE_ONLY,
            "tp",
        )
    it.add(
        "self_attn.kv_a_proj_with_mqa.output",
        "latents W^DKV h and W^KR h (kv_a_layernorm input, RoPE key)",
        "RMSNorm",
        dc + dr,
        a,
        NOT_FULL,
        "rep",
    )
    it.add("self_attn.kv_a_layernorm.rstd", "1/RMS of the KV latent", "RMSNorm", 1, st, NO_RECOMPUTE, "rep")
    it.linear_input("self_attn.kv_a_layernorm.output", "c_t^KV (kv_b_proj input)", "Linear", dc, NO_RECOMPUTE, "rep")
    if a != "fp32":  # apply_rope casts the FP32 cos/sin tables to the activation format, for q^R and for k^R
        it.constant(
            "self_attn.rope_cast",
            "cos/sin cast to the activation format (q^R and k^R)",
            "RoPE",
            2 * dr * it.tokens / it.layout.micro_batch,
            a,
            NO_RECOMPUTE,
        )


def _attention_core_items(it: Items, cfg: ModelConfig) -> None:
    """Queries, keys and values (n_h heads), the softmax state (eager: s x s; fused: logsumexp), the o_proj input."""
    h, qk, dv = cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim
    a, st, layout, prec = it.prec.activations, it.prec.stats, it.layout, it.prec
    it.add("self_attn.query", "queries [q^C; RoPE(q^R)]", "attention", h * qk, a, NO_RECOMPUTE, "tp")
    it.add("self_attn.key", "keys [k^C; RoPE(k^R)]", "attention", h * qk, a, NO_RECOMPUTE, "tp")
    attn_out = dict(
        name="self_attn.o_proj.input",
        what="attention output u_t (o_proj input)",
        saved_by="Linear",
        width=h * dv,
        kept_by=NO_RECOMPUTE,
        split="tp",
    )
    if layout.attention == "eager":
        s = layout.seq_len
        it.add("self_attn.value", "values v^C", "attention", h * dv, a, NO_RECOMPUTE, "tp")
        it.add("self_attn.softmax", "s x s softmax output (eager)", "softmax", h * s, st, NO_RECOMPUTE, "tp")
        it.add("self_attn.probs", "s x s probabilities cast for p.v (eager)", "matmul", h * s, a, NO_RECOMPUTE, "tp")
        it.add(
            "self_attn.output",
            "attention core output p.v (kept by the selective policy)",
            "attention",
            h * dv,
            a,
            SELECTIVE_ONLY,
            "tp",
        )
    else:
        # Fused kernels need equal key and value widths: values (and so the output) are zero-padded to
        # d_h + d_h^R; the o_proj input is a separate, unpadded copy (the output's head-major layout is
        # transposed back to tokens).
        pad = qk > dv
        width = qk if pad else dv
        it.add(
            "self_attn.value",
            "values v^C" + (" zero-padded to the key width" if pad else ""),
            "attention",
            h * width,
            a,
            NO_RECOMPUTE,
            "tp",
        )
        it.add(
            "self_attn.output",
            "attention core output" + (" (padded width)" if pad else ""),
            "attention",
            h * width,
            a,
            NOT_FULL,
            "tp",
        )
        it.add("self_attn.logsumexp", "softmax logsumexp per head", "attention", h, st, NOT_FULL, "tp")
    if it.fp8 and prec.attn_out_cache != "fp8":
        it.row_tiled(**attn_out, fmt=prec.attn_out_cache)
    else:
        it.linear_input(**attn_out)


def ffn_items(
    cfg: ModelConfig, layout: Layout, prec: Precision, moe: bool, prefix: str = "", tokens: int | None = None
) -> list[ActItem]:
    """Kept tensors of one layer's post-attention RMSNorm and its dense MLP or DeepSeekMoE."""
    d = cfg.hidden_size
    a, st = prec.activations, prec.stats
    it = Items(cfg, layout, prec, prefix, tokens)
    # Selective recomputation re-runs the FFN except with FP8 caching (then it is left as under `none`).
    recomputed = NOT_FULL if it.fp8 else NO_RECOMPUTE
    region_cache = () if it.fp8 else SELECTIVE_ONLY  # GEMM outputs the selective region caches
    it.add("post_attention_layernorm.input", "residual stream after attention", "RMSNorm", d, a, NOT_FULL, "sp")
    it.add("post_attention_layernorm.rstd", "1/RMS per token", "RMSNorm", 1, st, recomputed, "sp")
    if not moe:
        _dense_mlp_items(it, cfg, recomputed, region_cache)
    else:
        _router_items(it, cfg, layout, recomputed, region_cache)
        if cfg.n_shared_experts:
            _shared_expert_items(it, cfg, recomputed, region_cache)
        _routed_expert_items(it, cfg, layout, recomputed, region_cache)
    return it.items


def _dense_mlp_items(it: "Items", cfg: ModelConfig, recomputed, region_cache) -> None:
    """The dense MLP's kept tensors: SwiGLU inputs, down-projection input (and the cached output)."""
    d, a = cfg.hidden_size, it.prec.activations
    i = cfg.intermediate_size
    if it.fp8:
        for proj in ("gate_proj", "up_proj"):
            it.linear_input(
                f"mlp.{proj}.input", f"normalised FFN input u_t ({proj} input)", "Linear", d, recomputed, "sp"
            )
        it.row_tiled("mlp.swiglu.gate", "gate projection (SwiGLU input)", "SwiGLU", i, recomputed, "tp")
        it.row_tiled("mlp.swiglu.up", "up projection (SwiGLU input)", "SwiGLU", i, recomputed, "tp")
    else:
        it.add(
            "post_attention_layernorm.output",
            "normalised FFN input u_t (gate_proj, up_proj input)",
            "Linear",
            d,
            a,
            recomputed,
            "sp",
        )
        it.add("mlp.swiglu.input", "[gate, up] projections (SwiGLU input)", "SwiGLU", 2 * i, a, NOT_FULL, "tp")
    _down_proj_items(it, "mlp", ("SwiGLU output", "FFN output"), d, i, recomputed, region_cache)


def _down_proj_items(
    it: "Items", module: str, what: tuple[str, str], d: int, width: float, recomputed, region_cache
) -> None:
    """An MLP's down-projection input [width] and, under selective recomputation, its cached output [d]."""
    it.linear_input(f"{module}.down_proj.input", what[0], "Linear", width, recomputed, "tp")
    if region_cache:
        it.add(
            f"{module}.down_proj.output",
            f"{what[1]} (GEMM output cached by the selective region)",
            "checkpoint",
            d,
            it.prec.activations,
            region_cache,
            "rep",
        )


def _router_items(it: "Items", cfg: ModelConfig, layout: Layout, recomputed, region_cache) -> None:
    """The gate's kept tensors: its input, logits, affinities, top-K_r, balance-loss sums, the loads."""
    d, a, rc = cfg.hidden_size, it.prec.activations, it.prec.router_compute
    n_r, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    users = []
    if cfg.n_shared_experts and not it.fp8:
        users.append("shared_experts.gate_proj, up_proj")
    if rc == a:
        users.append("gate (router)")
    if users:
        it.add(
            "post_attention_layernorm.output",
            f"normalised FFN input u_t ({', '.join(users)} input)",
            "Linear",
            d,
            a,
            recomputed,
            "sp",
        )
    if rc != a:
        it.add(
            "mlp.gate.input", f"FFN input cast to {rc} for the gating GEMM", "Linear (router)", d, rc, recomputed, "sp"
        )
    if rc != it.prec.router:  # one cast of the N_r x d router weight per micro-batch
        it.constant("mlp.gate.weight_cast", f"router weight cast to {rc}", "Linear (router)", n_r * d, rc, recomputed)
    if region_cache:
        it.add(
            "mlp.gate.logits",
            "router logits u_t e_i (GEMM output cached by the selective region)",
            "checkpoint",
            n_r,
            rc,
            region_cache,
            "sp",
        )
    scores = "affinities s_{i,t} = sigmoid(u_t e_i)" if cfg.scoring_func == "sigmoid" else "softmax affinities s_{i,t}"
    it.add("mlp.gate.scores", scores, "router", n_r, rc, recomputed, "sp")
    it.add("mlp.gate.topk_index", "selected experts (top-K_r of s + b)", "router", k, "int64", recomputed, "sp")
    if cfg.norm_topk_prob and k > 1:  # the normalisation keeps its numerator and denominator
        it.add(
            "mlp.gate.topk_weight",
            "affinities of the selected experts (normalised into g_{i,t})",
            "router",
            k,
            rc,
            recomputed,
            "sp",
        )
        it.add("mlp.gate.topk_sum", "sum of the selected affinities (normaliser)", "router", 1, rc, recomputed, "sp")
    if layout.balance_loss:
        it.add(
            "mlp.gate.score_sum", "sum_j s_{j,t} (sequence-wise balance loss)", "balance loss", 1, rc, recomputed, "sp"
        )
        it.constant(
            "mlp.gate.balance_f",
            "f_i per sequence (sequence-wise balance loss)",
            "balance loss",
            n_r * layout.micro_batch,
            rc,
            recomputed,
        )
    it.constant(
        "mlp.load",
        "tokens per expert of the micro-batch (MoE.last_load, for the bias update)",
        "MoE",
        n_r,
        "int64",
        ALL,
    )
    if layout.balance_loss:
        it.constant("mlp.balance_loss", "the layer's balance loss L_Bal (MoE.last_balance_loss)", "MoE", 1, rc, ALL)


def _shared_expert_items(it: "Items", cfg: ModelConfig, recomputed, region_cache) -> None:
    """The shared experts' kept tensors (N_s experts of width I_e as one MLP)."""
    d, a = cfg.hidden_size, it.prec.activations
    ie = cfg.moe_intermediate_size
    w = cfg.n_shared_experts * ie
    if it.fp8:
        for proj in ("gate_proj", "up_proj"):
            it.linear_input(
                f"mlp.shared_experts.{proj}.input",
                f"normalised FFN input u_t (shared {proj} input)",
                "Linear",
                d,
                recomputed,
                "sp",
            )
        it.row_tiled(
            "mlp.shared_experts.swiglu.gate", "shared-expert gate (SwiGLU input)", "SwiGLU", w, recomputed, "tp"
        )
        it.row_tiled("mlp.shared_experts.swiglu.up", "shared-expert up (SwiGLU input)", "SwiGLU", w, recomputed, "tp")
    else:
        it.add(
            "mlp.shared_experts.swiglu.input",
            "shared-expert [gate, up] (SwiGLU input)",
            "SwiGLU",
            2 * w,
            a,
            NOT_FULL,
            "tp",
        )
    names = ("shared-expert SwiGLU output", "shared-expert output")
    _down_proj_items(it, "mlp.shared_experts", names, d, w, recomputed, region_cache)


def _routed_expert_items(it: "Items", cfg: ModelConfig, layout: Layout, recomputed, region_cache) -> None:
    """The routed experts' kept tensors: dispatched copies, SwiGLU inputs, weights, indices, offsets."""
    d, a, rc = cfg.hidden_size, it.prec.activations, it.prec.router_compute
    n_r, ie = cfg.n_routed_experts, cfg.moe_intermediate_size
    ie_dev = ie / layout.etp
    it.expert_input(
        "mlp.experts.input", "dispatched token copies (grouped gate/up GEMM input)", "grouped GEMM", d, recomputed
    )
    if it.fp8:
        it.row_tiled("mlp.experts.swiglu.gate", "routed gate (SwiGLU input)", "SwiGLU", ie_dev, recomputed, "expert")
        it.row_tiled("mlp.experts.swiglu.up", "routed up (SwiGLU input)", "SwiGLU", ie_dev, recomputed, "expert")
    else:
        it.add(
            "mlp.experts.swiglu.input",
            "routed [gate, up] (SwiGLU input, grouped GEMM output)",
            "SwiGLU",
            2 * ie_dev,
            a,
            NOT_FULL,
            "expert",
        )
    it.add(
        "mlp.experts.weight",
        "routing weight g of each token copy (applied in SwiGLU)",
        "SwiGLU",
        1,
        rc,
        recomputed,
        "expert",
    )
    it.expert_input(
        "mlp.experts.down_proj.input",
        "routed SwiGLU output (grouped down GEMM input)",
        "grouped GEMM",
        ie_dev,
        recomputed,
    )
    if region_cache:
        it.add(
            "mlp.experts.down_proj.output",
            "expert outputs (grouped GEMM output cached by the selective region)",
            "checkpoint",
            d,
            a,
            region_cache,
            "expert",
        )
    it.add(
        "mlp.experts.index",
        "token of each copy (dispatch index_select, combine)",
        "dispatch/combine",
        1,
        "int64",
        recomputed,
        "expert",
    )
    it.add(
        "mlp.experts.order",
        "copy order by expert (gathers the routing weights)",
        "dispatch",
        1,
        "int64",
        recomputed,
        "expert",
    )
    if not it.fp8:  # the FP8 grouped GEMM reads the group ends on the host
        it.constant(
            "mlp.experts.offsets",
            "cumulative tokens per expert (grouped GEMM offsets)",
            "grouped GEMM",
            n_r / layout.ep,
            "int32",
            recomputed,
        )


def decoder_layer_items(
    cfg: ModelConfig, layout: Layout, prec: Precision, moe: bool, prefix: str = "", tokens: int | None = None
) -> list[ActItem]:
    """All kept tensors of one decoder layer (``tokens``: its tokens per micro-batch, default b x s)."""
    return attention_items(cfg, layout, prec, prefix, tokens) + ffn_items(cfg, layout, prec, moe, prefix, tokens)


def embedding_items(cfg: ModelConfig, layout: Layout, prec: Precision) -> list[ActItem]:
    it = Items(cfg, layout, prec)
    it.add("model.embed_tokens.input", "token ids", "Embedding", 1, "int64", ALL, "rep")
    return it.items


def rope_items(cfg: ModelConfig, layout: Layout, prec: Precision) -> list[ActItem]:
    """The FP32 RoPE cos/sin tables (d_h^R/2 each per sequence position), kept once per stage: by the RoPE
    products of every layer when the activations are FP32 (otherwise those keep their own casts,
    ``rope_cast``), and as an input of every recomputed region."""
    it = Items(cfg, layout, prec)
    it.constant(
        "rotary_emb.cos_sin",
        "RoPE cos and sin tables, d_h^R/2 each per position (shared by all layers)",
        "RoPE, checkpoint",
        cfg.qk_rope_head_dim * layout.seq_len,
        "fp32",
        ALL if prec.activations == "fp32" else ("selective", "full"),
    )
    return it.items


def _head_items(
    cfg: ModelConfig,
    layout: Layout,
    prec: Precision,
    prefix: str,
    norm: str,
    input_what: str,
    tokens: int | None = None,
) -> list[ActItem]:
    it = Items(cfg, layout, prec, prefix, tokens)
    it.add(f"{norm}.input", input_what, "RMSNorm", cfg.hidden_size, prec.activations, ALL, "sp")
    it.add(f"{norm}.rstd", "1/RMS per token", "RMSNorm", 1, prec.stats, ALL, "sp")
    it.add(
        "loss.grad_hidden",
        "dL/dh of the output head, computed in forward",
        "fused cross-entropy",
        cfg.hidden_size,
        prec.activations,
        ALL,
        "rep",
    )
    vocab_rows = math.ceil(cfg.vocab_size / layout.tp)  # the head is split along the vocabulary
    it.constant(
        "loss.grad_weight",
        "dL/dW of the output head (V x d), computed in forward",
        "fused cross-entropy",
        vocab_rows * cfg.hidden_size,
        prec.weights,
        ALL,
    )
    return it.items


def head_items(cfg: ModelConfig, layout: Layout, prec: Precision) -> list[ActItem]:
    """Final RMSNorm, output head and main cross-entropy (last stage)."""
    return _head_items(cfg, layout, prec, "", "model.norm", "last hidden state h^0")


def mtp_items(
    cfg: ModelConfig, layout: Layout, prec: Precision, k: int, moe: bool, shares_embedding: bool = False
) -> list[ActItem]:
    """MTP module k (0-based, depth k+1): the two RMSNorms, eh_proj, its layer, head and loss.

    It runs on the ``s - (k+1)`` positions that have a target; its items are
    built for those ``b (s - k - 1)`` tokens and scaled to bytes per token of the
    micro-batch. Module 0's ``hnorm`` input is the main model's last hidden state
    (counted by :func:`head_items`), module k's that of module k-1 (its
    ``shared_head.norm`` input); the ``enorm`` input, the embedding of the
    shifted tokens, is the main embedding output when the same stage holds the
    embedding (``shares_embedding``), a lookup of its own otherwise. Under full
    recomputation the whole module (eh_proj included) is re-run: it keeps
    nothing of its own but its head.
    """
    d = cfg.hidden_size
    p = f"mtp.{k}."
    tokens = layout.micro_batch * (layout.seq_len - k - 1)
    if tokens <= 0:
        return []
    it = Items(cfg, layout, prec, p, tokens)
    if not shares_embedding:
        it.add("embed_tokens.input", "token ids shifted by k+1", "Embedding", 1, "int64", ALL, "rep")
        it.add("enorm.input", "embedding of the shifted tokens", "RMSNorm", d, prec.activations, ALL, "sp")
    it.add("enorm.rstd", "1/RMS per token", "RMSNorm", 1, prec.stats, NOT_FULL, "sp")
    it.add("hnorm.rstd", "1/RMS per token", "RMSNorm", 1, prec.stats, NOT_FULL, "sp")
    it.linear_input("eh_proj.input", "[RMSNorm(Emb); RMSNorm(h)] (eh_proj input)", "Linear", 2 * d, NOT_FULL, "sp")
    layer = decoder_layer_items(cfg, layout, prec, moe, p + "layer.", tokens)
    layer = [
        dataclasses.replace(i, kept_by=NOT_FULL) if i.name == p + "layer.input_layernorm.input" else i for i in layer
    ]  # the eh_proj output: re-run with the module under full recomputation
    items = it.items + layer
    items += _head_items(cfg, layout, prec, p, "shared_head.norm", f"output h^{k + 1} of the MTP layer", tokens)
    scale = tokens / layout.tokens_per_microbatch
    return [i.scaled(scale) for i in items]
