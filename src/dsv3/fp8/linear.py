"""FP8 Linear, grouped expert GEMM and SwiGLU with FP8 activation caching (report 3.3).

Each is an autograd Function whose three GEMMs (Fprop ``y = x W^T``, Dgrad ``dx = dy W``, Wgrad
``dW = dy^T x``) run on FP8 operands: x and dy in 1x128 tiles, W in 128x128 blocks, Wgrad's operands in
128x1 tiles along tokens. :class:`FP8Linear` holds the very Parameter of the Linear it replaces; dW is
accumulated in FP32. Only the 128x1 copy of x is cached for backward (~1.03 bytes an element); the input of
``self_attn.o_proj`` is cached in E5M6 with power-of-two scales; the SwiGLU caches its two inputs in FP8
and recomputes its output. Why these choices: docs/fp8.md.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsv3.fp8.formats import pack_e5m6, round_e5m6, unpack_e5m6
from dsv3.fp8.gemm import fp8_mm, grouped_mm, grouped_wgrad, resolve_backend
from dsv3.fp8.quant import (
    ACT_TILE,
    TOKEN_TILE,
    WEIGHT_BLOCK,
    QTensor,
    group_padding,
    quantize,
    quantize_tokens_grouped,
)
from dsv3.fp8.recipe import FP8Recipe
from dsv3.model.ops import grouped_mm as model_grouped_mm
from dsv3.model.ops import grouped_mm_dgrad, grouped_mm_wgrad, swiglu_backward

INPUT_CACHES = ("e4m3", "e5m6")


# --- Linear --------------------------------------------------------------------------------


class _FP8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, recipe: FP8Recipe, input_cache: str, save_input: bool):
        backend = resolve_backend(recipe.backend, x.device)
        x2 = x.reshape(-1, x.shape[-1])
        e5m6 = input_cache == "e5m6"
        if recipe.fp8_gemm or e5m6:
            xq = quantize(x2, ACT_TILE, pow2=recipe.pow2 or e5m6)
        if recipe.fp8_gemm:
            y = fp8_mm(xq, quantize(weight, WEIGHT_BLOCK, pow2=recipe.pow2), x.dtype, backend)
        else:  # storage only: the exact GEMM in the activations' precision
            y = x2 @ weight.to(x2.dtype).t()
        if bias is not None:
            y = y + bias.to(y.dtype)
        cached: tuple[torch.Tensor, ...] = ()
        if save_input and e5m6:
            # Scaled values on the E5M6 grid, 12 bits each, with the Fprop tile's power-of-two scales.
            scaled = xq.scale.repeat_interleave(128, dim=1)[:, : x2.shape[1]]
            cached = (pack_e5m6(round_e5m6(x2.float() / scaled)), xq.scale)
        elif save_input:
            xt = quantize(x2, TOKEN_TILE, pow2=recipe.pow2)
            cached = (xt.data, xt.scale)
        ctx.save_for_backward(weight, *cached)
        ctx.recipe, ctx.backend, ctx.input_cache = recipe, backend, input_cache
        ctx.x_shape, ctx.x_dtype, ctx.has_bias, ctx.saved_input = x.shape, x.dtype, bias is not None, save_input
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        weight, *cached = ctx.saved_tensors
        recipe, backend = ctx.recipe, ctx.backend
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            if recipe.fp8_gemm:
                dyq = quantize(dy2, ACT_TILE, pow2=recipe.pow2)
                wq = quantize(weight, WEIGHT_BLOCK, pow2=recipe.pow2)
                dx = fp8_mm(dyq, wq.t(), ctx.x_dtype, backend).reshape(ctx.x_shape)
            else:
                dx = (dy2 @ weight.to(dy2.dtype)).to(ctx.x_dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            if not ctx.saved_input:
                raise RuntimeError("FP8 Linear backward needs the weight gradient but its input was not cached")
            m, k = dy2.shape[0], ctx.x_shape[-1]
            if ctx.input_cache == "e5m6":
                packed, scale = cached
                x_hat = unpack_e5m6(packed, (m, k)) * scale.repeat_interleave(128, dim=1)[:, :k]
                xt = quantize(x_hat, TOKEN_TILE, pow2=recipe.pow2) if recipe.fp8_gemm else None
            else:
                xt = QTensor(cached[0], cached[1], (m, k), TOKEN_TILE)
                x_hat = None if recipe.fp8_gemm else xt.dequantize()
            if recipe.fp8_gemm:
                dyt = quantize(dy2, TOKEN_TILE, pow2=recipe.pow2)
                dw = fp8_mm(dyt.t(), xt.t(), torch.float32, backend).to(weight.dtype)
            else:  # storage only: the high-precision GEMM on the dequantised cache
                dw = (dy2.float().t() @ x_hat.float()).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.float().sum(0)
        return dx, dw, db, None, None, None


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    recipe: FP8Recipe | None = None,
    input_cache: str = "e4m3",
) -> torch.Tensor:
    """``x @ weight^T + bias`` with FP8 Fprop/Dgrad/Wgrad and an FP8-cached input.

    Args:
        x: [..., D_in] activations (BF16 or FP32).
        weight: [D_out, D_in] master weight (its gradient comes back in its own dtype).
        bias: optional [D_out], added in high precision.
        recipe: the :class:`FP8Recipe` (default: the report's).
        input_cache: ``e4m3`` (128x1 token tiles from high precision) or ``e5m6`` (the
            report's format for the Linear after attention); see the module docstring.

    Returns:
        [..., D_out] in ``x``'s dtype.
    """
    if input_cache not in INPUT_CACHES:
        raise ValueError(f"input_cache must be one of {INPUT_CACHES}, got {input_cache!r}")
    recipe = recipe or FP8Recipe()
    save_input = torch.is_grad_enabled() and weight.requires_grad
    return _FP8LinearFn.apply(x, weight, bias, recipe, input_cache, save_input)


class FP8Linear(nn.Module):
    """Drop-in for an ``nn.Linear`` that runs its GEMMs in FP8 and caches its input in FP8.

    It holds the same ``weight`` (and ``bias``) ``nn.Parameter`` objects as the Linear it was
    built from, so state dicts, optimiser states and the master weights are unchanged.

    Args:
        linear: the ``nn.Linear`` to wrap.
        recipe: the :class:`FP8Recipe`.
        input_cache: ``e4m3`` or ``e5m6`` (the Linear after attention).
    """

    def __init__(self, linear: nn.Linear, recipe: FP8Recipe, input_cache: str = "e4m3"):
        super().__init__()
        if input_cache not in INPUT_CACHES:
            raise ValueError(f"input_cache must be one of {INPUT_CACHES}, got {input_cache!r}")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.recipe = recipe
        self.input_cache = input_cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias, self.recipe, self.input_cache)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"input_cache={self.input_cache}, scales={self.recipe.scale_format}, backend={self.recipe.backend}"
        )


# --- Grouped GEMM of the routed experts ----------------------------------------------------


class _FP8GroupedMMFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, offs, recipe: FP8Recipe, save_input: bool):
        backend = resolve_backend(recipe.backend, x.device)
        offs_list = [int(o) for o in offs.tolist()]
        if recipe.fp8_gemm:
            xq = quantize(x, ACT_TILE, pow2=recipe.pow2)
            wq = quantize(w, WEIGHT_BLOCK, pow2=recipe.pow2)
            y = grouped_mm(xq, wq, offs_list, x.dtype, backend)
        else:  # storage only: the model's exact grouped GEMM
            with torch.no_grad():
                y = model_grouped_mm(x, w.to(x.dtype), offs)
        cached: tuple[torch.Tensor, ...] = ()
        if save_input:
            rows, padded_offs = group_padding(offs_list)
            xt = quantize_tokens_grouped(x, rows, padded_offs[-1] if padded_offs else 0, pow2=recipe.pow2)
            # Keep only the real rows of the token-tiled copy (the group padding is all zeros).
            data = xt.data.view(torch.uint8).index_select(0, rows.to(x.device))
            cached = (data, xt.scale)
        ctx.save_for_backward(w, *cached)
        ctx.offs, ctx.recipe, ctx.backend = offs_list, recipe, backend
        ctx.x_shape, ctx.x_dtype, ctx.saved_input = x.shape, x.dtype, save_input
        return y

    @staticmethod
    def backward(ctx, dy):
        w, *cached = ctx.saved_tensors
        recipe, backend, offs = ctx.recipe, ctx.backend, ctx.offs
        # storage only: the model's grouped kernels take the group ends as a device tensor
        offs_t = None if recipe.fp8_gemm else torch.tensor(offs, dtype=torch.int32, device=dy.device)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            if recipe.fp8_gemm:
                dyq = quantize(dy, ACT_TILE, pow2=recipe.pow2)
                wq = quantize(w, WEIGHT_BLOCK, pow2=recipe.pow2)
                dx = grouped_mm(dyq, wq.t(), offs, ctx.x_dtype, backend)
            else:
                with torch.no_grad():
                    dx = grouped_mm_dgrad(dy.contiguous(), w.to(dy.dtype), offs_t)
        if ctx.needs_input_grad[1]:
            if not ctx.saved_input:
                raise RuntimeError("FP8 grouped GEMM backward needs the weight gradient but its input was not cached")
            rows, padded_offs = group_padding(offs)
            n_pad = padded_offs[-1] if padded_offs else 0
            data, scale = cached
            rows = rows.to(data.device)
            full = torch.zeros(n_pad, data.shape[1], dtype=torch.uint8, device=data.device)
            full.index_copy_(0, rows, data)
            xt = QTensor(full.view(torch.float8_e4m3fn), scale, (n_pad, ctx.x_shape[1]), TOKEN_TILE)
            if recipe.fp8_gemm:
                dyt = quantize_tokens_grouped(dy, rows, n_pad, pow2=recipe.pow2)
                dw = grouped_wgrad(dyt, xt, padded_offs, torch.float32, backend).to(w.dtype)
            else:  # storage only: high-precision grouped dy^T x on the dequantised cache
                x_hat = xt.dequantize().index_select(0, rows)
                dw = grouped_mm_wgrad(dy.float(), x_hat, offs_t).to(w.dtype)
        return dx, dw, None, None, None


def fp8_grouped_mm(
    x_sorted: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, recipe: FP8Recipe | None = None
) -> torch.Tensor:
    """Grouped expert GEMM in FP8: rows ``offs[e-1]:offs[e]`` of ``x_sorted`` times ``w[e]^T``.

    The signature of ``Experts.mm``. Fprop and Dgrad tile rows along K (a tile is one token,
    so groups need nothing special); Wgrad tiles along tokens inside each group (every group
    starts on a fresh 128-token tile). Only the real rows of the token-tiled input are cached.
    The group ends are read on the host (one device synchronisation per call on a GPU).

    Args:
        x_sorted: [N, K] tokens sorted by expert.
        w: [E, O, K] stacked expert weights (128x128 blocks per expert).
        offs: [E] int32 cumulative row ends (``offs[-1] == N``).
        recipe: the :class:`FP8Recipe` (default: the report's).

    Returns:
        [N, O] in ``x_sorted``'s dtype.
    """
    recipe = recipe or FP8Recipe()
    save_input = torch.is_grad_enabled() and w.requires_grad
    return _FP8GroupedMMFn.apply(x_sorted, w, offs, recipe, save_input)


# --- SwiGLU --------------------------------------------------------------------------------


class _FP8SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, weight, pow2: bool):
        out = F.silu(gate) * up
        if weight is not None:
            out = out * weight.to(out.dtype)
        gq = quantize(gate.reshape(-1, gate.shape[-1]), ACT_TILE, pow2=pow2)
        uq = quantize(up.reshape(-1, up.shape[-1]), ACT_TILE, pow2=pow2)
        ctx.save_for_backward(gq.data, gq.scale, uq.data, uq.scale, weight)
        ctx.shape2, ctx.shape, ctx.dtypes = gq.shape, gate.shape, (gate.dtype, up.dtype)
        return out

    @staticmethod
    def backward(ctx, dy):
        gd, gs, ud, us, weight = ctx.saved_tensors
        g = QTensor(gd, gs, ctx.shape2, ACT_TILE).dequantize().reshape(ctx.shape)
        u = QTensor(ud, us, ctx.shape2, ACT_TILE).dequantize().reshape(ctx.shape)
        dgate, dup, dweight = swiglu_backward(g, u, dy.float(), weight, ctx.needs_input_grad[2])
        return dgate.to(ctx.dtypes[0]), dup.to(ctx.dtypes[1]), dweight, None


def fp8_swiglu(
    gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor | None = None, recipe: FP8Recipe | None = None
) -> torch.Tensor:
    """``silu(gate) * up`` (times the per-row gate value ``weight`` [..., 1] when given) that caches
    its inputs in FP8 (1x128 tiles) and recomputes in backward.

    Args:
        gate, up: [..., I] (same shape).
        weight: optional [..., 1] routing weights g (kept in high precision: one value per row).
        recipe: the :class:`FP8Recipe` (its ``scale_format`` picks the scales).

    Returns:
        [..., I], computed in the inputs' precision (only the backward sees FP8 inputs).
    """
    recipe = recipe or FP8Recipe()
    return _FP8SwiGLUFn.apply(gate, up, weight, recipe.pow2)


# --- Callables for the model's swappable attributes ----------------------------------------


class FP8GroupedMM:
    """``Experts.mm`` replacement: ``mm(x_sorted, w, offs)`` with :func:`fp8_grouped_mm`."""

    def __init__(self, recipe: FP8Recipe):
        self.recipe = recipe

    def __call__(self, x_sorted: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        return fp8_grouped_mm(x_sorted, w, offs, self.recipe)

    def __repr__(self) -> str:
        return f"FP8GroupedMM(scales={self.recipe.scale_format}, backend={self.recipe.backend})"


class FP8SwiGLU:
    """``act(gate, up[, weight])`` replacement: :func:`fp8_swiglu`."""

    # Read by dsv3.memory.recompute: this SwiGLU keeps FP8 copies of its inputs and recomputes its output.
    caches_fp8_inputs = True

    def __init__(self, recipe: FP8Recipe):
        self.recipe = recipe

    def __call__(self, gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return fp8_swiglu(gate, up, weight, self.recipe)

    def __repr__(self) -> str:
        return f"FP8SwiGLU(scales={self.recipe.scale_format})"
