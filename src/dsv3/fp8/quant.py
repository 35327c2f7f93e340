"""Fine-grained FP8 quantisation: 1x128 tiles and 128x128 blocks (report section 3.3.2).

A 2-D tensor ``x`` [R, C] is cut into blocks ``(b_r, b_c)``, each with one scale from its max-abs and its
elements in E4M3: ``(1, 128)`` activations and their gradients (scales [R, ceil(C/128)]), ``(128, 1)`` the
token-dim copies for Wgrad ([ceil(R/128), C]), ``(128, 128)`` weights. Shapes that are not multiples of the
block are zero-padded (:class:`QTensor` keeps the logical shape); leading batch dims are carried through.
Wgrad's token-dim copies are quantised from high precision, never from FP8. Narrative: docs/fp8.md.
"""

from __future__ import annotations

import dataclasses

import torch

from dsv3.fp8.formats import E4M3, E4M3_MAX, compute_scale, e4m3_to_float32

TILE = 128  # N_C of the report: tile/block edge and FP32 promotion interval

ACT_TILE = (1, TILE)
TOKEN_TILE = (TILE, 1)
WEIGHT_BLOCK = (TILE, TILE)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass
class QTensor:
    """A fine-grained-quantised tensor: ``x[..., i, j] ~= data[..., i, j] * scale[..., i // b_r, j // b_c]``.

    Attributes:
        data: E4M3 values [..., R_p, C_p], R_p and C_p padded up to multiples of ``block``.
        scale: float32 dequantisation factors [..., R_p / b_r, C_p / b_c].
        shape: logical (unpadded) shape of the quantised tensor, leading dims included.
        block: (b_r, b_c), one of (1, 128), (128, 1), (128, 128).
    """

    data: torch.Tensor
    scale: torch.Tensor
    shape: tuple[int, ...]
    block: tuple[int, int]

    @property
    def rows(self) -> int:
        return self.shape[-2]

    @property
    def cols(self) -> int:
        return self.shape[-1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The high-precision tensor of the logical shape: ``data * scale`` per block."""
        *lead, rp, cp = self.data.shape
        br, bc = self.block
        q = e4m3_to_float32(self.data).reshape(*lead, rp // br, br, cp // bc, bc)
        x = q.mul_(self.scale.unsqueeze(-1).unsqueeze(-3)).reshape(*lead, rp, cp)
        return x[..., : self.rows, : self.cols].to(dtype)

    def t(self) -> QTensor:
        """The transpose of the last two dims (a view of ``data`` and ``scale``; no requantisation)."""
        shape = (*self.shape[:-2], self.shape[-1], self.shape[-2])
        return QTensor(self.data.transpose(-1, -2), self.scale.transpose(-1, -2), shape, self.block[::-1])

    def nbytes(self) -> int:
        """Bytes held by ``data`` and ``scale``."""
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()


def pad_to_block(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Zero-pad the last two dims of ``x`` up to multiples of ``block`` (no copy if already whole)."""
    r, c = x.shape[-2:]
    pr, pc = -r % block[0], -c % block[1]
    if pr or pc:
        x = torch.nn.functional.pad(x, (0, pc, 0, pr))
    return x


def block_amax(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Max-abs of each block of a padded tensor [..., R_p, C_p] -> [..., R_p / b_r, C_p / b_c]."""
    *lead, rp, cp = x.shape
    br, bc = block
    blocks = x.reshape(*lead, rp // br, br, cp // bc, bc)
    # max(amax, -amin): two reductions without an |x| temporary (NaN propagates through both)
    return torch.maximum(blocks.amax(dim=(-3, -1)), -blocks.amin(dim=(-3, -1)))


def quantize(
    x: torch.Tensor,
    block: tuple[int, int] = ACT_TILE,
    pow2: bool = False,
) -> QTensor:
    """Quantise the last two dims of ``x`` to E4M3 with one scale per ``block``.

    Args:
        x: [..., R, C] float tensor (any float dtype; computed in float32).
        block: (1, 128), (128, 1) or (128, 128); see the module docstring.
        pow2: power-of-two (UE8M0) scales instead of plain FP32 ``amax / 448``.

    Returns:
        :class:`QTensor` with ``shape == tuple(x.shape)``.
    """
    if x.dim() < 2:
        raise ValueError(f"quantize needs a tensor with at least 2 dims, got shape {tuple(x.shape)}")
    xp = pad_to_block(x.float(), block)
    scale = compute_scale(block_amax(xp, block), E4M3_MAX, pow2)
    *lead, rp, cp = xp.shape
    br, bc = block
    scaled = xp.reshape(*lead, rp // br, br, cp // bc, bc) / scale.unsqueeze(-1).unsqueeze(-3)
    data = scaled.clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3).reshape(*lead, rp, cp)  # cast_e4m3, in place
    return QTensor(data, scale, tuple(x.shape), tuple(block))


def quantize_act(x: torch.Tensor, pow2: bool = False) -> QTensor:
    """1x128 tiles of an activation [M, K]: one scale per token per 128 channels."""
    return quantize(x, ACT_TILE, pow2)


def quantize_tokens(x: torch.Tensor, pow2: bool = False) -> QTensor:
    """128x1 tiles of an activation [M, K]: one scale per channel per 128 tokens (Wgrad's copy).

    ``quantize_tokens(x).t()`` is the 1x128-tiled transpose x^T [K, M] that Wgrad contracts
    over tokens with; it is quantised from the high-precision ``x``.
    """
    return quantize(x, TOKEN_TILE, pow2)


def quantize_weight(w: torch.Tensor, pow2: bool = False) -> QTensor:
    """128x128 blocks of a weight [..., N, K] (leading dims, e.g. experts, kept)."""
    return quantize(w, WEIGHT_BLOCK, pow2)


# --- Token tiles inside groups (the routed experts' Wgrad) ---------------------------------


def group_padding(offs: list[int], tile: int = TILE) -> tuple[torch.Tensor, list[int]]:
    """Row placement that starts every group on a tile boundary.

    Args:
        offs: cumulative row ends of the groups (``offs[-1]`` = number of rows N).
        tile: tile length along rows.

    Returns:
        (rows, padded_offs): ``rows`` [N] int64, the padded row of each input row;
        ``padded_offs`` the cumulative row ends of the groups after padding (multiples of ``tile``).
    """
    rows, padded_offs = [], []
    start, pstart = 0, 0
    for end in offs:
        n = end - start
        rows.append(torch.arange(pstart, pstart + n))
        pstart += ceil_div(n, tile) * tile
        padded_offs.append(pstart)
        start = end
    index = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
    return index, padded_offs


def quantize_tokens_grouped(x: torch.Tensor, rows: torch.Tensor, padded_rows: int, pow2: bool = False) -> QTensor:
    """128x1 token tiles of ``x`` [N, K] that never straddle two groups.

    The rows are placed at ``rows`` (from :func:`group_padding`) in a zero buffer of
    ``padded_rows`` rows, so each group starts on a tile boundary, then quantised with
    ``block=(128, 1)``. The result's logical shape is ``(padded_rows, K)``.
    """
    buf = x.new_zeros(padded_rows, x.shape[1], dtype=torch.float32)
    buf.index_copy_(0, rows.to(x.device), x.float())
    return quantize(buf, TOKEN_TILE, pow2)
