"""The activations a training step saves for backward, itemised tensor by tensor.

Each :class:`ActItem` is one tensor autograd keeps alive between a layer's
forward and its backward: its name (the Hugging Face module path that saves
it), which operator saves it, how many elements it holds per token of the
micro-batch on one device, its format, and which recomputation policies keep
it. The table is what users compare with published analyses, and what
``bench/plan_vs_measured.py`` calibrates against the real implementation.

What the operators save (one storage each; a tensor two operators save is listed once):

- RMSNorm saves its input and the per-token reciprocal RMS ``rstd`` (FP32);
- Linear saves its input (the weight is a parameter, not an activation);
- fused attention (FlashAttention / SDPA) saves q, k, v, its output and one
  logsumexp per head and token; MLA's values are zero-padded to the key width
  d_h + d_h^R for the fused kernel (as dsv3's MLA does), so v and the output
  are that wide and the o_proj input is a separate unpadded copy; ``eager``
  attention instead keeps the s x s softmax output (FP32) and the
  probabilities cast for the p.v product;
- RoPE's products keep the FP32 cos/sin tables (one pair per stage), cast to
  the activation format per use when that is not FP32;
- SwiGLU ``silu(gate) * up`` keeps gate, up and silu(gate); the down projection
  keeps SwiGLU's output;
- the router saves its input in the router's format, the sigmoid scores, the
  selected expert indices and the normalised gate weights; the routed experts
  save the dispatched token copies (input of the grouped gate/up GEMM), the
  grouped SwiGLU input and output, the expert outputs (for the gate-weight
  product) with their gate weights, the gate-weighted outputs (``index_add``,
  the combine, keeps its source) and the two permutation indices; the
  sequence-wise balance loss keeps the score sums. Load is assumed balanced:
  every device processes K_r x T token copies per T tokens;
- the cross-entropy saves the log-probabilities of all V classes (FP32).

Recompute policies (report 3.2.3 and 3.3.3):

- ``none``: everything above is kept;
- ``selective``: all RMSNorm outputs (and their rstd), the MLA up-projection
  outputs (q, k, v of attention) and the SwiGLU outputs (silu(gate) and the
  product) are recomputed, so only their inputs are kept;
- ``full``: only each decoder layer's input is kept; the layer is re-run
  during backward (the output head and loss are not recomputed).

Parallel splits (per device): ``sp`` tensors are split over TP along the
sequence when sequence parallelism is on (the residual stream, the RMSNorm
inputs and outputs, the router), ``tp`` tensors over TP along heads or width,
``rep`` tensors are whole on every TP rank (the MLA latents c_q, c_kv, which
the replicated down-projections produce), and routed-expert tensors hold
K_r * ETP / TP token copies per token (tokens of a TP group are regrouped
into ETP x EP groups), each ``I_e / ETP`` wide.

With ``--fp8`` the tensors the FP8 recipe caches (report 3.3.3) take 1 byte
plus an FP32 scale per 128 elements: the inputs of every Linear / grouped GEMM
and the SwiGLU inputs in the MoE; the input of the Linear after attention
(``o_proj``) uses E5M6.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dsv3.config import ModelConfig
from dsv3.plan.layout import Layout
from dsv3.plan.precision import Precision, element_bytes

ALL = ("none", "selective", "full")
NO_RECOMPUTE = ("none",)
NOT_FULL = ("none", "selective")
NOT_SELECTIVE = ("none", "full")

# Format roles, resolved by :func:`_format`.
ACT, LINEAR_IN, MOE_SWIGLU_IN, ATTN_OUT, STAT, ROUTER, INDEX, INT32, LOSS = (
    "act", "linear_in", "moe_swiglu_in", "attn_out", "stat", "router", "index", "int32", "loss",
)


@dataclass(frozen=True)
class ActItem:
    """One tensor saved for backward.

    Attributes:
        name: where it lives, e.g. ``self_attn.q_a_layernorm.input``.
        what: what it is, in the report's words.
        saved_by: the operator whose backward needs it.
        elems: elements per token of the micro-batch, on one device.
        dtype: its format (``bf16``, ``fp32``, ``fp8``, ``e5m6``, ``int64``).
        kept_by: the recompute policies that keep it.
        split: ``sp``, ``tp``, ``rep`` or ``expert`` (see the module docstring).
    """

    name: str
    what: str
    saved_by: str
    elems: float
    dtype: str
    kept_by: tuple[str, ...]
    split: str

    @property
    def bytes_per_token(self) -> float:
        return self.elems * element_bytes(self.dtype)

    def kept(self, policy: str) -> bool:
        return policy in self.kept_by

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "what": self.what,
            "saved_by": self.saved_by,
            "elements_per_token": self.elems,
            "dtype": self.dtype,
            "bytes_per_token": self.bytes_per_token,
            "kept_by": list(self.kept_by),
            "split": self.split,
        }


def _format(role: str, layout: Layout, prec: Precision) -> str:
    if role == LINEAR_IN or role == MOE_SWIGLU_IN:
        return prec.fp8_cache if layout.fp8 else prec.activations
    if role == ATTN_OUT:
        return prec.attn_out_cache if layout.fp8 else prec.activations
    return {ACT: prec.activations, STAT: prec.stats, ROUTER: prec.router_compute, INDEX: "int64", INT32: "int32",
            LOSS: prec.loss}[role]


class _Items:
    """Collects items, dividing element counts by the parallel split."""

    def __init__(self, layout: Layout, prec: Precision, prefix: str = "") -> None:
        self.layout, self.prec, self.prefix = layout, prec, prefix
        self.items: list[ActItem] = []

    def add(self, name: str, what: str, saved_by: str, elems: float, role: str, kept_by: tuple[str, ...], split: str) -> None:
        lay = self.layout
        div = {"sp": lay.sp, "tp": lay.tp, "rep": 1, "expert": lay.tp}[split]
        if split == "expert":
            elems = elems * lay.etp  # token copies regrouped from TP into ETP groups
        self.items.append(
            ActItem(self.prefix + name, what, saved_by, elems / div, _format(role, lay, self.prec), kept_by, split)
        )


def attention_items(cfg: ModelConfig, layout: Layout, prec: Precision, prefix: str = "") -> list[ActItem]:
    """Saved tensors of one layer's input RMSNorm and Multi-head Latent Attention."""
    d, h = cfg.hidden_size, cfg.num_attention_heads
    qk, dv, dc, dr = cfg.qk_head_dim, cfg.v_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    it = _Items(layout, prec, prefix)
    it.add("input_layernorm.input", "layer input h (residual stream)", "RMSNorm", d, ACT, ALL, "sp")
    it.add("input_layernorm.rstd", "1/RMS per token", "RMSNorm", 1, STAT, NO_RECOMPUTE, "sp")
    down = "q_a_proj, kv_a_proj_with_mqa" if cfg.q_lora_rank else "q_proj, kv_a_proj_with_mqa"
    it.add("input_layernorm.output", f"normalised h (input of {down})", "Linear", d, LINEAR_IN, NO_RECOMPUTE, "sp")
    if cfg.q_lora_rank:
        dq = cfg.q_lora_rank
        it.add("self_attn.q_a_proj.output", "query latent c_t^Q (q_a_layernorm input)", "RMSNorm", dq, ACT, NOT_FULL, "rep")
        it.add("self_attn.q_a_layernorm.rstd", "1/RMS of c_t^Q", "RMSNorm", 1, STAT, NO_RECOMPUTE, "rep")
        it.add("self_attn.q_a_layernorm.output", "normalised c_t^Q (q_b_proj input)", "Linear", dq, LINEAR_IN, NO_RECOMPUTE, "rep")
    it.add(
        "self_attn.kv_a_proj_with_mqa.output", "KV latent c_t^KV and RoPE key k_t^R (kv_a_layernorm input)",
        "RMSNorm", dc + dr, ACT, NOT_FULL, "rep",
    )
    it.add("self_attn.kv_a_layernorm.rstd", "1/RMS of c_t^KV", "RMSNorm", 1, STAT, NO_RECOMPUTE, "rep")
    it.add("self_attn.kv_a_layernorm.output", "normalised c_t^KV (kv_b_proj input)", "Linear", dc, LINEAR_IN, NO_RECOMPUTE, "rep")
    it.add("self_attn.query", "queries [q^C; RoPE(q^R)] (up-projection output)", "attention", h * qk, ACT, NO_RECOMPUTE, "tp")
    it.add("self_attn.key", "keys [k^C; RoPE(k^R)] (up-projection output)", "attention", h * qk, ACT, NO_RECOMPUTE, "tp")
    if layout.attention == "eager":
        s = layout.seq_len
        it.add("self_attn.value", "values v^C (up-projection output)", "attention", h * dv, ACT, NO_RECOMPUTE, "tp")
        it.add("self_attn.softmax", "s x s softmax output (eager)", "softmax", h * s, STAT, NOT_FULL, "tp")
        it.add("self_attn.probs", "s x s probabilities cast for p.v (eager)", "matmul", h * s, ACT, NOT_FULL, "tp")
        it.add("self_attn.o_proj.input", "attention output u_t (o_proj input)", "Linear", h * dv, ATTN_OUT, NOT_FULL, "tp")
    else:
        # Fused kernels need equal key and value widths: values (and so the output) are zero-padded to
        # d_h + d_h^R, and the o_proj input is a separate, unpadded copy.
        pad = qk > dv
        width = qk if pad else dv
        it.add("self_attn.value", "values v^C" + (" zero-padded to the key width" if pad else "") + " (up-projection output)",
               "attention", h * width, ACT, NO_RECOMPUTE, "tp")
        it.add("self_attn.logsumexp", "softmax logsumexp per head", "attention", h, STAT, NOT_FULL, "tp")
        if pad:
            it.add("self_attn.output", "attention output (padded width)", "attention", h * width, ACT, NOT_FULL, "tp")
            it.add("self_attn.o_proj.input", "attention output u_t (o_proj input, unpadded copy)", "Linear", h * dv,
                   ATTN_OUT, NOT_FULL, "tp")
        else:
            it.add("self_attn.output", "attention output u_t (also the o_proj input)", "attention, Linear", h * dv,
                   ATTN_OUT, NOT_FULL, "tp")
    if prec.activations != prec.stats:  # apply_rope casts the FP32 cos/sin tables, for q^R and for k^R
        it.add("self_attn.rope_cast", "cos/sin cast to the activation format (q^R and k^R)", "RoPE",
               2 * dr / layout.micro_batch, ACT, NOT_FULL, "rep")
    return it.items


