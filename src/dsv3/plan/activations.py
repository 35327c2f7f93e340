"""The activations a training step keeps for backward, itemised tensor by tensor.

Each :class:`ActItem` is one storage that stays alive between a layer's forward
and its backward: its name (the Hugging Face module path that keeps it), which
operator keeps it, how many elements it holds per token of the micro-batch on
one device, its format, its bytes per token (FP8 tile scales and padding
included), and which recomputation policies keep it. The table follows dsv3's
implementation (:mod:`dsv3.model`, :mod:`dsv3.fp8`, :mod:`dsv3.memory.recompute`);
``bench/plan_vs_measured.py`` checks it against the bytes a real forward leaves
alive (:func:`dsv3.memory.measure.activation_bytes`).

What the operators keep without recomputation (one storage each; a tensor two
operators keep is listed once):

- RMSNorm keeps its input and the per-token reciprocal RMS ``rstd`` (FP32) and
  recomputes its output in backward;
- Linear keeps its input (the weight is a parameter, not an activation); the
  input of the down-projections (W^DQ, W^DKV/W^KR) is their shared RMSNorm output;
- RoPE keeps its cos/sin tables, not the rotated values (the tables are
  constants): with FP32 activations the stage's one pair of FP32 tables, shared
  by every layer; otherwise each layer's casts of them to the activation format
  (one pair for q^R, one for k^R), and the tables are kept only as an input of
  the recomputed regions;
- the attention core (SDPA) keeps q, k, v, its output and one logsumexp per head
  and token; MLA's values are zero-padded to the key width d_h + d_h^R for the
  fused kernel, so v and the output are that wide, and the o_proj input is a
  separate unpadded copy; ``eager`` attention (not what dsv3 runs; for comparison
  with published analyses) keeps the s x s softmax (FP32) and probabilities;
- SwiGLU ``silu(gate) * up`` keeps only gate and up (and, in the MoE, each token
  copy's routing weight g, applied before the down-projection) and recomputes
  silu in backward; the down-projection keeps SwiGLU's output;
- the router computes in FP32: it keeps an FP32 copy of its input (where the
  activations are not FP32) and of its weight (where that is not FP32), the
  sigmoid scores, the selected expert indices and, where g is normalised
  (``norm_topk_prob``), the selected affinities and their sum; the sequence-wise balance loss keeps the score
  sums and f_i; the MoE keeps the per-expert load it reports (``last_load``);
- the routed experts keep the dispatched token copies (grouped gate/up GEMM
  input), the grouped GEMM offsets, the token index of each copy (dispatch
  ``index_select`` and the combine, which keeps nothing else) and the copy order
  (gathers the routing weights). Load is assumed balanced: every device
  processes K_r x T token copies per T tokens, T K_r / N_r per expert;
- the output-head loss (:func:`dsv3.model.loss.fused_linear_cross_entropy`, the
  main head and each MTP head) keeps dL/dh [N, d] in the activation format and
  dL/dW [V, d] in the head weight's format, computed in forward; no logits.

Recompute policies (:mod:`dsv3.memory.recompute`, report 3.2.3):

- ``none``: everything above;
- ``selective``: attention in two checkpointed regions: (1) RMSNorm and the
  down-projections keep the layer input and the down-projection outputs (the
  un-normalised latents); (2) everything after them keeps only the SDPA output
  and logsumexp. The FFN is one region keeping its GEMM outputs (router logits,
  SwiGLU inputs gate/up, the down-projection outputs, routed and shared) and
  its input; RMSNorm outputs, dispatch copies and SwiGLU outputs are recomputed.
  With ``--fp8`` the FFN is not recomputed (its GEMM and SwiGLU inputs are
  already FP8 copies): it keeps what it keeps under ``none``. MTP's enorm, hnorm
  and eh_proj, the final norms and the heads are not recomputed;
- ``full``: each decoder layer keeps only its input (an MTP module only the
  main model's tensors it reads: h and the embedding) and is re-run in backward;
  the output head, its loss and the final norms are not recomputed.

Items kept only by ``selective`` (the region caches) are listed with that policy.

Parallel splits (per device): ``sp`` tensors are split over TP along the
sequence when sequence parallelism is on (the residual stream, the RMSNorm
inputs and outputs, the router), ``tp`` tensors over TP along heads or width,
``rep`` tensors are whole on every TP rank (the MLA latents c_q, c_kv, which
the replicated down-projections produce, and row-parallel GEMM outputs before
their reduction), and ``expert`` tensors hold K_r * ETP / TP token copies per
token (tokens of a TP group are regrouped into ETP x EP groups), each
``I_e / ETP`` wide.

With ``--fp8`` (the recipe of report 3.3.3, :mod:`dsv3.fp8.linear`; both
``fp8_gemm`` settings cache the same tensors) every Linear in the decoder layers
and MTP modules keeps its own E4M3 copy of its input in 128x1 tiles along
tokens (1 byte per element, one FP32 scale per 128 tokens of a channel, the
token count padded to a multiple of 128), except ``o_proj``, which keeps E5M6
values (1.5 bytes) with one power-of-two FP32 scale per 1x128 tile; SwiGLU keeps
gate and up in E4M3 1x128 tiles (width padded to a multiple of 128, one FP32
scale per tile); the routed experts' grouped GEMMs keep the real rows of an
E4M3 copy tiled along tokens inside each expert's group (scales per 128 rows of
each group). The router, the heads and the norms stay in high precision.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from dsv3.config import ModelConfig
from dsv3.plan.layout import Layout
from dsv3.plan.precision import DTYPE_BYTES, FP8_SCALE_BYTES, FP8_TILE, Precision

ALL = ("none", "selective", "full")
NO_RECOMPUTE = ("none",)
NOT_FULL = ("none", "selective")
SELECTIVE_ONLY = ("selective",)

SPLITS = ("sp", "tp", "rep", "expert")


@dataclass(frozen=True)
class ActItem:
    """One tensor kept for backward.

    Attributes:
        name: where it lives, e.g. ``self_attn.q_a_layernorm.rstd``.
        what: what it is, in the report's words.
        saved_by: the operator whose backward needs it.
        elems: elements per token of the micro-batch, on one device.
        dtype: its format (``bf16``, ``fp32``, ``fp8``, ``e5m6``, ``int64``, ...).
        kept_by: the recompute policies that keep it.
        split: ``sp``, ``tp``, ``rep`` or ``expert`` (see the module docstring).
        bytes_per_token: bytes per token of the micro-batch on one device: ``elems``
            times the format's width, plus FP8 tile scales and padding.
    """

    name: str
    what: str
    saved_by: str
    elems: float
    dtype: str
    kept_by: tuple[str, ...]
    split: str
    bytes_per_token: float

    def kept(self, policy: str) -> bool:
        return policy in self.kept_by

    def scaled(self, factor: float) -> "ActItem":
        """The same item with ``factor`` times the elements and bytes per token."""
        return dataclasses.replace(self, elems=self.elems * factor, bytes_per_token=self.bytes_per_token * factor)

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


def _tiles(n: float) -> int:
    return math.ceil(n / FP8_TILE - 1e-9)


class _Items:
    """Collects the items of one unit (a layer, a head, an MTP module).

    ``tokens`` is the unit's token count per micro-batch (b x s, or b x (s - k) for
    MTP module k) before any split: element counts are per token of it, and
    per-micro-batch constants (tables, weight copies, dL/dW) are divided by it.
    """

    def __init__(
        self, cfg: ModelConfig, layout: Layout, prec: Precision, prefix: str = "", tokens: int | None = None
    ) -> None:
        self.cfg, self.layout, self.prec, self.prefix = cfg, layout, prec, prefix
        self.tokens = layout.tokens_per_microbatch if tokens is None else tokens
        self.items: list[ActItem] = []
        self.fp8 = layout.fp8  # the recipe's structure: each FP8 Linear and SwiGLU keeps its own copies
        self.tiled = prec.fp8_cache == "fp8"  # ... in E4M3 tiles (else plain elements of fp8_cache)

    def rows(self, split: str) -> float:
        """Rows one device holds per token of the unit for a tensor of this split."""
        lay = self.layout
        return {"sp": 1 / lay.sp, "tp": 1.0, "rep": 1.0, "expert": self.cfg.num_experts_per_tok * lay.etp / lay.tp}[
            split
        ]

    def _add(
        self,
        name: str,
        what: str,
        saved_by: str,
        elems: float,
        dtype: str,
        kept_by: tuple[str, ...],
        split: str,
        nbytes: float,
    ) -> None:
        self.items.append(ActItem(self.prefix + name, what, saved_by, elems, dtype, kept_by, split, nbytes))

    def add(
        self, name: str, what: str, saved_by: str, width: float, dtype: str, kept_by: tuple[str, ...], split: str
    ) -> None:
        """A plain tensor of ``width`` elements per row (the width before the TP split for ``tp``)."""
        if split == "tp":
            width = width / self.layout.tp
        elems = self.rows(split) * width
        self._add(name, what, saved_by, elems, dtype, kept_by, split, elems * DTYPE_BYTES[dtype])

    def constant(
        self,
        name: str,
        what: str,
        saved_by: str,
        per_microbatch: float,
        dtype: str,
        kept_by: tuple[str, ...],
        split: str = "rep",
    ) -> None:
        """A tensor of ``per_microbatch`` elements per micro-batch on a device (tables, weight copies)."""
        elems = per_microbatch / self.tokens
        self._add(name, what, saved_by, elems, dtype, kept_by, split, elems * DTYPE_BYTES[dtype])

    def linear_input(
        self, name: str, what: str, saved_by: str, width: float, kept_by: tuple[str, ...], split: str
    ) -> None:
        """A Linear's input: the activation itself, or with ``--fp8`` its E4M3 copy in 128x1 token tiles."""
        if not (self.fp8 and self.tiled):
            fmt = self.prec.fp8_cache if self.fp8 else self.prec.activations
            self.add(name, what, saved_by, width, fmt, kept_by, split)
            return
        if split == "tp":
            width = width / self.layout.tp
        rows = self.rows(split) * self.tokens  # rows of the cached [rows, width] matrix per micro-batch
        padded = _tiles(rows) * FP8_TILE
        nbytes = padded * width * (DTYPE_BYTES["fp8"] + FP8_SCALE_BYTES / FP8_TILE) / self.tokens
        self._add(
            name,
            what + " (E4M3, 128x1 token tiles)",
            saved_by,
            rows * width / self.tokens,
            "fp8",
            kept_by,
            split,
            nbytes,
        )

    def row_tiled(
        self,
        name: str,
        what: str,
        saved_by: str,
        width: float,
        kept_by: tuple[str, ...],
        split: str,
        fmt: str | None = None,
    ) -> None:
        """With ``--fp8``: a tensor cached in 1x128 tiles along its width (``fmt`` ``fp8``: E4M3 padded to
        whole tiles, or ``e5m6``: packed), one FP32 scale per tile; the activation itself otherwise."""
        fmt = fmt or self.prec.fp8_cache
        if not self.fp8 or fmt not in ("fp8", "e5m6"):
            self.add(name, what, saved_by, width, fmt if self.fp8 else self.prec.activations, kept_by, split)
            return
        if split == "tp":
            width = width / self.layout.tp
        rows = self.rows(split)
        tiles = _tiles(width)
        payload = tiles * FP8_TILE * DTYPE_BYTES["fp8"] if fmt == "fp8" else width * DTYPE_BYTES[fmt]
        label = "E4M3, 1x128 tiles" if fmt == "fp8" else "E5M6, 1x128 power-of-two scales"
        self._add(
            name,
            f"{what} ({label})",
            saved_by,
            rows * width,
            fmt,
            kept_by,
            split,
            rows * (payload + tiles * FP8_SCALE_BYTES),
        )

    def expert_input(self, name: str, what: str, saved_by: str, width: float, kept_by: tuple[str, ...]) -> None:
        """A routed-expert grouped GEMM input: the token copies, or with ``--fp8`` the real rows of their E4M3
        copy tiled along tokens inside each local expert's group (FP32 scales per 128 rows of a group)."""
        if not (self.fp8 and self.tiled):
            fmt = self.prec.fp8_cache if self.fp8 else self.prec.activations
            self.add(name, what, saved_by, width, fmt, kept_by, "expert")
            return
        lay = self.layout
        rows = self.rows("expert") * self.tokens
        experts = self.cfg.n_routed_experts // lay.ep
        tiles = experts * _tiles(rows / experts)
        nbytes = (rows * width * DTYPE_BYTES["fp8"] + tiles * width * FP8_SCALE_BYTES) / self.tokens
        self._add(
            name,
            what + " (E4M3, 128x1 token tiles per expert)",
            saved_by,
            rows * width / self.tokens,
            "fp8",
            kept_by,
            "expert",
            nbytes,
        )


