"""Small compute primitives the model calls through swappable attributes.

The FP8 recipe and the recomputation policies replace these callables on built
modules (``experts.mm``, ``experts.act``, ``mlp.act``); the model itself only
ever calls them through those attributes.

- :func:`grouped_mm` multiplies consecutive row groups of ``x`` by per-expert
  weights (tokens sorted by expert), with ``torch.nn.functional.grouped_mm`` where
  the installed torch has a kernel for the device and dtype, and an index-based
  padded ``bmm`` otherwise (no Python loop over experts in either).
- :func:`swiglu` is SwiGLU's gating, ``silu(gate) * up``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU gating: silu(gate) * up (same shapes)."""
    return F.silu(gate) * up


@functools.lru_cache(maxsize=None)
def has_grouped_mm_kernel(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``F.grouped_mm`` runs forward and backward for this device type and dtype."""
    fn = getattr(F, "grouped_mm", None)
    if fn is None:
        return False
    try:
        with torch.enable_grad():  # the probe may first run inside a no_grad region
            x = torch.randn(8, 16, device=device_type, dtype=dtype, requires_grad=True)
            w = torch.randn(2, 8, 16, device=device_type, dtype=dtype, requires_grad=True)
            offs = torch.tensor([3, 8], device=device_type, dtype=torch.int32)
            y = fn(x, w.transpose(-2, -1), offs=offs)
            y.backward(torch.ones_like(y))
        ref = torch.cat([x[:3] @ w[0].T, x[3:] @ w[1].T])
        return bool(torch.allclose(y, ref, atol=1e-2, rtol=1e-2))
    except (RuntimeError, NotImplementedError, TypeError):
        return False


class _GroupedMM(torch.autograd.Function):
    """y[rows of group e] = x[rows of group e] @ w[e]^T via F.grouped_mm, forward and backward.

    The backward is written out so that incoming gradients are made contiguous
    (the kernel rejects broadcast gradients) and the weight gradient uses the 2D x 2D
    grouped form (contraction over the jagged token dimension).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w, offs)
        return F.grouped_mm(x, w.transpose(-2, -1), offs=offs)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w, offs = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = F.grouped_mm(dy, w, offs=offs)  # [N, O] x [E, O, K] -> [N, K]
        if ctx.needs_input_grad[1]:
            # [O, N] x [N, K] grouped over N -> [E, O, K]
            dw = F.grouped_mm(dy.t(), x, offs=offs)
        return dx, dw, None


def _padded_grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Index-based fallback: scatter the row groups into a padded [E, C, K] batch and bmm."""
    n, k = x.shape
    e = w.shape[0]
    counts = torch.diff(offs.long(), prepend=offs.new_zeros(1).long())
    capacity = int(counts.max()) if n > 0 else 0
    if capacity == 0:
        return x.new_zeros(n, w.shape[1])
    starts = offs.long() - counts
    slot = torch.arange(capacity, device=x.device)
    rows = starts[:, None] + slot[None, :]  # [E, C]
    valid = slot[None, :] < counts[:, None]
    rows = torch.where(valid, rows, torch.full_like(rows, n))  # row n is a zero pad row
    x_pad = torch.cat([x, x.new_zeros(1, k)])[rows]  # [E, C, K]
    y_pad = torch.bmm(x_pad, w.transpose(1, 2))  # [E, C, O]
    return y_pad[valid]  # rows in group order == the original row order


def _kernel_applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """The grouped kernel needs equal dtypes and row strides that are multiples of 16 bytes."""
    if x.dtype != w.dtype or not has_grouped_mm_kernel(x.device.type, x.dtype):
        return False
    align = 16 // x.element_size()
    return x.shape[1] % align == 0 and w.shape[1] % align == 0


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Grouped GEMM of tokens sorted by expert.

    Args:
        x: [N, K] rows grouped by expert (group e is rows ``offs[e-1]:offs[e]``).
        w: [E, O, K] one weight matrix per expert (``nn.Linear`` layout).
        offs: [E] int32 cumulative row ends, ``offs[-1] == N``.
    Returns:
        [N, O] with ``y[group e] = x[group e] @ w[e]^T``.
    """
    if _kernel_applies(x, w):
        return _GroupedMM.apply(x, w, offs)
    return _padded_grouped_mm(x, w, offs)