def ffn_items(cfg: ModelConfig, layout: Layout, prec: Precision, moe: bool, prefix: str = "") -> list[ActItem]:
    """Saved tensors of one layer's post-attention RMSNorm and its dense MLP or DeepSeekMoE."""
    d = cfg.hidden_size
    it = _Items(layout, prec, prefix)
    it.add("post_attention_layernorm.input", "residual stream after attention", "RMSNorm", d, ACT, NOT_FULL, "sp")
    it.add("post_attention_layernorm.rstd", "1/RMS per token", "RMSNorm", 1, STAT, NO_RECOMPUTE, "sp")
    it.add("post_attention_layernorm.output", "normalised FFN input u_t", "Linear", d, LINEAR_IN, NO_RECOMPUTE, "sp")
    if not moe:
        i = cfg.intermediate_size
        it.add("mlp.swiglu.input", "[gate, up] projections (SwiGLU input)", "SwiGLU", 2 * i, ACT, NOT_FULL, "tp")
        it.add("mlp.swiglu.silu", "silu(gate) (for the gate x up product)", "SwiGLU", i, ACT, NO_RECOMPUTE, "tp")
        it.add("mlp.down_proj.input", "SwiGLU output", "Linear", i, LINEAR_IN, NO_RECOMPUTE, "tp")
        return it.items
    n_r, k, ie = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    if prec.router_compute != _format(LINEAR_IN, layout, prec):
        it.add("mlp.gate.input", f"FFN input cast to {prec.router_compute} for the gating GEMM", "Linear (router)", d,
               ROUTER, NOT_FULL, "sp")
    if prec.router_compute != prec.router:  # one cast of the N_r x d router weight per micro-batch
        it.add("mlp.gate.weight_cast", f"router weight cast to {prec.router_compute}", "Linear (router)",
               n_r * d / layout.tokens_per_microbatch, ROUTER, NOT_FULL, "rep")
    it.add("mlp.gate.scores", "affinities s_{i,t} = sigmoid(u_t e_i)" if cfg.scoring_func == "sigmoid" else "softmax affinities s_{i,t}",
           "router", n_r, STAT, NOT_FULL, "sp")
    it.add("mlp.gate.topk_index", "selected experts (top-K_r of s + b)", "router", k, INDEX, NOT_FULL, "sp")
    it.add("mlp.gate.topk_weight", "affinities of the selected experts (normalised into g_{i,t})", "router", k, STAT,
           NOT_FULL, "sp")
    if cfg.norm_topk_prob and k > 1:
        it.add("mlp.gate.topk_sum", "sum of the selected affinities (normaliser)", "router", 1, STAT, NOT_FULL, "sp")
    if cfg.seq_aux_alpha > 0:
        it.add("mlp.gate.score_sum", "sum_j s_{j,t} (sequence-wise balance loss)", "balance loss", 1, STAT, NOT_FULL, "sp")
        it.add("mlp.gate.balance_f", "f_i per sequence (sequence-wise balance loss)", "balance loss",
               n_r / layout.seq_len, STAT, NOT_FULL, "rep")
    if cfg.n_shared_experts:
        w = cfg.n_shared_experts * ie
        it.add("mlp.shared_experts.swiglu.input", "shared-expert [gate, up] (SwiGLU input)", "SwiGLU", 2 * w, MOE_SWIGLU_IN, NOT_FULL, "tp")
        it.add("mlp.shared_experts.swiglu.silu", "shared-expert silu(gate)", "SwiGLU", w, ACT, NO_RECOMPUTE, "tp")
        it.add("mlp.shared_experts.down_proj.input", "shared-expert SwiGLU output", "Linear", w, LINEAR_IN, NO_RECOMPUTE, "tp")
    it.add("mlp.experts.input", "dispatched token copies (grouped gate/up GEMM input)", "grouped GEMM", k * d, LINEAR_IN, NOT_FULL, "expert")
    it.add("mlp.experts.swiglu.input", "routed [gate, up] (SwiGLU input)", "SwiGLU", k * 2 * ie / layout.etp, MOE_SWIGLU_IN, NOT_FULL, "expert")
    it.add("mlp.experts.swiglu.silu", "routed silu(gate)", "SwiGLU", k * ie / layout.etp, ACT, NO_RECOMPUTE, "expert")
    it.add("mlp.experts.down_proj.input", "routed SwiGLU output", "grouped GEMM", k * ie / layout.etp, LINEAR_IN, NO_RECOMPUTE, "expert")
    it.add("mlp.experts.output", "expert outputs (for the gate-weight product)", "combine", k * d, ACT, NOT_FULL, "expert")
    it.add("mlp.experts.weight", "gate value g of each token copy", "combine", k, ACT, NOT_FULL, "expert")
    it.add("mlp.experts.weighted_output", "gate-weighted expert outputs (kept by the index_add combine)", "combine",
           k * d, ACT, NOT_FULL, "expert")
    it.add("mlp.experts.index", "token of each copy (dispatch gather, combine scatter)", "dispatch/combine", k, INDEX,
           NOT_FULL, "expert")
    it.add("mlp.experts.order", "copy order by expert (gathers the gate values)", "dispatch", k, INDEX, NOT_FULL, "expert")
    it.add("mlp.experts.offsets", "cumulative tokens per expert (grouped GEMM offsets)", "grouped GEMM",
           n_r / layout.ep / layout.tokens_per_microbatch, INT32, NOT_FULL, "rep")
    return it.items


