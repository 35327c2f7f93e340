"""Small compute primitives the model calls through swappable attributes.

The FP8 recipe and the recomputation policies replace these callables on built
modules (``experts.mm``, ``experts.act``, ``mlp.act``); the model itself only
ever calls them through those attributes.

- :func:`grouped_mm` multiplies consecutive row groups of ``x`` by per-expert
  weights (tokens sorted by expert), with ``torch.nn.functional.grouped_mm`` where
  the installed torch has a kernel for the device and dtype, and an index-based
  padded ``bmm`` otherwise (no Python loop over experts in either). In training its weight
  gradient can be added into ``.grad`` in place, a few experts at a time
  (:func:`grouped_mm_wgrad_into`), instead of beside it.
- :func:`swiglu` is SwiGLU's gating, ``silu(gate) * up``.
"""

from __future__ import annotations

import functools
import threading

import torch
import torch.nn.functional as F


class _SwiGLU(torch.autograd.Function):
    """``silu(gate) * up * weight`` keeping only ``gate``, ``up`` (and ``weight``) for backward.

    Plain autograd would also keep ``silu(gate)``; here it is recomputed in backward
    (report 3.2.3: SwiGLU keeps only its inputs). Computed in at least FP32, returned in the input dtype.
    """

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor | None):
        ctx.save_for_backward(gate, up, weight)
        acc = torch.promote_types(gate.dtype, torch.float32)
        out = F.silu(gate.to(acc)).mul_(up)  # in place: one [..., I] buffer, same values as silu * up
        if weight is not None:
            out.mul_(weight)
        return out.to(gate.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up, weight = ctx.saved_tensors
        acc = torch.promote_types(gate.dtype, torch.float32)
        dgate, dup, dw = swiglu_backward(gate.to(acc), up.to(acc), grad.to(acc), weight, ctx.needs_input_grad[2])
        return dgate.to(gate.dtype), dup.to(up.dtype), dw


def swiglu_backward(
    g: torch.Tensor, u: torch.Tensor, dy: torch.Tensor, weight: torch.Tensor | None, need_dweight: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of ``silu(g) * u * weight``, recomputing ``silu(g)`` from ``g``.

    Args:
        g, u: [..., I] the SwiGLU inputs, in the accumulation dtype.
        dy: [..., I] gradient of the output, same dtype.
        weight: [..., 1] per-row gate values, or None.
        need_dweight: whether to compute the gradient of ``weight``.

    Returns:
        ``(dg, du, dweight)`` in the accumulation dtype (``dweight`` in ``weight``'s dtype, or None).
    """
    # In-place products where a buffer is ours: the same operations in the same order as the formula
    # dg = dy * u * (sig * (1 + g * (1 - sig))), du = dy * silu (bit-identical), fewer [..., I] allocations.
    sig = torch.sigmoid(g)
    silu = g * sig
    dweight = None
    if weight is not None:
        if need_dweight:
            dweight = (dy * silu).mul_(u).sum(dim=-1, keepdim=True).to(weight.dtype)
        dy = dy * weight.to(g.dtype)
    dsilu = torch.rsub(sig, 1).mul_(g).add_(1).mul_(sig)  # sig * (1 + g * (1 - sig))
    return (dy * u).mul_(dsilu), silu.mul_(dy), dweight


def swiglu(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """SwiGLU gating ``silu(gate) * up``, optionally scaled per row by ``weight`` [..., 1].

    ``gate``/``up`` [..., I]. The MoE passes its gate values g as ``weight``: scaling
    before the (linear) down-projection equals scaling its output, and keeps an
    I-wide tensor for backward instead of a d-wide one.
    """
    return _SwiGLU.apply(gate, up, weight)


class _Combine(torch.autograd.Function):
    """``out[t] = sum of y[r] over the rows r with token[r] == t``; keeps only the index for backward
    (``index_add`` would keep ``y`` itself)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, token: torch.Tensor, n_tokens: int) -> torch.Tensor:
        ctx.save_for_backward(token)
        return y.new_zeros(n_tokens, y.shape[-1]).index_add_(0, token, y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (token,) = ctx.saved_tensors
        return grad.index_select(0, token), None, None


def combine(y: torch.Tensor, token: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Sum the expert outputs ``y`` [M, d] back into their tokens: returns [n_tokens, d]."""
    return _Combine.apply(y, token, n_tokens)


@functools.lru_cache(maxsize=None)
def has_grouped_mm_kernel(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``F.grouped_mm`` runs forward and backward for this device type and dtype.

    The probe runs in a thread of its own: grad mode, dispatch modes and saved-tensor hooks
    are thread-local, so a first call from inside a recomputed (checkpointed) region or a
    ``no_grad`` block neither disturbs that region nor is disturbed by it.
    """
    if getattr(F, "grouped_mm", None) is None:
        return False
    result = [False]

    def probe() -> None:
        try:
            x = torch.randn(8, 16, device=device_type, dtype=dtype, requires_grad=True)
            w = torch.randn(2, 8, 16, device=device_type, dtype=dtype, requires_grad=True)
            offs = torch.tensor([3, 8], device=device_type, dtype=torch.int32)
            y = F.grouped_mm(x, w.transpose(-2, -1), offs=offs)
            y.backward(torch.ones_like(y))
            ref = torch.cat([x[:3] @ w[0].T, x[3:] @ w[1].T])
            result[0] = bool(torch.allclose(y, ref, atol=1e-2, rtol=1e-2))
        except (RuntimeError, NotImplementedError, TypeError):
            result[0] = False

    thread = threading.Thread(target=probe, name="dsv3-grouped-mm-probe")
    thread.start()
    thread.join()
    return result[0]


# The grouped GEMM as torch.library custom ops: opaque to torch.compile (which has no CPU/FP32
# meta function for aten._grouped_mm) yet traceable, with the backward written out so that
# incoming gradients are made contiguous (the kernel rejects broadcast gradients) and the
# weight gradient uses the 2D x 2D grouped form (contraction over the jagged token dimension).
@torch.library.custom_op("dsv3::grouped_mm", mutates_args=())
def _grouped_mm_op(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """[N, K] x [E, O, K] -> [N, O]: rows of group e times w[e]^T."""
    return F.grouped_mm(x, w.transpose(-2, -1), offs=offs)


@_grouped_mm_op.register_fake
def _(x, w, offs):
    return x.new_empty(x.shape[0], w.shape[1])


@torch.library.custom_op("dsv3::grouped_mm_dgrad", mutates_args=())
def _grouped_mm_dgrad(dy: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """[N, O] x [E, O, K] -> [N, K]: rows of group e times w[e]."""
    return F.grouped_mm(dy.contiguous(), w, offs=offs)


@_grouped_mm_dgrad.register_fake
def _(dy, w, offs):
    return dy.new_empty(dy.shape[0], w.shape[2])


@torch.library.custom_op("dsv3::grouped_mm_wgrad", mutates_args=())
def _grouped_mm_wgrad(dy: torch.Tensor, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """sum over the rows of group e of dy^T x: [N, O], [N, K] -> [E, O, K]."""
    return F.grouped_mm(dy.contiguous().t(), x, offs=offs)


@_grouped_mm_wgrad.register_fake
def _(dy, x, offs):
    return dy.new_empty(offs.shape[0], dy.shape[1], x.shape[1])


def _grouped_mm_setup(ctx, inputs, output):
    x, w, offs = inputs
    ctx.save_for_backward(x, w, offs)
    ctx.param = w  # the leaf itself (its ``.grad``), for the in-place accumulation of grouped_mm_wgrad_into


def _grouped_mm_backward(ctx, dy):
    x, w, offs = ctx.saved_tensors
    dx = _grouped_mm_dgrad(dy, w, offs) if ctx.needs_input_grad[0] else None
    dw = None
    if ctx.needs_input_grad[1] and not grouped_mm_wgrad_into(ctx.param, dy, x, offs):
        dw = _grouped_mm_wgrad(dy, x, offs)
    return dx, dw, None


_grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)
GROUPED_MM_OPS = (
    torch.ops.dsv3.grouped_mm.default,
    torch.ops.dsv3.grouped_mm_dgrad.default,
    torch.ops.dsv3.grouped_mm_wgrad.default,
)


def _padded_grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Index-based fallback: scatter the row groups into a padded [E, C, K] batch and bmm."""
    n, k = x.shape
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
        return _grouped_mm_op(x, w, offs)
    return _padded_grouped_mm(x, w, offs)


def grouped_mm_dgrad(dy: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Input gradient of :func:`grouped_mm`: rows of group e of ``dy`` [N, O] times ``w[e]`` [O, K] -> [N, K]."""
    if _kernel_applies(dy, w.transpose(1, 2)):
        return _grouped_mm_dgrad(dy, w, offs)
    return _padded_grouped_mm(dy, w.transpose(1, 2), offs)


def grouped_mm_wgrad(dy: torch.Tensor, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Weight gradient of :func:`grouped_mm`: ``dW[e] = dy_e^T x_e`` over the rows of group e -> [E, O, K].

    Args:
        dy: [N, O] output gradients, rows grouped by expert.
        x: [N, K] inputs, same rows.
        offs: [E] int32 cumulative row ends.
    """
    if _kernel_applies(dy, x):  # the same conditions: equal dtypes, O and K rows 16-byte aligned
        return _grouped_mm_wgrad(dy, x, offs)
    dw = x.new_zeros(offs.shape[0], dy.shape[1], x.shape[1])
    start = 0
    for e, end in enumerate(offs.tolist()):  # fallback only: no grouped kernel for this device/dtype
        if end > start:
            dw[e] = dy[start:end].t() @ x[start:end]
        start = end
    return dw


#: Attribute of a stacked expert weight whose gradients :func:`grouped_mm_wgrad_into` adds into ``.grad`` in place
#: (set by :func:`dsv3.memory.accumulate.accumulate_in_place`, for training only).
ACCUMULATE_IN_PLACE = "_dsv3_accumulate_in_place"

#: Elements of the weight-gradient piece :func:`grouped_mm_wgrad_into` computes at a time (16 MiB of FP32; at least
#: one expert).
WGRAD_PIECE_ELEMS = 1 << 22


def grouped_mm_wgrad_into(param: torch.Tensor, dy: torch.Tensor, x: torch.Tensor, offs: torch.Tensor) -> bool:
    """Add the weight gradient of :func:`grouped_mm` into ``param.grad`` [E, O, K] in place, a few experts at a time.

    Autograd computes a new gradient of the whole stacked block beside ``.grad`` and then adds it in (the
    gradient-accumulation transient of every micro-batch after the first). Here each piece of experts
    ``e0:e1`` (at most :data:`WGRAD_PIECE_ELEMS` elements, at least one expert) gets ``dy_e^T x_e`` from the same
    grouped GEMM over the same rows and is added at once: bit for bit autograd's gradients, with a transient of
    one piece. Only when ``param`` is marked (:data:`ACCUMULATE_IN_PLACE`), its ``.grad`` exists with its shape
    and dtype, and no graph of the backward is built; returns whether it did (else the caller returns the
    gradient to autograd). ``dy`` [N, O], ``x`` [N, K]: rows grouped by expert, ``offs`` [E] int32 row ends
    (read on the host: one synchronisation per call on a GPU).
    """
    grad = getattr(param, "grad", None)
    if not getattr(param, ACCUMULATE_IN_PLACE, False) or grad is None or torch.is_grad_enabled():
        return False
    if grad.shape != param.shape or grad.dtype != dy.dtype or not grad.is_contiguous():
        return False
    dy = dy.detach().contiguous()  # once: every piece is a view of the rows the whole-block GEMM would read
    x = x.detach()
    n_experts = grad.shape[0]
    step = max(1, WGRAD_PIECE_ELEMS // max(1, grad[0].numel()))
    ends = offs.tolist()
    for e0 in range(0, n_experts, step):
        e1 = min(n_experts, e0 + step)
        r0 = ends[e0 - 1] if e0 else 0
        r1 = ends[e1 - 1]
        grad[e0:e1] += grouped_mm_wgrad(dy[r0:r1], x[r0:r1], offs[e0:e1] - r0)
    return True