def attention_items(
    cfg: ModelConfig, layout: Layout, prec: Precision, prefix: str = "", tokens: int | None = None
) -> list[ActItem]:
    """Kept tensors of one layer's input RMSNorm and Multi-head Latent Attention."""
    d, h = cfg.hidden_size, cfg.num_attention_heads
    qk, dv, dc, dr = cfg.qk_head_dim, cfg.v_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    a, st = prec.activations, prec.stats
    it = _Items(cfg, layout, prec, prefix, tokens)
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
            2 * dr * it.tokens / layout.micro_batch,
            a,
            NO_RECOMPUTE,
        )
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
    return it.items


def ffn_items(
    cfg: ModelConfig, layout: Layout, prec: Precision, moe: bool, prefix: str = "", tokens: int | None = None
) -> list[ActItem]:
    """Kept tensors of one layer's post-attention RMSNorm and its dense MLP or DeepSeekMoE."""
    d = cfg.hidden_size
    a, st, rc = prec.activations, prec.stats, prec.router_compute
    it = _Items(cfg, layout, prec, prefix, tokens)
    # Selective recomputation re-runs the FFN except with FP8 caching (then it is left as under `none`).
    recomputed = NOT_FULL if it.fp8 else NO_RECOMPUTE
    region_cache = () if it.fp8 else SELECTIVE_ONLY  # GEMM outputs the selective region caches
    it.add("post_attention_layernorm.input", "residual stream after attention", "RMSNorm", d, a, NOT_FULL, "sp")
    it.add("post_attention_layernorm.rstd", "1/RMS per token", "RMSNorm", 1, st, recomputed, "sp")
    if not moe:
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
        it.linear_input("mlp.down_proj.input", "SwiGLU output", "Linear", i, recomputed, "tp")
        if region_cache:
            it.add(
                "mlp.down_proj.output",
                "FFN output (GEMM output cached by the selective region)",
                "checkpoint",
                d,
                a,
                region_cache,
                "rep",
            )
        return it.items

    n_r, k, ie = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
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
    if rc != prec.router:  # one cast of the N_r x d router weight per micro-batch
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
    if cfg.n_shared_experts:
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
            it.row_tiled(
                "mlp.shared_experts.swiglu.up", "shared-expert up (SwiGLU input)", "SwiGLU", w, recomputed, "tp"
            )
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
        it.linear_input(
            "mlp.shared_experts.down_proj.input", "shared-expert SwiGLU output", "Linear", w, recomputed, "tp"
        )
        if region_cache:
            it.add(
                "mlp.shared_experts.down_proj.output",
                "shared-expert output (GEMM output cached by the selective region)",
                "checkpoint",
                d,
                a,
                region_cache,
                "rep",
            )
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
    return it.items


