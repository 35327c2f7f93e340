"""Number formats of the DeepSeek-V3 FP8 recipe (report section 3.3).

* **E4M3** (``torch.float8_e4m3fn``, max 448): every quantised GEMM operand; :func:`cast_e4m3` saturates
  and rounds to nearest even.
* **E5M6** (emulated, max 65024): the cached input of the Linear after attention; :func:`round_e5m6`,
  :func:`pack_e5m6` (12 bits a value).
* **Scaling factors**: ``s = amax / fmt_max`` (FP32) or, in UE8M0, the power of two
  ``2^ceil(log2(amax / fmt_max))``; ``q = cast(x / s)``, ``x ~= q * s``.

Plain elementwise torch: any device, ``meta`` too. Narrative: docs/fp8.md.
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # (1 + 6/8) * 2^8
E5M6_MAX = 65024.0  # (2 - 2^-6) * 2^15
E5M6_MIN_EXP = -14  # exponent of the smallest normal E5M6 value
E5M6_MANTISSA_BITS = 6
E4M3_MIN_EXP = -6
E4M3_MANTISSA_BITS = 3

# Smallest scaling factor: the smallest normal float32 (and one above the smallest UE8M0 value),
# so that an all-zero or denormal tile gets a finite, non-zero scale instead of 0/0.
MIN_SCALE = 2.0**-126


def cast_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Cast to E4M3 with saturation: finite values beyond +-448 become +-448; NaN stays NaN.

    Rounding is to nearest, ties to even (the IEEE default that ``Tensor.to`` implements).
    """
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def e4m3_to_float32(data: torch.Tensor) -> torch.Tensor:
    """Decode E4M3 values to a new float32 tensor, equal to ``data.float()`` (NaN included).

    On CPU torch converts float8 element by element; this decodes through float16 instead, about
    3x faster: an E4M3 byte ``s eeee mmm`` placed as the float16 bits ``s 0eeee mmm0000000`` is the
    same number times 2^-8 (exponent bias 15 instead of 7, subnormals included), and float16 ->
    float32 is a vectorised conversion. The two NaN codes (``x1111111``) are set to NaN.
    Elsewhere (CUDA, other dtypes) it is a float32 copy of ``data``.
    """
    if data.device.type != "cpu" or data.dtype != E4M3:
        return data.to(torch.float32, copy=True)
    i = data.view(torch.uint8).to(torch.int16)
    low = i & 0x7F
    half = (i << 8).bitwise_and_(-32768).bitwise_or_(low << 7)
    half.masked_fill_(low == 0x7F, 0x7E00)  # float16 NaN
    return half.view(torch.float16).float().mul_(256.0)


def round_to_grid(x: torch.Tensor, mantissa_bits: int, min_exp: int, max_value: float) -> torch.Tensor:
    """Round ``x`` to a binary floating-point grid, nearest with ties to even, saturating.

    The grid has ``mantissa_bits`` explicit mantissa bits, normals from ``2^min_exp`` and
    subnormals below (spacing ``2^(min_exp - mantissa_bits)``); magnitudes above ``max_value``
    saturate to it. Computed as ``round(x / q) * q`` with ``q`` the power-of-two spacing at
    ``x``'s binade, which is exact in float32 for any grid narrower than float32 (the division
    and the multiplication by a power of two do not round; ``torch.round`` ties to even).

    Args:
        x: float tensor (computed in float32; float64 input stays float64).
        mantissa_bits: explicit mantissa bits m (3 for E4M3, 6 for E5M6).
        min_exp: exponent of the smallest normal number (-6 for E4M3, -14 for E5M6).
        max_value: largest finite magnitude (448 for E4M3, 65024 for E5M6).

    Returns:
        Tensor of ``x``'s shape (float32, or float64 for float64 input) holding grid values.
    """
    y = x if x.dtype == torch.float64 else x.float()
    _, exp = torch.frexp(y)  # y = mant * 2^exp with |mant| in [0.5, 1): binade exponent is exp - 1
    exp = torch.clamp(exp - 1, min=min_exp)
    quantum = torch.ldexp(torch.ones_like(y), exp - mantissa_bits)
    out = torch.round(y / quantum) * quantum
    return out.clamp(-max_value, max_value)


