"""Parameter inventory of a DeepSeek-V3-architecture model, tensor by tensor.

Every parameter and buffer the model allocates is listed with its Hugging Face state-dict name, its shape,
the component it belongs to and how the parallel layouts split it; counts, memory and FLOPs are all
derived from this one list, so they cannot disagree with each other. Symbols (report arXiv 2412.19437,
section 2.1): d, V, n_h, d_h, d_h^R, d_v, d_c, d_c', I (dense FFN), I_e (expert), N_s / N_r shared /
routed experts, K_r experts per token. No biases anywhere; MTP module k shares the main embedding and
output head, which are not counted again. The per-layer table of shapes is in docs/planner.md ("Module
notes: the parameter inventory").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from dsv3.config import ModelConfig
from dsv3.errors import ConfigError, clip
from dsv3.layout import TP_CONVENTIONS

#: How a tensor is split by the model-parallel dimensions (see :mod:`dsv3.plan.layout`).
#:   ``rep``    replicated on every TP rank (MLA down-projections, norms, router, biases)
#:   ``tp``     split n-ways over TP (column/row parallel: MLA up-projections, W^O, dense MLP, shared experts)
#:   ``vocab``  split over TP along the vocabulary, padded to a multiple of TP (embedding, output head)
#:   ``expert`` routed experts: N_r / EP experts per rank, each split over ETP
SHARDS = ("rep", "tp", "vocab", "expert")

# How tensor parallelism splits the MLA and MoE blocks (``--tp-convention``, :data:`dsv3.layout.TP_CONVENTIONS`):
#   ``megatron``  as Megatron-Core and dsv3 split them: the whole query up-projection
#                 q_b_proj (W^UQ and W^QR) and the shared experts over TP; ZeRO shards the
#                 routed experts over EDP and everything else over DP.
#   ``zhang-su``  the accounting of Zhang & Su, "Memory Analysis on the Training Course of
#                 DeepSeek Models" (arXiv 2502.07846, sections 3-4): the decoupled-RoPE query
#                 rows W^QR (n_h d_h^R of q_b_proj's rows) and the shared experts replicated
#                 on every TP rank, and the whole MoE block (router, shared and routed experts)
#                 sharded by ZeRO over EDP. W^KR, the down-projections, norms and router are
#                 replicated under both conventions.

#: Components of the MoE block (``zhang-su`` puts all of them in the expert ZeRO group).
MOE_COMPONENTS = ("router", "shared_experts", "routed_experts")

#: Component names, in report order.
COMPONENTS = (
    "embedding",
    "attn.q_a_proj",
    "attn.q_b_proj",
    "attn.q_proj",
    "attn.kv_a_proj_with_mqa",
    "attn.kv_b_proj",
    "attn.o_proj",
    "dense_mlp",
    "router",
    "shared_experts",
    "routed_experts",
    "norms",
    "output_head",
    "mtp.eh_proj",
    "rotary",
)


@dataclass(frozen=True)
class ParamTensor:
    """One parameter (or buffer) of the model.

    Attributes:
        name: Hugging Face state-dict key, e.g. ``model.layers.3.self_attn.q_b_proj.weight``.
        component: one of :data:`COMPONENTS`.
        shape: the full (unsharded) shape.
        shard: one of :data:`SHARDS`.
        kind: ``weight`` (stored in ``Precision.weights``), ``router`` (``Precision.router``),
            ``buffer`` (FP32, not trained: the routing bias b_i, kept FP32 whatever the model
            format) or ``wbuffer`` (not trained, in the weight format: the RoPE frequencies).
        experts_per_token_fraction: the fraction of this tensor one token uses
            (K_r / N_r for routed experts, 1 otherwise).
        rope_rows: rows of a query projection that compute the decoupled RoPE
            queries q^R (W^QR: n_h d_h^R rows); the ``zhang-su`` convention keeps
            them whole on every TP rank.
    """

    name: str
    component: str
    shape: tuple[int, ...]
    shard: str = "rep"
    kind: str = "weight"
    experts_per_token_fraction: float = 1.0
    rope_rows: int = 0

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def trainable(self) -> bool:
        return self.kind not in ("buffer", "wbuffer")

    @property
    def is_expert(self) -> bool:
        """Routed-expert tensors are sharded over EP and their ZeRO group is EDP, not DP."""
        return self.shard == "expert"

    def pieces(self, convention: str = "megatron") -> list[tuple[str, bool, int]]:
        """``(shard, zero_over_edp, elements)`` parts of the tensor under a TP convention (:data:`TP_CONVENTIONS`).

        ``zero_over_edp``: ZeRO shards the part over EDP (the replicas of an expert
        shard) instead of DP. A vocabulary-split tensor is one part of ``numel`` elements.
        """
        if convention == "megatron":
            return [(self.shard, self.is_expert, self.numel)]
        if convention != "zhang-su":
            raise ConfigError(f"unknown --tp-convention {clip(convention)}; choose one of {', '.join(TP_CONVENTIONS)}")
        edp = self.component in MOE_COMPONENTS
        if self.component == "shared_experts":
            return [("rep", edp, self.numel)]
        if self.rope_rows and self.shard == "tp":
            rope = self.rope_rows * (self.numel // self.shape[0])
            return [("tp", edp, self.numel - rope), ("rep", edp, rope)]
        return [(self.shard, edp, self.numel)]

    @property
    def is_matmul(self) -> bool:
        """Whether the tensor is a GEMM weight (counts towards FLOPs): matrices except the embedding table."""
        return self.trainable and len(self.shape) >= 2 and self.component != "embedding"


def _norm(name: str, dim: int) -> ParamTensor:
    return ParamTensor(name, "norms", (dim,))


def attention_tensors(cfg: ModelConfig, prefix: str) -> list[ParamTensor]:
    """The Multi-head Latent Attention tensors (section 2.1.1) of one layer."""
    h, qk, v = cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim
    d, dc = cfg.hidden_size, cfg.kv_lora_rank
    rope = h * cfg.qk_rope_head_dim  # the W^QR rows of the query projection
    p = f"{prefix}.self_attn"
    out: list[ParamTensor] = []
    if cfg.q_lora_rank:
        out.append(ParamTensor(f"{p}.q_a_proj.weight", "attn.q_a_proj", (cfg.q_lora_rank, d)))
        out.append(_norm(f"{p}.q_a_layernorm.weight", cfg.q_lora_rank))
        out.append(
            ParamTensor(f"{p}.q_b_proj.weight", "attn.q_b_proj", (h * qk, cfg.q_lora_rank), "tp", rope_rows=rope)
        )
    else:
        out.append(ParamTensor(f"{p}.q_proj.weight", "attn.q_proj", (h * qk, d), "tp", rope_rows=rope))
    out.append(ParamTensor(f"{p}.kv_a_proj_with_mqa.weight", "attn.kv_a_proj_with_mqa", (dc + cfg.qk_rope_head_dim, d)))
    out.append(_norm(f"{p}.kv_a_layernorm.weight", dc))
    out.append(ParamTensor(f"{p}.kv_b_proj.weight", "attn.kv_b_proj", (h * (cfg.qk_nope_head_dim + v), dc), "tp"))
    out.append(ParamTensor(f"{p}.o_proj.weight", "attn.o_proj", (d, h * v), "tp"))
    return out


def mlp_tensors(cfg: ModelConfig, prefix: str, moe: bool) -> list[ParamTensor]:
    """The feed-forward tensors of one layer: a dense SwiGLU MLP or DeepSeekMoE (section 2.1.2)."""
    d = cfg.hidden_size
    p = f"{prefix}.mlp"
    if not moe:
        i = cfg.intermediate_size
        return [
            ParamTensor(f"{p}.gate_proj.weight", "dense_mlp", (i, d), "tp"),
            ParamTensor(f"{p}.up_proj.weight", "dense_mlp", (i, d), "tp"),
            ParamTensor(f"{p}.down_proj.weight", "dense_mlp", (d, i), "tp"),
        ]
    n_r, ie = cfg.n_routed_experts, cfg.moe_intermediate_size
    frac = cfg.num_experts_per_tok / n_r
    out = [ParamTensor(f"{p}.gate.weight", "router", (n_r, d), "rep", "router")]
    if has_routing_bias(cfg):
        out.append(ParamTensor(f"{p}.gate.e_score_correction_bias", "router", (n_r,), "rep", "buffer"))
    out.append(ParamTensor(f"{p}.experts.gate_up_proj", "routed_experts", (n_r, 2 * ie, d), "expert", "weight", frac))
    out.append(ParamTensor(f"{p}.experts.down_proj", "routed_experts", (n_r, d, ie), "expert", "weight", frac))
    if cfg.n_shared_experts:
        w = cfg.n_shared_experts * ie
        out += [
            ParamTensor(f"{p}.shared_experts.gate_proj.weight", "shared_experts", (w, d), "tp"),
            ParamTensor(f"{p}.shared_experts.up_proj.weight", "shared_experts", (w, d), "tp"),
            ParamTensor(f"{p}.shared_experts.down_proj.weight", "shared_experts", (d, w), "tp"),
        ]
    return out


def has_routing_bias(cfg: ModelConfig) -> bool:
    """Whether MoE layers carry the auxiliary-loss-free bias b_i (a buffer; ``noaux_tc`` routing)."""
    return cfg.n_routed_experts > 0 and cfg.topk_method == "noaux_tc"


def decoder_layer_tensors(cfg: ModelConfig, prefix: str, moe: bool) -> list[ParamTensor]:
    """All tensors of one decoder layer (attention + feed-forward + its two RMSNorms)."""
    d = cfg.hidden_size
    return (
        [_norm(f"{prefix}.input_layernorm.weight", d)]
        + attention_tensors(cfg, prefix)
        + [_norm(f"{prefix}.post_attention_layernorm.weight", d)]
        + mlp_tensors(cfg, prefix, moe)
    )


def rotary_tensors(cfg: ModelConfig) -> list[ParamTensor]:
    """The RoPE inverse frequencies d_h^R/2 (an FP32 buffer every stage with layers holds)."""
    return [ParamTensor("model.rotary_emb.inv_freq", "rotary", (cfg.qk_rope_head_dim // 2,), "rep", "wbuffer")]


def embedding_tensors(cfg: ModelConfig) -> list[ParamTensor]:
    return [ParamTensor("model.embed_tokens.weight", "embedding", (cfg.vocab_size, cfg.hidden_size), "vocab")]


def head_tensors(cfg: ModelConfig) -> list[ParamTensor]:
    """The final RMSNorm and the output head (untied; a tied head adds no parameters)."""
    out = [_norm("model.norm.weight", cfg.hidden_size)]
    if not cfg.tie_word_embeddings:
        out.append(ParamTensor("lm_head.weight", "output_head", (cfg.vocab_size, cfg.hidden_size), "vocab"))
    return out


def mtp_layer_is_moe(cfg: ModelConfig, k: int) -> bool:
    """MTP module k continues the layer numbering (the DeepSeek-V3 MTP layer is layer 61, a MoE layer)."""
    return cfg.is_moe_layer(cfg.num_hidden_layers + k)


def mtp_tensors(cfg: ModelConfig, k: int) -> list[ParamTensor]:
    """MTP module k (0-based): enorm, hnorm, eh_proj, a decoder layer, shared_head.norm."""
    d = cfg.hidden_size
    p = f"mtp.{k}"
    return (
        [_norm(f"{p}.enorm.weight", d), _norm(f"{p}.hnorm.weight", d)]
        + [ParamTensor(f"{p}.eh_proj.weight", "mtp.eh_proj", (d, 2 * d), "tp")]
        + decoder_layer_tensors(cfg, f"{p}.layer", mtp_layer_is_moe(cfg, k))
        + [_norm(f"{p}.shared_head.norm.weight", d)]
    )


def _sum(tensors: list[ParamTensor], *, trainable: bool = True) -> int:
    return sum(t.numel for t in tensors if t.trainable == trainable)


def _activated(tensors: list[ParamTensor]) -> float:
    return sum(t.numel * t.experts_per_token_fraction for t in tensors if t.trainable)


@dataclass
class ModelParams:
    """The parameter inventory of a model configuration.

    ``layers[i]`` lists main-model layer i's tensors, ``mtp[k]`` MTP module k's.
    """

    cfg: ModelConfig
    embedding: list[ParamTensor] = field(init=False)
    layers: list[list[ParamTensor]] = field(init=False)
    head: list[ParamTensor] = field(init=False)
    mtp: list[list[ParamTensor]] = field(init=False)
    rotary: list[ParamTensor] = field(init=False)

    def __post_init__(self) -> None:
        cfg = self.cfg
        self.embedding = embedding_tensors(cfg)
        self.layers = [
            decoder_layer_tensors(cfg, f"model.layers.{i}", cfg.is_moe_layer(i)) for i in range(cfg.num_hidden_layers)
        ]
        self.head = head_tensors(cfg)
        self.mtp = [mtp_tensors(cfg, k) for k in range(cfg.num_nextn_predict_layers)]
        self.rotary = rotary_tensors(cfg)

    @cached_property
    def main_tensors(self) -> list[ParamTensor]:
        """Every tensor of the main model: parameters and buffers (routing biases, RoPE frequencies)."""
        return self.embedding + [t for layer in self.layers for t in layer] + self.head + self.rotary

    @cached_property
    def mtp_tensors(self) -> list[ParamTensor]:
        return [t for module in self.mtp for t in module]

    @property
    def groups(self) -> dict[str, dict]:
        """:meth:`groups_for` the ``megatron`` convention."""
        return self.groups_for("megatron")

    def groups_for(self, convention: str) -> dict[str, dict]:
        """Aggregated tensor groups (:func:`aggregate`) of each unit under a TP convention (cached):
        ``embedding``, ``head``, ``mtp``, ``mtp_modules``, ``layers``, ``rotary``."""
        cache = self.__dict__.setdefault("_groups", {})
        if convention not in cache:

            def agg(tensors: list[ParamTensor]) -> dict[GroupKey, int]:
                return aggregate(tensors, convention)

            cache[convention] = {
                "embedding": agg(self.embedding),
                "head": agg(self.head),
                "mtp": agg(self.mtp_tensors),
                "mtp_modules": [agg(m) for m in self.mtp],
                "layers": [agg(layer) for layer in self.layers],
                "rotary": agg(self.rotary),
            }
        return cache[convention]

    # ------------------------------------------------------------- counts
    @cached_property
    def total(self) -> int:
        """Trainable main-model parameters (no MTP, no routing-bias buffers): 671,026,404,352 for DeepSeek-V3."""
        return _sum(self.main_tensors)

    @cached_property
    def routing_bias(self) -> int:
        """Elements of the routing-bias buffers b_i of the main model (58 x 256 for DeepSeek-V3)."""
        return sum(t.numel for t in self.main_tensors if t.kind == "buffer" and t.component == "router")

    @cached_property
    def total_with_bias(self) -> int:
        """Main-model parameters plus the routing-bias buffers (the 671,026,419,200 of the checkpoint)."""
        return self.total + self.routing_bias

    @cached_property
    def mtp_total(self) -> int:
        """Trainable parameters of the MTP modules (the shared embedding and head not counted again)."""
        return _sum(self.mtp_tensors)

    @cached_property
    def mtp_routing_bias(self) -> int:
        return sum(t.numel for t in self.mtp_tensors if t.kind == "buffer" and t.component == "router")

    @cached_property
    def activated(self) -> int:
        """Parameters one token uses in the main model: all but the N_r - K_r routed experts it skips."""
        return round(_activated(self.main_tensors))

    @cached_property
    def mtp_activated(self) -> int:
        return round(_activated(self.mtp_tensors))

    def components(self, tensors: list[ParamTensor] | None = None) -> dict[str, int]:
        """Trainable parameters per component (components with no parameters are left out)."""
        tensors = self.main_tensors if tensors is None else tensors
        out = {c: 0 for c in COMPONENTS}
        for t in tensors:
            if t.trainable:
                out[t.component] += t.numel
        return {c: n for c, n in out.items() if n}

    def layer_total(self, i: int) -> int:
        return _sum(self.layers[i])

    def to_dict(self) -> dict:
        """The ``params`` section of ``dsv3 plan --json``."""
        return {
            "total": self.total,
            "activated": self.activated,
            "routing_bias": self.routing_bias,
            "total_with_routing_bias": self.total_with_bias,
            "mtp": self.mtp_total,
            "mtp_activated": self.mtp_activated,
            "mtp_routing_bias": self.mtp_routing_bias,
            "total_with_mtp": self.total + self.mtp_total,
            "activated_with_mtp": self.activated + self.mtp_activated,
            "components": self.components(),
            "mtp_components": self.components(self.mtp_tensors),
            "per_layer": [self.layer_total(i) for i in range(len(self.layers))],
        }


def count_params(cfg: ModelConfig) -> ModelParams:
    """The parameter inventory of ``cfg`` (see :class:`ModelParams`)."""
    return ModelParams(cfg)


#: Key of an aggregated tensor group: (shard, kind, rows, cols, zero_over_edp) where
#: rows/cols are the shape of a vocabulary-split tensor (its padding depends on the TP
#: size) and 0 otherwise, and zero_over_edp says that ZeRO shards the group over EDP
#: (routed experts; the whole MoE block under ``zhang-su``) instead of DP.
GroupKey = tuple[str, str, int, int, bool]


def aggregate(tensors: list[ParamTensor], convention: str = "megatron") -> dict[GroupKey, int]:
    """Sum the elements of ``tensors`` per (shard, kind, ZeRO group) under a TP convention
    (:meth:`ParamTensor.pieces`); vocabulary-split tensors keep their shape.

    The value is the element count, except for vocabulary-split keys where it is
    the number of such tensors (each padded separately).
    """
    out: dict[GroupKey, int] = {}
    for t in tensors:
        for shard, edp, n in t.pieces(convention):
            if shard == "vocab":
                key = (shard, t.kind, t.shape[0], t.numel // t.shape[0], edp)
                out[key] = out.get(key, 0) + 1
            else:
                key = (shard, t.kind, 0, 0, edp)
                out[key] = out.get(key, 0) + n
    return out


def merge_groups(groups: list[dict[GroupKey, int]]) -> dict[GroupKey, int]:
    out: dict[GroupKey, int] = {}
    for g in groups:
        for k, v in g.items():
            out[k] = out.get(k, 0) + v
    return out