def decoder_layer_items(
    cfg: ModelConfig, layout: Layout, prec: Precision, moe: bool, prefix: str = "", tokens: int | None = None
) -> list[ActItem]:
    """All kept tensors of one decoder layer (``tokens``: its tokens per micro-batch, default b x s)."""
    return attention_items(cfg, layout, prec, prefix, tokens) + ffn_items(cfg, layout, prec, moe, prefix, tokens)


def embedding_items(cfg: ModelConfig, layout: Layout, prec: Precision) -> list[ActItem]:
    it = _Items(cfg, layout, prec)
    it.add("model.embed_tokens.input", "token ids", "Embedding", 1, "int64", ALL, "rep")
    return it.items


def rope_items(cfg: ModelConfig, layout: Layout, prec: Precision) -> list[ActItem]:
    """The FP32 RoPE cos/sin tables (d_h^R/2 each per sequence position), kept once per stage: by the RoPE
    products of every layer when the activations are FP32 (otherwise those keep their own casts,
    ``rope_cast``), and as an input of every recomputed region."""
    it = _Items(cfg, layout, prec)
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
    it = _Items(cfg, layout, prec, prefix, tokens)
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
    it = _Items(cfg, layout, prec, p, tokens)
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


def bytes_per_token(items: list[ActItem], policy: str) -> float:
    """Bytes per token of the items the policy keeps."""
    return sum(i.bytes_per_token for i in items if i.kept(policy))