def decoder_layer_items(cfg: ModelConfig, layout: Layout, prec: Precision, moe: bool, prefix: str = "") -> list[ActItem]:
    """All saved tensors of one decoder layer."""
    return attention_items(cfg, layout, prec, prefix) + ffn_items(cfg, layout, prec, moe, prefix)


def embedding_items(cfg: ModelConfig, layout: Layout, prec: Precision) -> list[ActItem]:
    it = _Items(layout, prec)
    it.add("model.embed_tokens.input", "token ids", "Embedding", 1, INDEX, ALL, "rep")
    return it.items


def rope_items(cfg: ModelConfig, layout: Layout, prec: Precision) -> list[ActItem]:
    """The RoPE cos/sin tables, shared by every layer of a stage (s x d_h^R each, per sequence position)."""
    it = _Items(layout, prec)
    it.add("rotary_emb.cos_sin", "RoPE cos and sin tables, d_h^R/2 each per position (shared by all layers)", "RoPE",
           cfg.qk_rope_head_dim / layout.micro_batch, STAT, ALL, "rep")
    return it.items


def _head_items(cfg: ModelConfig, layout: Layout, prec: Precision, prefix: str, norm: str, input_what: str,
                input_is_new: bool) -> list[ActItem]:
    it = _Items(layout, prec, prefix)
    if input_is_new:
        it.add(f"{norm}.input", input_what, "RMSNorm", cfg.hidden_size, ACT, ALL, "sp")
    it.add(f"{norm}.rstd", "1/RMS per token", "RMSNorm", 1, STAT, NOT_SELECTIVE, "sp")
    it.add(f"{norm}.output", "normalised hidden state (output-head input)", "Linear", cfg.hidden_size, LINEAR_IN, NOT_SELECTIVE, "sp")
    it.add("loss.log_probs", "log-softmax over the vocabulary (cross-entropy)", "cross-entropy", cfg.vocab_size, LOSS, ALL, "tp")
    it.add("loss.targets", "target token ids", "cross-entropy", 1, INDEX, ALL, "rep")
    return it.items


