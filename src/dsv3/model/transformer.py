"""The DeepSeek-V3 causal language model: embedding, N blocks, final norm, output head, MTP modules.

Module names mirror the Hugging Face checkpoint (``model.embed_tokens``,
``model.layers.{i}``, ``model.norm``, ``lm_head``) so that state-dict keys map
one to one; MTP module k is ``mtp.{k-1}`` here and ``model.layers.{L+k-1}`` in the
checkpoint (see :mod:`dsv3.model.hf`).

Training objective (report 2.2, 2.1.2):
``loss = L_Main + lambda/D * sum_k L^k_MTP + sum_layers L_Bal``; lambda (``mtp_loss_weight``) and
alpha (``seq_aux_alpha``, the factor of L_Bal) are arguments of :meth:`DeepseekV3ForCausalLM.forward`
and gamma one of :meth:`~DeepseekV3ForCausalLM.update_router_bias`: the trainer owns them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from dsv3.config import RECIPE_DEFAULTS, ModelConfig
from dsv3.model.block import DecoderLayer
from dsv3.model.hf import load_state_into, read_pretrained, save_pretrained
from dsv3.model.loss import IGNORE_INDEX, fused_linear_cross_entropy
from dsv3.model.mla import MLA, LatentKVCache, document_mask
from dsv3.model.moe import Experts, MoE, Router, RoutingStats
from dsv3.model.mtp import MTPLayer
from dsv3.model.norm import RMSNorm
from dsv3.model.rope import RotaryEmbedding, rope_frequencies, softmax_scale
from dsv3.utils.meta import materialize


@dataclass
class CausalLMOutput:
    """What :meth:`DeepseekV3ForCausalLM.forward` returns.

    Attributes:
        logits: [B, T, V] next-token logits of the main model.
        loss: total training loss (main + MTP + balance), when labels are given.
        lm_loss: L_Main, the main next-token cross-entropy.
        mtp_loss: lambda/D * sum_k L^k (zero without MTP modules).
        balance_loss: sum of the sequence-wise balance losses of all MoE layers.
        expert_load: [n_moe_layers, N_r] tokens routed to each expert in this forward
            (main-model MoE layers first, then those of the MTP modules).
        hidden_states: [B, T, d] the last block's output before the final norm (h^0).
    """

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None
    expert_load: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None


def init_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from ``(seed, name)`` (a stable hash: the same on every process)."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _normal_(t: torch.Tensor, std: float, seed: int, name: str) -> None:
    """Fill ``t`` with Normal(0, std) drawn (in FP32, on the CPU) from ``init_generator(seed, name)``."""
    if t.is_meta:
        return
    t.copy_(torch.empty(t.shape, dtype=torch.float32).normal_(0.0, std, generator=init_generator(seed, name)))


def _linear_like(module: nn.Module) -> bool:
    """A drop-in for ``nn.Linear`` that holds its ``weight`` Parameter (e.g. an FP8 Linear, which a model
    converted on the meta device initialises only after conversion)."""
    return hasattr(module, "in_features") and isinstance(getattr(module, "weight", None), nn.Parameter)


class DeepseekV3Model(nn.Module):
    """The trunk: ``embed_tokens`` [V, d], ``layers`` (L blocks), ``norm``, rotary tables."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class DeepseekV3ForCausalLM(nn.Module):
    """DeepSeek-V3 (and V2-style) causal LM with Multi-Token Prediction.

    Args:
        config: a validated :class:`~dsv3.config.ModelConfig`.
    Build on ``torch.device("meta")`` to count parameters without allocating.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DeepseekV3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.mtp = nn.ModuleList(MTPLayer(config, k) for k in range(1, config.num_nextn_predict_layers + 1))
        self.reset_parameters()

    # ----------------------------------------------------------------- set-up
    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range) for projections, embeddings, router and experts; ones for norms.

        Every parameter draws from its own generator seeded from ``(seed, its global name)``,
        and each routed expert from ``(seed, name, global expert index)``, so a process that
        builds only some layers or only its block of experts (expert parallelism) gets exactly
        the values one process building the whole model would get. ``seed`` defaults to a
        number drawn from torch's global generator (so ``torch.manual_seed`` still decides
        the model); it is kept as ``init_seed``.
        """
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), device="cpu"))
        self.init_seed = int(seed)
        std = self.config.initializer_range
        for name, module in self.named_modules():
            prefix = f"{name}." if name else ""
            if isinstance(module, (nn.Linear, nn.Embedding)) or _linear_like(module):
                _normal_(module.weight, std, seed, prefix + "weight")
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, Router):
                _normal_(module.weight, std, seed, prefix + "weight")
                if module.e_score_correction_bias is not None:
                    module.e_score_correction_bias.zero_()
            elif isinstance(module, Experts):
                for i in range(module.gate_up_proj.shape[0]):
                    e = module.expert_offset + i
                    _normal_(module.gate_up_proj[i], std, seed, f"{prefix}gate_up_proj.{e}")
                    _normal_(module.down_proj[i], std, seed, f"{prefix}down_proj.{e}")
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def moe_layers(self) -> list[MoE]:
        """The MoE modules in ``expert_load`` order: main-model layers, then MTP modules."""
        blocks = list(self.model.layers) + list(self.mtp)
        return [b.mlp for b in blocks if isinstance(b.mlp, MoE)]

    def moe_rows(self) -> dict[int, int]:
        """The row of each MoE layer (by ``layer_idx``) in ``expert_load``: the configuration's MoE layers in order,
        main model then MTP modules, including those a pipeline device does not hold (removed layers)."""
        ids = [i for i in range(self.config.num_hidden_layers + len(self.mtp)) if self.config.is_moe_layer(i)]
        return {idx: row for row, idx in enumerate(ids)}

    def num_parameters(self, *, include_mtp: bool = True, include_buffers: bool = False) -> int:
        """Parameter count (shared tensors counted once), optionally with the routing biases."""
        seen: set[int] = set()
        total = 0
        for name, p in self.named_parameters(remove_duplicate=True):
            if not include_mtp and name.startswith("mtp."):
                continue
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        if include_buffers:
            for name, b in self.named_buffers():
                if name.endswith("e_score_correction_bias") and (include_mtp or not name.startswith("mtp.")):
                    total += b.numel()
        return total

    @classmethod
    def from_pretrained(
        cls,
        path,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        strict: bool = True,
    ) -> "DeepseekV3ForCausalLM":
        """Load a Hugging Face DeepSeek-V3/V2 checkpoint directory (config.json + safetensors; FP8 weights are
        dequantised to ``dtype``). :func:`dsv3.from_pretrained` also takes a dsv3 run directory."""
        config, files = read_pretrained(path)
        model = empty_model(config, device=device, dtype=dtype)
        load_state_into(model, path, strict=strict, files=files)
        return model

    def save_pretrained(self, path, **kwargs) -> None:
        """Write a Hugging Face checkpoint directory (see :func:`dsv3.model.hf.save_pretrained`)."""
        save_pretrained(self, path, **kwargs)

    def drop_mtp(self) -> None:
        """Remove the MTP modules (inference without speculative decoding)."""
        self.mtp = nn.ModuleList()

    @torch.no_grad()
    def update_router_bias(self, load: torch.Tensor, gamma: float) -> None:
        """Apply the auxiliary-loss-free bias update once per optimizer step.

        Args:
            load: [n_moe_layers, N_r] tokens per expert summed over the step's micro-batches
                (the sum of their ``expert_load`` outputs; rows as :meth:`moe_rows`).
            gamma: the bias update speed of this step (the trainer's).
        """
        rows = self.moe_rows()
        for moe in self.moe_layers():  # a pipeline device updates the layers it holds
            moe.update_bias(load[rows[moe.layer_idx]], gamma)

    def new_cache(self, batch_size: int, max_len: int, *, dtype: torch.dtype | None = None) -> LatentKVCache:
        """An empty latent KV cache for the main-model layers."""
        weight = self.model.embed_tokens.weight
        return LatentKVCache(
            self.config.num_hidden_layers,
            batch_size,
            max_len,
            self.config.kv_lora_rank,
            self.config.qk_rope_head_dim,
            dtype=dtype or weight.dtype,
            device=weight.device,
        )

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        cache: LatentKVCache | None = None,
        start_pos: int = 0,
        return_logits: bool | None = None,
        segment_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        mtp_loss_weight: float = RECIPE_DEFAULTS["mtp_loss_weight"],
        seq_aux_alpha: float = RECIPE_DEFAULTS["seq_aux_alpha"],
    ) -> CausalLMOutput:
        """Run the model.

        Args:
            input_ids: [B, T] token ids t_1..t_T.
            labels: [B, T] next tokens t_2..t_{T+1} (already shifted; ``-100`` is ignored).
                When given, the loss (with MTP and balance terms) is computed.
            cache: a :class:`LatentKVCache` for incremental decoding (absorbed MLA path).
            start_pos: position of ``input_ids[:, 0]`` in the cached sequence.
            return_logits: whether ``logits`` is filled in. Default: always without labels; with
                labels the losses come from :func:`~dsv3.model.loss.fused_linear_cross_entropy`,
                which never materialises the [B, T, V] logits for backward, and ``logits`` is None.
            segment_ids: [B, T] document ids of packed sequences (:mod:`dsv3.train.sft`): attention
                never crosses documents (:func:`~dsv3.model.mla.document_mask`) and MTP targets
                from another document are ignored. None: one causal sequence per row, no extra cost.
            position_ids: [B, T] RoPE positions (packed documents restart at 0); default
                ``start_pos .. start_pos + T - 1``.
            mtp_loss_weight: lambda, the MTP loss weight (the trainer passes its step's value).
            seq_aux_alpha: alpha, the sequence-wise balance factor (training mode only; 0: no L_Bal).
        """
        bsz, seqlen = input_ids.shape
        emb = self.model.embed_tokens(input_ids)
        if position_ids is None:
            positions = torch.arange(start_pos, start_pos + seqlen, device=input_ids.device)
            cos, sin = self.model.rotary_emb(positions)
            cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)  # [1, T, d_h^R/2]
        else:
            cos, sin = self.model.rotary_emb(position_ids)  # [B, T, d_h^R/2]
        attn_mask = document_mask(segment_ids) if segment_ids is not None else None
        stats = RoutingStats(seq_aux_alpha)
        h = emb
        for layer in self.model.layers:
            h = layer(h, cos, sin, cache, start_pos, attn_mask=attn_mask, stats=stats)
        h_norm = self.model.norm(h)
        if return_logits is None:
            return_logits = labels is None
        out = CausalLMOutput(logits=self.lm_head(h_norm) if return_logits else None, hidden_states=h)
        if labels is None:
            return out

        lm_loss = self._head_loss(h_norm, labels)
        mtp_loss = self._mtp_loss(h, emb, labels, cos, sin, segment_ids, stats, mtp_loss_weight=mtp_loss_weight)
        balance_loss, out.expert_load = self.collect_stats(stats, lm_loss)
        out.lm_loss, out.mtp_loss, out.balance_loss = lm_loss, mtp_loss, balance_loss
        out.loss = lm_loss + mtp_loss + balance_loss
        return out

    def collect_stats(self, stats: RoutingStats, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The summed balance loss (a scalar with gradient) and ``expert_load`` [n_moe_layers, N_r].

        Layers that recorded nothing (an MTP module skipped on a too-short sequence) get zero loads.
        """
        balance = [stats.balance[k] for k in sorted(stats.balance)]
        balance_loss = torch.stack(balance).sum() if balance else like.new_zeros(())
        moes = self.moe_layers()
        if not moes:
            return balance_loss, None
        load = torch.stack(
            [
                stats.load[m.layer_idx]
                if m.layer_idx in stats.load
                else torch.zeros(m.n_experts, dtype=torch.long, device=like.device)
                for m in moes
            ]
        )
        return balance_loss, load

    def _mtp_loss(
        self,
        h: torch.Tensor,
        emb: torch.Tensor,
        labels: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        segment_ids: torch.Tensor | None = None,
        stats: RoutingStats | None = None,
        *,
        mtp_loss_weight: float,
    ) -> torch.Tensor:
        """lambda/D * sum_k L^k (lambda = ``mtp_loss_weight``): depth k at position i predicts
        t_{i+k+1} = labels[:, i+k-1].

        With ``segment_ids`` a target from another document than position i is ignored.
        """
        depth = len(self.mtp)
        seqlen = h.shape[1]
        if depth == 0 or seqlen <= depth:
            return h.new_zeros((), dtype=torch.float32)
        losses = []
        h_prev = h
        for k, layer in enumerate(self.mtp, start=1):
            n = seqlen - k
            target, mask = labels[:, k:], None
            if segment_ids is not None:
                mask = document_mask(segment_ids[:, :n])
                target = target.masked_fill(segment_ids[:, :n] != segment_ids[:, k:], IGNORE_INDEX)
            h_prev = layer(h_prev[:, :n], emb[:, k:], cos[:, :n], sin[:, :n], attn_mask=mask, stats=stats)
            losses.append(self._head_loss(layer.shared_head.norm(h_prev), target))
        return mtp_loss_weight / depth * torch.stack(losses).sum()

    def _head_loss(self, h_norm: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of the shared output head on ``h_norm`` [B, T', d]."""
        return fused_linear_cross_entropy(h_norm.reshape(-1, h_norm.shape[-1]), self.lm_head.weight, labels.reshape(-1))


def empty_model(config: ModelConfig, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The model of ``config`` built on the meta device and given uninitialised storage once, for a load
    that overwrites every parameter and persistent buffer; the non-persistent buffers (rotary tables),
    which no checkpoint holds, are rebuilt from the config."""
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config)
    materialize(model, device)  # (nn.Module.to_empty would untie a tied head from the embedding)
    model.to(dtype)
    with torch.no_grad():
        fresh = type(model.model.rotary_emb)(config)
        model.model.rotary_emb.inv_freq.copy_(fresh.inv_freq)
    return model


@torch.no_grad()
def apply_rope_config(model: nn.Module, config: ModelConfig) -> nn.Module:
    """Point ``model`` at ``config``'s rope settings: rebuild every :class:`RotaryEmbedding`'s
    inverse frequencies and amplitude and every MLA's softmax scale (YaRN's mscale^2).

    Needed when a model was built (or loaded) under one configuration and continues under
    another, e.g. ``--init-from`` a checkpoint with ``--rope-scaling yarn``. Returns ``model``.
    """
    if hasattr(model, "config"):
        model.config = config
    inv_freq, attention_factor = rope_frequencies(config)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.inv_freq = inv_freq.to(device=module.inv_freq.device)
            module.attention_factor = attention_factor
        elif isinstance(module, MLA):
            module.softmax_scale = softmax_scale(config)
    return model