def round_e5m6(x: torch.Tensor) -> torch.Tensor:
    """Round to the emulated E5M6 grid (nearest, ties to even, saturating at +-65024); float32 out."""
    return round_to_grid(x, E5M6_MANTISSA_BITS, E5M6_MIN_EXP, E5M6_MAX)


def pack_e5m6(x: torch.Tensor) -> torch.Tensor:
    """Store E5M6 grid values in 12 bits each: a uint8 tensor of ``3 * ceil(n / 2)`` bytes.

    ``x`` must already lie on the E5M6 grid (use :func:`round_e5m6`). The 12-bit code is the
    float16 bit pattern shifted right by 4 (the dropped bits are zero on the grid); two codes
    fill three bytes. :func:`unpack_e5m6` inverts it exactly.
    """
    codes = (x.reshape(-1).to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF) >> 4
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    lo, hi = codes[0::2], codes[1::2]
    packed = torch.stack([lo & 0xFF, (lo >> 8) | ((hi & 0xF) << 4), hi >> 4], dim=1)
    return packed.to(torch.uint8).reshape(-1)


def unpack_e5m6(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_e5m6`: the float32 tensor of ``shape`` that was packed."""
    n = 1
    for d in shape:
        n *= int(d)
    b = packed.reshape(-1, 3).to(torch.int32)
    lo = b[:, 0] | ((b[:, 1] & 0xF) << 8)
    hi = (b[:, 1] >> 4) | (b[:, 2] << 4)
    codes = torch.stack([lo, hi], dim=1).reshape(-1)[:n] << 4
    codes = torch.where(codes >= 0x8000, codes - 0x10000, codes)  # back to signed int16 range
    return codes.to(torch.int16).view(torch.float16).float().reshape(shape)


def pow2_ceil(v: torch.Tensor) -> torch.Tensor:
    """``2^ceil(log2(v))`` for positive ``v``, computed exactly from the binary exponent (NaN, inf kept)."""
    mant, exp = torch.frexp(v)  # v = mant * 2^exp, mant in [0.5, 1)
    exp = exp - (mant == 0.5).to(exp.dtype)  # v is itself a power of two: 2^(exp-1)
    return torch.where(torch.isfinite(v), torch.ldexp(torch.ones_like(v), exp), v)


def compute_scale(amax: torch.Tensor, fmt_max: float = E4M3_MAX, pow2: bool = False) -> torch.Tensor:
    """Dequantisation factors ``s`` (float32) from per-tile max-abs values.

    Args:
        amax: max-abs of each tile or block, any shape.
        fmt_max: largest finite value of the target format (448 for E4M3).
        pow2: UE8M0 power-of-two scales ``2^ceil(log2(amax / fmt_max))`` instead of plain
            ``amax / fmt_max``.

    Returns:
        float32 tensor of ``amax``'s shape, every entry >= 2^-126; NaN/inf ``amax`` propagate
        (so a non-finite input shows up as a non-finite output instead of vanishing).
    """
    s = (amax.float() / fmt_max).clamp(min=MIN_SCALE)
    return pow2_ceil(s) if pow2 else s


def scale_to_ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """Encode power-of-two scales 2^k (k in -127..127) as UE8M0 bytes ``k + 127`` (uint8)."""
    _, exp = torch.frexp(scale.float())  # 2^k = 0.5 * 2^(k+1)
    return (exp + 126).clamp(0, 254).to(torch.uint8)


def ue8m0_to_scale(code: torch.Tensor) -> torch.Tensor:
    """Decode UE8M0 bytes (uint8) back to float32 scales ``2^(code - 127)``."""
    return torch.ldexp(torch.ones(code.shape, dtype=torch.float32, device=code.device), code.to(torch.int32) - 127)
