"""Training FLOPs per token.

Per token of a sequence of length s, forward pass: every GEMM weight W (out x in) the token uses costs
2 * out * in (all non-expert matrices, the router, the shared experts and K_r of the N_r routed experts;
Kaplan et al. 2020, C_forward = 2N); attention costs 2 * n_h * (d_h + d_h^R) * c + 2 * n_h * d_v * c per
layer, c = s (``non-causal``, Megatron-LM's MFU formula) or (s + 1) / 2 (``causal``, as FlashAttention
computes it); the output head 2 * V * d; embedding, norms and element-wise ops are not counted. Backward
costs twice the forward (training = 3 x forward). MTP module k adds its eh_proj, its decoder layer and one
more pass through the shared head. Recomputation is reported apart (``hardware`` vs ``model`` FLOPs,
Korthikanti et al. 2022): ``full`` re-runs each layer's forward, ``selective`` the MLA up-projection
GEMMs. Sources and the reasoning are in docs/planner.md ("Module notes: FLOPs").
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv3.config import ModelConfig
from dsv3.plan.params import ModelParams, ParamTensor, count_params


def linear_flops(tensors: list[ParamTensor]) -> float:
    """Forward GEMM FLOPs per token of ``tensors``: 2 x activated matrix weights."""
    return 2.0 * sum(t.numel * t.experts_per_token_fraction for t in tensors if t.is_matmul)


def attention_core_flops(cfg: ModelConfig, seq_len: int, causal: bool) -> float:
    """Forward FLOPs per token of one layer's q.k^T and p.v products."""
    c = (seq_len + 1) / 2 if causal else float(seq_len)
    h = cfg.num_attention_heads
    return 2.0 * h * cfg.qk_head_dim * c + 2.0 * h * cfg.v_head_dim * c


def up_projection_flops(tensors: list[ParamTensor]) -> float:
    """Forward FLOPs per token of the MLA up-projections (what selective recomputation re-runs)."""
    return linear_flops([t for t in tensors if t.component in ("attn.q_b_proj", "attn.kv_b_proj", "attn.q_proj")])


@dataclass(frozen=True)
class ModelFlops:
    """Forward FLOPs per token of each part of the model, for one sequence length and convention."""

    layers: tuple[float, ...]  # decoder layer i (GEMMs + attention core)
    head: float  # output head
    mtp: tuple[float, ...]  # MTP module k (eh_proj + layer + head)
    recompute_selective: tuple[float, ...]  # extra forward FLOPs per layer under selective recompute
    mtp_recompute_selective: tuple[float, ...]

    @property
    def forward(self) -> float:
        """Forward FLOPs per token of the main model."""
        return sum(self.layers) + self.head

    @property
    def forward_mtp(self) -> float:
        return sum(self.mtp)

    def training(self, mtp: bool = True) -> float:
        """Model FLOPs per training token: 3 x forward."""
        return 3.0 * (self.forward + (self.forward_mtp if mtp else 0.0))

    def recompute_extra(self, recompute: str, mtp: bool = True) -> float:
        """FLOPs per token the recompute policy adds to one training step."""
        if recompute == "full":
            return sum(self.layers) + (sum(m - self.head for m in self.mtp) if mtp else 0.0)
        if recompute == "selective":
            return sum(self.recompute_selective) + (sum(self.mtp_recompute_selective) if mtp else 0.0)
        return 0.0


def model_flops(cfg: ModelConfig, seq_len: int, causal: bool = True, params: ModelParams | None = None) -> ModelFlops:
    """Forward FLOPs per token, part by part (see the module docstring for the conventions)."""
    params = params or count_params(cfg)
    attn = attention_core_flops(cfg, seq_len, causal)
    layers = tuple(linear_flops(t) + attn for t in params.layers)
    head = linear_flops(params.head) if not cfg.tie_word_embeddings else 2.0 * cfg.vocab_size * cfg.hidden_size
    mtp = tuple(linear_flops(t) + attn + head for t in params.mtp)
    return ModelFlops(
        layers=layers,
        head=head,
        mtp=mtp,
        recompute_selective=tuple(up_projection_flops(t) for t in params.layers),
        mtp_recompute_selective=tuple(up_projection_flops(t) for t in params.mtp),
    )


def training_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True, mtp: bool = True) -> float:
    """Model FLOPs of one training token (forward + backward), MTP modules included when ``mtp``."""
    return model_flops(cfg, seq_len, causal).training(mtp and cfg.num_nextn_predict_layers > 0)


def flops_summary(
    cfg: ModelConfig, seq_len: int, causal: bool, mtp: bool, recompute: str, params: ModelParams | None = None
) -> dict:
    """The ``flops`` section of ``dsv3 plan --json``: both conventions, with and without MTP."""
    params = params or count_params(cfg)
    use_mtp = mtp and cfg.num_nextn_predict_layers > 0
    by = {}
    for name, c in (("causal", True), ("non_causal", False)):
        mf = model_flops(cfg, seq_len, c, params)
        by[name] = {"with_mtp": mf.training(True), "without_mtp": mf.training(False), "forward": mf.forward}
    chosen = model_flops(cfg, seq_len, causal, params)
    model = chosen.training(use_mtp)
    extra = chosen.recompute_extra(recompute, use_mtp)
    return {
        "convention": "causal" if causal else "non_causal",
        "mtp": use_mtp,
        "training_per_token": model,
        "with_recompute_per_token": model + extra,
        "six_n_activated": 6.0 * (params.activated + (params.mtp_activated if use_mtp else 0)),
        "by_convention": by,
    }
