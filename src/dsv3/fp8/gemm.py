"""FP8 GEMMs on fine-grained-quantised operands, and a model of tensor-core accumulation.

Every GEMM is "NT", ``out[M, N] = A[M, K] @ B[N, K]^T``, both operands quantised along K: Fprop
x [M, D_in] (1x128) @ W [D_out, D_in] (128x128); Dgrad dy @ W^T (the same blocks); Wgrad dy^T @ x^T
(1x128 tiles along tokens). Backends (:func:`resolve_backend`): ``emulated`` (dequantise, FP32 multiply:
the numerical reference, any device) and ``cuda`` (``scaled_mm`` blockwise scaling, SM90).
:func:`mm_limited_accumulation` models Hopper's limited accumulation precision for the error study
(``bench/fp8_accumulation.py``), not for training. Narrative: docs/fp8.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.errors import ConfigError
from dsv3.fp8.quant import ACT_TILE, TILE, WEIGHT_BLOCK, QTensor, ceil_div
from dsv3.layout import FP8_BACKENDS
from dsv3.model.ops import grouped_mm as model_grouped_mm
from dsv3.model.ops import grouped_mm_wgrad

# --- Backend selection -----------------------------------------------------------------------


def _cuda_version() -> tuple[int, int]:
    version = torch.version.cuda or "0.0"
    major, minor = (version.split(".") + ["0"])[:2]
    return int(major), int(minor)


def cuda_fp8_available(device: torch.device | str) -> bool:
    """True where real block-scaled FP8 GEMMs can run: a Hopper (SM90) GPU, CUDA >= 12.9."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or not hasattr(F, "scaled_mm"):
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major == 9 and _cuda_version() >= (12, 9)


def resolve_backend(name: str, device: torch.device | str) -> str:
    """Turn a backend request (``auto``, ``emulated``, ``cuda``) into the backend that runs."""
    if name not in FP8_BACKENDS:
        raise ConfigError(f"unknown FP8 backend {name!r}; choose one of {', '.join(FP8_BACKENDS)}.")
    if name == "auto":
        return "cuda" if cuda_fp8_available(device) else "emulated"
    if name == "cuda" and not cuda_fp8_available(device):
        raise ConfigError(
            f"the FP8 'cuda' backend needs a Hopper (SM90) GPU with CUDA >= 12.9 but the tensors are on "
            f"{torch.device(device)}; use backend 'auto' or 'emulated'."
        )
    return name


# --- Dense GEMM ----------------------------------------------------------------------------


def _check_nt(a: QTensor, b: QTensor) -> None:
    if a.block != ACT_TILE or b.block not in (ACT_TILE, WEIGHT_BLOCK):
        raise ValueError(
            f"FP8 GEMM takes A in 1x128 tiles and B in 1x128 tiles or 128x128 blocks, got {a.block} x {b.block}"
        )
    if a.cols != b.cols:
        raise ValueError(f"FP8 GEMM contraction dims differ: A {a.shape} vs B {b.shape}")


def _mm_emulated(a: QTensor, b: QTensor, out_dtype: torch.dtype) -> torch.Tensor:
    return (a.dequantize() @ b.dequantize().t()).to(out_dtype)


def _pad_rows_fp8(data: torch.Tensor, rows: int) -> torch.Tensor:
    """Append zero rows to an FP8 matrix (through a uint8 view: padding kernels lack FP8)."""
    if rows == 0:
        return data
    pad = torch.zeros(rows, data.shape[1], dtype=torch.uint8, device=data.device)
    return torch.cat([data.view(torch.uint8), pad]).view(data.dtype)


def _with_strides(t: torch.Tensor, strides: tuple[int, int]) -> torch.Tensor:
    """A copy of ``t`` with exactly the given strides (``contiguous()`` may keep others for size-1 dims)."""
    out = torch.empty_strided(t.shape, strides, dtype=torch.float32, device=t.device)
    return out.copy_(t)


def scaled_mm_operands(a: QTensor, b: QTensor) -> dict:
    """Arguments of ``torch.nn.functional.scaled_mm`` computing ``a @ b^T`` (plus ``n``, the rows of B to keep).

    The layouts cuBLAS's block scaling wants (checked by PyTorch's meta kernel, so this is
    testable on CPU with ``meta`` tensors):

    * ``mat_a`` [M, K_p] row-major; ``mat_b`` [K_p, N_p] column-major (``B.data.t()``), N_p % 16 == 0.
    * 1x128 scales [rows, K_p/128] with strides (1, rows) ("outer-dim-major").
    * 128x128 scales of B [L4, N_p/128] with strides (1, L4), where L4 = round_up(K_p/128, 4)
      (the K-block dim padded to a multiple of 4; the pad is 1.0 and never read).
    """
    from torch.nn.functional import ScalingType

    _check_nt(a, b)
    mat_a = a.data.contiguous()
    scale_a = _with_strides(a.scale, (1, a.scale.shape[0]))
    if b.block == WEIGHT_BLOCK:
        mat_b = b.data.contiguous()
        kb = b.scale.shape[1]
        sb = F.pad(b.scale.float(), (0, -kb % 4), value=1.0).t()  # [L4, N_p/128]
        scale_b, recipe_b = _with_strides(sb, (1, sb.shape[0])), ScalingType.BlockWise128x128
    else:
        pad = -b.data.shape[0] % 16
        mat_b = _pad_rows_fp8(b.data.contiguous(), pad)
        sb = F.pad(b.scale.float(), (0, 0, 0, pad), value=1.0)
        scale_b, recipe_b = _with_strides(sb, (1, sb.shape[0])), ScalingType.BlockWise1x128
    return {
        "mat_a": mat_a,
        "mat_b": mat_b.t(),
        "scale_a": scale_a,
        "scale_recipe_a": ScalingType.BlockWise1x128,
        "scale_b": scale_b,
        "scale_recipe_b": recipe_b,
        "n": b.rows,
    }


