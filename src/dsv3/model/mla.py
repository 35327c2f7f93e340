"""Multi-head Latent Attention (report 2.1.1).

    c^Q   = RMSNorm(W^DQ h)                   q_a_proj, q_a_layernorm      [T, d_c']
    q^C   = W^UQ c^Q,  q^R = RoPE(W^QR c^Q)   q_b_proj (both, fused)       [T, n_h, d_h + d_h^R]
    c^KV  = RMSNorm(W^DKV h)                  kv_a_proj_with_mqa[:d_c]     [T, d_c]
    k^R   = RoPE(W^KR h)                      kv_a_proj_with_mqa[d_c:]     [T, d_h^R] (shared by heads)
    k^C, v = W^UK c^KV, W^UV c^KV             kv_b_proj                    [T, n_h, d_h], [T, n_h, d_v]
    o     = softmax([q^C; q^R] [k^C; k^R]^T * scale) v ;  u = W^O o        o_proj

Training runs fused attention over the expanded keys/values (packed documents get the block-diagonal
:func:`document_mask`); decoding caches only c^KV and k^R and absorbs W^UK and W^UV
(:class:`LatentKVCache`). Symbols and details: docs/model.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model.norm import RMSNorm
from dsv3.model.rope import apply_rope, softmax_scale


def document_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """The block-diagonal causal attention mask of packed documents.

    Args:
        segment_ids: [B, T] integer id of the document each token belongs to (any ids;
            tokens with equal ids in one row form one document, which must be contiguous).
    Returns:
        [B, 1, T, T] bool, True where query i may attend key j: ``j <= i`` and
        ``segment_ids[b, j] == segment_ids[b, i]`` (the form ``scaled_dot_product_attention``
        takes; broadcast over the n_h heads).
    """
    if segment_ids.dim() != 2:
        raise ValueError(f"segment_ids must be [B, T], got shape {tuple(segment_ids.shape)}")
    seqlen = segment_ids.shape[1]
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1)  # [B, T, T]
    return (same & causal).unsqueeze(1)


class LatentKVCache:
    """The MLA inference cache: per layer, the normalised KV latent c^KV and the rotated k^R.

    Args:
        num_layers: layers that use the cache.
        batch_size: B.
        max_len: the longest sequence (prompt + generated) it can hold.
        kv_lora_rank: d_c; rope_dim: d_h^R.
    Holds ``c_kv[l]`` [B, max_len, d_c] and ``k_pe[l]`` [B, max_len, d_h^R]:
    ``(d_c + d_h^R) * max_len * B`` values per layer, versus ``2 * n_h * d_h * max_len * B``
    for a standard multi-head KV cache.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        max_len: int,
        kv_lora_rank: int,
        rope_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.c_kv = [
            torch.zeros(batch_size, max_len, kv_lora_rank, dtype=dtype, device=device) for _ in range(num_layers)
        ]
        self.k_pe = [torch.zeros(batch_size, max_len, rope_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.lengths = [0] * num_layers  # valid positions per layer: 0 .. lengths[l]-1
        self.pad: torch.Tensor | None = None  # [B] leading padding slots per row (batched prompts)

    def update(self, layer: int, start: int, c_kv: torch.Tensor, k_pe: torch.Tensor):
        """Write positions ``start:start+T`` and return the cache up to there ([B, S, .]).

        Writing at ``start`` makes the entries past ``start+T`` stale (they belonged to another
        continuation), so the layer's valid length becomes ``start+T``. ``start`` may not leave a gap.
        """
        end = start + c_kv.shape[1]
        if end > self.max_len:
            raise ValueError(f"the latent KV cache holds {self.max_len} positions, {end} were asked for")
        if start > self.lengths[layer]:
            raise ValueError(
                f"layer {layer} of the latent KV cache holds {self.lengths[layer]} positions; "
                f"writing at {start} would leave a gap"
            )
        self.c_kv[layer][:, start:end] = c_kv
        self.k_pe[layer][:, start:end] = k_pe
        self.lengths[layer] = end
        return self.c_kv[layer][:, :end], self.k_pe[layer][:, :end]

    def rollback(self, length: int, layers=None) -> None:
        """Forget every position ``>= length`` of ``layers`` (default: all): rejected speculative tokens.

        The forgotten entries are zeroed, and the next :meth:`update` continues at ``length``.
        """
        for layer in range(len(self.lengths)) if layers is None else layers:
            if self.lengths[layer] > length:
                self.c_kv[layer][:, length : self.lengths[layer]] = 0
                self.k_pe[layer][:, length : self.lengths[layer]] = 0
                self.lengths[layer] = length

    def set_padding(self, pad: torch.Tensor) -> None:
        """Mark the first ``pad[b]`` slots of row b as left padding ([B] ints): a real token never
        attends to them. With RoPE only query-key position differences enter attention, so a row
        shifted right by its padding attends exactly as it would alone."""
        self.pad = pad.to(device=self.c_kv[0].device if self.c_kv else "cpu", dtype=torch.long)

    def padding_mask(self, start: int, seqlen: int, total: int) -> torch.Tensor | None:
        """[B, 1, T, S] True where query slot ``start+t`` may not see key slot ``s`` because the key is
        padding and the query is not (padding queries see their padding: finite, never used). None
        without padding."""
        if self.pad is None:
            return None
        pad = self.pad[:, None, None, None]
        q_slot = torch.arange(start, start + seqlen, device=pad.device)[None, None, :, None]
        k_slot = torch.arange(total, device=pad.device)[None, None, None, :]
        return (k_slot < pad) & (q_slot >= pad)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.c_kv + self.k_pe)


class MLA(nn.Module):
    """Multi-head Latent Attention of one layer.

    Args:
        config: the model configuration.
        layer_idx: index of this layer's slot in a :class:`LatentKVCache`.
    """

    def __init__(self, config: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_head_dim = config.qk_head_dim
        self.v_head_dim = config.v_head_dim
        d, h = config.hidden_size, self.n_heads
        bias = config.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, self.q_lora_rank, bias=bias)  # W^DQ
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, h * self.qk_head_dim, bias=False)  # W^UQ, W^QR
        self.kv_a_proj_with_mqa = nn.Linear(d, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)  # W^DKV, W^KR
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, h * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * self.v_head_dim, d, bias=bias)  # W^O
        self.softmax_scale = softmax_scale(config)

    # The two halves of the attention, exposed separately for recomputation policies.
    def compress(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The down-projections: W^DQ x (or the full query without q compression) [B, T, d_c' or n_h(d_h+d_h^R)]
        and [W^DKV; W^KR] x [B, T, d_c + d_h^R], before their RMSNorms."""
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_a_proj(x)
        return q, self.kv_a_proj_with_mqa(x)

    def attend(
        self,
        q_latent: torch.Tensor,
        kv_latent: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LatentKVCache | None = None,
        start_pos: int = 0,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Everything after the down-projections: latent norms, up-projections, RoPE, attention, W^O.

        ``attn_mask`` ([B, 1, T, T] bool from :func:`document_mask`, training path only)
        replaces the plain causal mask.
        """
        bsz, seqlen, _ = kv_latent.shape
        q = q_latent if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(q_latent))
        q = q.view(bsz, seqlen, self.n_heads, self.qk_head_dim)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)
        c_kv, k_pe = kv_latent.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        k_pe = apply_rope(k_pe, cos, sin)
        if cache is not None:
            out = self._absorbed_attention(q_nope, q_pe, c_kv, k_pe, cache, start_pos)
        else:
            out = self._expanded_attention(q_nope, q_pe, c_kv, k_pe, attn_mask)
        return self.o_proj(out.reshape(bsz, seqlen, self.n_heads * self.v_head_dim))

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LatentKVCache | None = None,
        start_pos: int = 0,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of ``x`` [B, T, d] at positions ``start_pos .. start_pos+T-1``; returns [B, T, d].

        ``cos``/``sin`` [B or 1, T, d_h^R/2] are the rotary tables of those positions.
        ``attn_mask`` [B, 1, T, T] bool (:func:`document_mask`) limits attention to each
        token's own document (training path; None: plain causal attention).
        """
        return self.attend(*self.compress(x), cos, sin, cache, start_pos, attn_mask)

    def _expanded_attention(self, q_nope, q_pe, c_kv, k_pe, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Training path: up-project keys/values and run fused causal attention (or, with ``attn_mask``
        [B, 1, T, T] bool, attention under that block-diagonal causal mask). Returns [B, T, n_h, d_v]."""
        bsz, seqlen, h, _ = q_nope.shape
        kv = self.kv_b_proj(c_kv).view(bsz, seqlen, h, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        k = torch.cat((k_nope, k_pe.unsqueeze(2).expand(-1, -1, h, -1)), dim=-1)
        pad = self.qk_head_dim - self.v_head_dim
        if pad > 0:  # fused kernels need equal key and value widths
            v = F.pad(v, (0, pad))
        if attn_mask is None:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=self.softmax_scale
            )
        else:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask, scale=self.softmax_scale
            )
        out = out.transpose(1, 2)
        return out[..., : self.v_head_dim] if pad > 0 else out

    def _absorbed_attention(self, q_nope, q_pe, c_kv, k_pe, cache: LatentKVCache, start_pos: int) -> torch.Tensor:
        """Decoding path over the latent cache with W^UK, W^UV absorbed. Returns [B, T, n_h, d_v]."""
        seqlen = q_nope.shape[1]
        c_all, k_pe_all = cache.update(self.layer_idx, start_pos, c_kv, k_pe)  # [B, S, d_c], [B, S, d_h^R]
        w = self.kv_b_proj.weight.view(self.n_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim :]
        q_latent = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)  # W^UK absorbed into the query
        scores = torch.einsum("bthc,bsc->bhts", q_latent, c_all) + torch.einsum("bthr,bsr->bhts", q_pe, k_pe_all)
        scores = scores.float() * self.softmax_scale
        total = c_all.shape[1]
        if seqlen > 1:
            q_pos = torch.arange(start_pos, start_pos + seqlen, device=scores.device)
            k_pos = torch.arange(total, device=scores.device)
            scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
        padding = cache.padding_mask(start_pos, seqlen, total)
        if padding is not None:
            scores = scores.masked_fill(padding, float("-inf"))
        probs = scores.softmax(dim=-1).to(c_all.dtype)
        o_latent = torch.einsum("bhts,bsc->bthc", probs, c_all)
        return torch.einsum("bthc,hdc->bthd", o_latent, w_uv)  # W^UV absorbed into the output
