"""Decoupled rotary position embedding (report 2.1.1) with YaRN context extension.

RoPE rotates only q^R and k^R (d_h^R dims), as interleaved pairs; the rotated pairs come back
de-interleaved, identically for q^R and k^R, so attention is unchanged. YaRN (``rope_scaling``) follows
transformers' ``_compute_yarn_parameters``: blended inverse frequencies, cos/sin and the softmax scale
(:func:`softmax_scale`) scaled by mscale. :func:`extend_context` gives a config its YaRN-extended form
(report 4.3); :func:`dsv3.model.transformer.apply_rope_config` re-points a built model. Details:
docs/model.md.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dsv3.config import ModelConfig
from dsv3.errors import ConfigError

# The released DeepSeek-V3 rope_scaling, apart from the factor and the original length.
YARN_DEFAULTS = {"beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def extend_context(
    config: ModelConfig, factor: float, seq_len: int, original_max_position_embeddings: int | None = None
) -> ModelConfig:
    """The YaRN-extended copy of ``config`` for training at ``seq_len`` tokens.

    Writes ``rope_scaling`` in the official config.json form (``type: yarn``, ``factor``,
    ``original_max_position_embeddings``, ``beta_fast`` 32, ``beta_slow`` 1, ``mscale`` 1,
    ``mscale_all_dim`` 1, as DeepSeek-V3 ships it) and sets ``max_position_embeddings`` to
    ``original * factor`` (V3: 4096 * 40 = 163840). The report's two stages (4K -> 32K ->
    128K) use the same YaRN settings, so extending an already extended model keeps its
    original length and takes the new factor.

    Args:
        config: the model configuration (default or YaRN rope).
        factor: s, the context scale (> 1).
        seq_len: the training length of the extension run; at most ``original * factor``.
        original_max_position_embeddings: the pre-training context; default the config's
            own (``rope_scaling.original_max_position_embeddings`` of a YaRN config, else
            ``max_position_embeddings``).
    """
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not factor > 1:
        raise ConfigError(f"the YaRN rope factor must be a number above 1, got {factor!r}; change --rope-factor.")
    if original_max_position_embeddings is None:
        if config.rope_type == "yarn":
            original_max_position_embeddings = config.rope_scaling.get(
                "original_max_position_embeddings", config.max_position_embeddings
            )
        else:
            original_max_position_embeddings = config.max_position_embeddings
    original = int(original_max_position_embeddings)
    if original < 1:
        raise ConfigError(f"the original context length must be positive, got {original}.")
    extended = int(round(original * factor))
    if seq_len > extended:
        raise ConfigError(
            f"--seq-len {seq_len} is beyond the extended context {original} x {factor:g} = {extended}; "
            "raise --rope-factor or lower --seq-len."
        )
    factor_out = int(factor) if float(factor).is_integer() else float(factor)
    rope_scaling = {"type": "yarn", "factor": factor_out, "original_max_position_embeddings": original, **YARN_DEFAULTS}
    if config.rope_type == "yarn":  # keep a released config's own beta/mscale choices
        for key in YARN_DEFAULTS:
            if key in config.rope_scaling:
                rope_scaling[key] = config.rope_scaling[key]
    return config.replace(rope_scaling=dict(sorted(rope_scaling.items())), max_position_embeddings=extended)


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(config: ModelConfig) -> float:
    """The attention softmax scale: 1/sqrt(d_h + d_h^R), times mscale^2 under YaRN."""
    scale = config.qk_head_dim**-0.5
    if config.rope_type == "yarn":
        mscale_all_dim = config.rope_scaling.get("mscale_all_dim", 0)
        if mscale_all_dim:
            m = yarn_get_mscale(config.rope_scaling["factor"], mscale_all_dim)
            scale = scale * m * m
    return scale


def rope_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [d_h^R / 2] (float32) and the cos/sin amplitude ``attention_factor``."""
    dim = config.qk_rope_head_dim
    base = float(config.rope_theta)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if config.rope_type != "yarn":
        return 1.0 / pos_freqs, 1.0
    rs = config.rope_scaling
    factor = float(rs["factor"])
    original = rs.get("original_max_position_embeddings", config.max_position_embeddings)
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_get_mscale(factor)
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # 1: keep the original frequency, 0: interpolate
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions: ``forward(position_ids [B, T] or [T]) -> (cos, sin)`` each
    [..., T, d_h^R / 2] in float32."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        inv_freq, self.attention_factor = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` [B, T, (H,) d_h^R].

    ``cos``/``sin`` are [B or 1, T, d_h^R/2]; they broadcast over the head dim when
    ``x`` has one. Returns the rotated values de-interleaved: [x1 cos - x2 sin, x2 cos + x1 sin].
    """
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