def _mm_cuda(a: QTensor, b: QTensor, out_dtype: torch.dtype) -> torch.Tensor:
    args = scaled_mm_operands(a, b)
    n = args.pop("n")
    out_kind = torch.float32 if out_dtype == torch.float32 else torch.bfloat16
    out = F.scaled_mm(**args, output_dtype=out_kind)
    return out[:, :n].to(out_dtype)


def fp8_mm(a: QTensor, b: QTensor, out_dtype: torch.dtype = torch.float32, backend: str = "auto") -> torch.Tensor:
    """``a @ b^T`` of two quantised matrices (see the module docstring for the layouts).

    Args:
        a: [M, K], 1x128 tiles along K.
        b: [N, K], 1x128 tiles along K or 128x128 blocks.
        out_dtype: dtype of the result (the GEMM accumulates in FP32 either way).
        backend: ``auto``, ``emulated`` or ``cuda``.

    Returns:
        [M, N] tensor of ``out_dtype``.
    """
    if resolve_backend(backend, a.data.device) == "cuda":
        return _mm_cuda(a, b, out_dtype)
    _check_nt(a, b)
    return _mm_emulated(a, b, out_dtype)


# --- Grouped GEMMs (routed experts) --------------------------------------------------------


def _expert(b: QTensor, e: int) -> QTensor:
    return QTensor(b.data[e], b.scale[e], tuple(b.shape[1:]), b.block)