def head_items(cfg: ModelConfig, layout: Layout, prec: Precision) -> list[ActItem]:
    """Final RMSNorm, output head and main cross-entropy (last stage)."""
    return _head_items(cfg, layout, prec, "", "model.norm", "last hidden state h^0", True)


def mtp_items(cfg: ModelConfig, layout: Layout, prec: Precision, k: int, moe: bool,
              shares_embedding: bool = False) -> list[ActItem]:
    """MTP module k (0-based, depth k+1): the two RMSNorms, eh_proj, its layer, head and loss.

    It runs on the ``s - (k+1)`` positions that have a target, so its items are
    scaled by ``(s - k - 1) / s`` per token of the micro-batch. Module 0's
    ``hnorm`` input is the main model's last hidden state (counted by
    :func:`head_items`), module k's that of module k-1 (its ``shared_head.norm``
    input); the ``enorm`` input, the embedding of the shifted tokens, is the
    main embedding output when the same stage holds the embedding
    (``shares_embedding``), a lookup of its own otherwise.
    """
    d = cfg.hidden_size
    p = f"mtp.{k}."
    it = _Items(layout, prec, p)
    if not shares_embedding:
        it.add("embed_tokens.input", "token ids shifted by k+1", "Embedding", 1, INDEX, ALL, "rep")
        it.add("enorm.input", "embedding of the shifted tokens", "RMSNorm", d, ACT, ALL, "sp")
    it.add("enorm.rstd", "1/RMS per token", "RMSNorm", 1, STAT, NOT_SELECTIVE, "sp")
    it.add("hnorm.rstd", "1/RMS per token", "RMSNorm", 1, STAT, NOT_SELECTIVE, "sp")
    it.add("eh_proj.input", "[RMSNorm(Emb); RMSNorm(h)] (eh_proj input)", "Linear", 2 * d, LINEAR_IN, NOT_SELECTIVE, "sp")
    items = it.items + decoder_layer_items(cfg, layout, prec, moe, p + "layer.")
    items += _head_items(cfg, layout, prec, p, "shared_head.norm", f"output h^{k + 1} of the MTP layer", True)
    scale = max(layout.seq_len - k - 1, 0) / layout.seq_len
    return [dataclasses.replace(i, elems=i.elems * scale) for i in items]


def bytes_per_token(items: list[ActItem], policy: str) -> float:
    """Bytes per token of the items the policy keeps."""
    return sum(i.bytes_per_token for i in items if i.kept(policy))