def _token_rows(q: QTensor, start: int, end: int) -> QTensor:
    """Rows ``start:end`` (multiples of 128) of a tensor in 128x1 token tiles."""
    return QTensor(q.data[start:end], q.scale[start // TILE : end // TILE], (end - start, q.cols), q.block)


def grouped_mm(
    a: QTensor, b: QTensor, offs: list[int], out_dtype: torch.dtype = torch.float32, backend: str = "auto"
) -> torch.Tensor:
    """Grouped ``out[offs[e-1]:offs[e]] = a[offs[e-1]:offs[e]] @ b[e]^T`` (Fprop and Dgrad of experts).

    Args:
        a: [N, K] rows sorted by group, 1x128 tiles along K (a tile never spans two rows, so
            the grouping needs nothing special).
        b: [E, O, K] per-group matrices, 128x128 blocks per group (or 1x128 tiles).
        offs: E cumulative row ends (``offs[-1] == N``), host ints.
        out_dtype: dtype of the result.
        backend: ``auto``, ``emulated`` or ``cuda``.

    Returns:
        [N, O] tensor of ``out_dtype``.
    """
    if resolve_backend(backend, a.data.device) == "emulated":  # dequantise once, the model's grouped GEMM in FP32
        offs_t = torch.tensor(offs, dtype=torch.int32, device=a.data.device)
        return model_grouped_mm(a.dequantize(), b.dequantize(), offs_t).to(out_dtype)
    out = torch.empty(a.rows, b.shape[-2], dtype=out_dtype, device=a.data.device)
    start = 0
    for e, end in enumerate(offs):
        if end > start:
            ae = QTensor(a.data[start:end], a.scale[start:end], (end - start, a.cols), a.block)
            out[start:end] = _mm_cuda(ae, _expert(b, e), out_dtype)
        start = end
    return out


def grouped_wgrad(
    dy_tok: QTensor,
    x_tok: QTensor,
    padded_offs: list[int],
    out_dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-group weight gradients ``dW[e] = dy_e^T @ x_e`` from token-tiled operands.

    Args:
        dy_tok: [N_p, O] output gradients in 128x1 token tiles, groups starting on tile
            boundaries (:func:`dsv3.fp8.quant.quantize_tokens_grouped`).
        x_tok: [N_p, K] inputs, same layout.
        padded_offs: E cumulative padded row ends (multiples of 128).
        out_dtype: dtype of the result.
        backend: ``auto``, ``emulated`` or ``cuda``.

    Returns:
        [E, O, K] tensor of ``out_dtype``; a group without rows gets zeros.
    """
    if resolve_backend(backend, dy_tok.data.device) == "emulated":  # dequantise once, the model's grouped Wgrad
        offs_t = torch.tensor(padded_offs, dtype=torch.int32, device=dy_tok.data.device)
        return grouped_mm_wgrad(dy_tok.dequantize(), x_tok.dequantize(), offs_t).to(out_dtype)
    out = torch.zeros(len(padded_offs), dy_tok.cols, x_tok.cols, dtype=out_dtype, device=dy_tok.data.device)
    start = 0
    for e, end in enumerate(padded_offs):
        if end > start:
            out[e] = _mm_cuda(_token_rows(dy_tok, start, end).t(), _token_rows(x_tok, start, end).t(), out_dtype)
        start = end
    return out


# --- Limited-precision accumulation model (error study) ------------------------------------

ROUNDINGS = ("truncate", "nearest")


def round_significand(v: torch.Tensor, bits: int, rounding: str = "truncate") -> torch.Tensor:
    """Keep ``bits`` significant bits of ``v`` (leading bit included), toward zero or to nearest even."""
    mant, exp = torch.frexp(v)  # |mant| in [0.5, 1): mant * 2^bits has `bits` integer bits
    sig = torch.ldexp(mant, torch.full_like(exp, bits))
    sig = torch.trunc(sig) if rounding == "truncate" else torch.round(sig)
    return torch.ldexp(sig, exp - bits)


def _tensor_core_add(acc: torch.Tensor, products: torch.Tensor, bits: int, rounding: str) -> torch.Tensor:
    """One accumulation step: ``acc`` [...] plus a group of ``products`` [..., g].

    The g + 1 terms are aligned to the largest exponent among them, the bits shifted out
    beyond ``bits`` significant bits of that exponent are dropped, the aligned terms are added
    exactly, and the sum is normalised to ``bits`` significant bits.
    """
    top = torch.maximum(acc.abs(), products.abs().amax(dim=-1))
    _, exp = torch.frexp(top)
    quantum = torch.ldexp(torch.ones_like(top), exp - bits)
    cut = torch.trunc if rounding == "truncate" else torch.round
    aligned = cut(acc / quantum) + cut(products / quantum.unsqueeze(-1)).sum(dim=-1)
    return round_significand(aligned * quantum, bits, rounding)


def mm_limited_accumulation(
    a: QTensor,
    b: QTensor,
    mantissa_bits: int = 14,
    promote_interval: int | None = TILE,
    group: int = 4,
    rounding: str = "truncate",
) -> torch.Tensor:
    """A slow, faithful model of an FP8 GEMM ``a @ b^T`` on tensor cores with limited accumulation.

    Model (after the tensor-core studies of Fasi et al., 2021, applied to the report's "around
    14 bits" on H800): the products of the dequantised operands are exact (float64). The tensor
    core adds them ``group`` at a time into an accumulator that keeps ``mantissa_bits`` bits
    after the leading one: each step aligns the accumulator and the ``group`` new products to
    the largest exponent among them, drops the bits shifted out beyond that precision
    (``truncate``, i.e. toward zero, as an alignment shifter does, or ``nearest``), adds exactly
    and normalises the sum to the same precision. After every ``promote_interval`` = N_C elements of K the
    partial sum is promoted: added to an FP32 accumulator on the CUDA cores (one float32
    rounding per addition) and the tensor-core accumulator restarts from zero. With
    ``promote_interval=None`` the whole K accumulates on the tensor core, as an FP8 GEMM without
    promotion does.

    Args:
        a: [M, K] quantised, 1x128 tiles along K.
        b: [N, K] quantised, 1x128 tiles or 128x128 blocks.
        mantissa_bits: mantissa bits (after the leading one) the accumulator keeps; ~14 on H800.
        promote_interval: N_C (a multiple of ``group``), or None for no promotion.
        group: products added per accumulation step.
        rounding: ``truncate`` or ``nearest``.

    Returns:
        [M, N] float64 result (float32-valued when promotion is on).
    """
    _check_nt(a, b)
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    k = a.cols
    nc = ceil_div(k, group) * group if promote_interval is None else int(promote_interval)
    if nc % group:
        raise ValueError(f"promote_interval {nc} must be a multiple of group {group}")
    chunks = ceil_div(k, nc)
    x = F.pad(a.dequantize(torch.float64), (0, chunks * nc - k))
    y = F.pad(b.dequantize(torch.float64), (0, chunks * nc - k))
    prod = (x[:, None, :] * y[None, :, :]).reshape(x.shape[0], y.shape[0], chunks, nc // group, group)
    partial = torch.zeros(prod.shape[:3], dtype=torch.float64, device=x.device)
    for i in range(nc // group):
        partial = _tensor_core_add(partial, prod[..., i, :], mantissa_bits + 1, rounding)
    if promote_interval is None:
        return partial[..., 0]
    total = torch.zeros(prod.shape[:2], dtype=torch.float32, device=x.device)
    for c in range(chunks):
        total = total + partial[..., c].float()
    return total.double()
