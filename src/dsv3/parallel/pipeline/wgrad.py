"""Zero-bubble weight-gradient split: B computes input gradients now, W the weight gradients later.

ZB1P, DualPipe and DualPipeV (arXiv 2401.10241; report 3.2.1) cut a backward into ``B`` (the stage input's
gradient, which the previous stage waits for) and ``W`` (the weights' gradient, which fills a bubble).
:func:`split_weight_grads` applies that cut to a built model: plain ``nn.Linear`` runs through
:class:`_SplitLinear`, the model's grouped expert GEMM through :class:`_SplitGroupedMM`, FP8 Linears and FP8
grouped GEMMs through :class:`_SplitFP8` (their own backward, once for the input, once for the weights).
Their backward computes ``dL/dx``; while the shared :class:`WeightGradStore` is *deferring* (a ``B`` op) they
queue a closure that accumulates ``dL/dW = dy^T x`` into ``.grad``, otherwise they return it to autograd, so
a transformed model trains exactly like the original. Router, RMSNorm, embedding and the fused output-head
cross-entropy keep computing their weight gradients inside B (docs/pipeline.md, "Zero-bubble W").
"""

from __future__ import annotations

import types
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.fp8.linear import FP8GroupedMM, FP8Linear, _FP8GroupedMMFn, _FP8LinearFn
from dsv3.model.moe import Experts
from dsv3.model.ops import grouped_mm, grouped_mm_dgrad, grouped_mm_wgrad, grouped_mm_wgrad_into


class WeightGradStore:
    """The queue of deferred weight-gradient work of one device (DualPipe's ``WeightGradStore``).

    Usage by the runtime::

        with store.deferring():          # a B op: weight gradients are queued, not computed
            torch.autograd.backward(...)
        store.flush(key)                 # close the B op's group of closures under its key
        ...
        store.pop(key)                   # the matching W op: run the group, first-in first-out
    """

    def __init__(self) -> None:
        self.enabled = False
        self._pending: list[Callable[[], None]] = []
        self._queue: deque[tuple[Any, list[Callable[[], None]]]] = deque()

    @contextmanager
    def deferring(self):
        """Queue (instead of compute) the weight gradients of split modules inside the block."""
        self.enabled = True
        try:
            yield self
        finally:
            self.enabled = False

    def put(self, fn: Callable[[], None]) -> None:
        self._pending.append(fn)

    def flush(self, key: Any) -> None:
        """Close the closures queued since the last flush into one group named ``key``."""
        self._queue.append((key, self._pending))
        self._pending = []

    def pop(self, key: Any = None) -> int:
        """Run the oldest group (which must be ``key`` when given); returns how many closures ran."""
        if not self._queue:
            raise RuntimeError(f"W op {key!r} has no deferred weight gradients queued.")
        got, fns = self._queue.popleft()
        if key is not None and got != key:
            raise RuntimeError(
                f"W op {key!r} found the deferred weight gradients of {got!r} first (W ops are first-in first-out)."
            )
        for fn in fns:
            fn()
        return len(fns)

    def __len__(self) -> int:
        return len(self._queue)


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    """``param.grad += grad`` as autograd's AccumulateGrad does it (the first gradient is stored as is)."""
    if param.grad is None:
        param.grad = grad.detach()
    else:
        param.grad.add_(grad)


class _SplitLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` whose weight gradient can be deferred to a :class:`WeightGradStore`.

    Shapes: x [..., K], weight [O, K], bias [O] or None -> y [..., O].
    Backward: dx = dy W; dW = dy^T x and db = sum(dy) over the rows (now, or queued).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, store: WeightGradStore):
        ctx.save_for_backward(x, weight)
        ctx.store = store
        ctx.params = (weight, bias)  # leaves: held by reference to accumulate into their .grad later
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dy.matmul(weight) if need_x else None
        dy2 = dy.reshape(-1, dy.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])

        def weight_grads():
            return (dy2.t().mm(x2) if need_w else None), (dy2.sum(0) if need_b else None)

        if ctx.store.enabled and (need_w or need_b):
            w_param, b_param = ctx.params

            def deferred() -> None:
                dw, db = weight_grads()
                if dw is not None:
                    _accumulate(w_param, dw)
                if db is not None:
                    _accumulate(b_param, db)

            ctx.store.put(deferred)
            return dx, None, None, None
        dw, db = weight_grads()
        return dx, dw, db, None


def _split_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _SplitLinear.apply(x, self.weight, self.bias, self._wgrad_store)


class _SplitGroupedMM(torch.autograd.Function):
    """:func:`~dsv3.model.ops.grouped_mm` whose weight gradient can be deferred.

    Shapes: x [N, K] (rows grouped by expert), w [E, O, K], offs [E] -> [N, O].
    Backward: dx = grouped_mm_dgrad(dy, w); dw = grouped_mm_wgrad(dy, x) (now, or queued), added into ``.grad``
    in place when the weight is marked for it (:func:`~dsv3.model.ops.grouped_mm_wgrad_into`).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, store: WeightGradStore):
        ctx.save_for_backward(x, w, offs)
        ctx.store = store
        ctx.param = w
        return grouped_mm(x, w, offs)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w, offs = ctx.saved_tensors
        dx = grouped_mm_dgrad(dy, w, offs) if ctx.needs_input_grad[0] else None
        if not ctx.needs_input_grad[1]:
            return dx, None, None, None
        param = ctx.param
        if ctx.store.enabled:

            @torch.no_grad()
            def deferred() -> None:
                if not grouped_mm_wgrad_into(param, dy, x, offs):
                    _accumulate(param, grouped_mm_wgrad(dy, x, offs))

            ctx.store.put(deferred)
            return dx, None, None, None
        return dx, None if grouped_mm_wgrad_into(param, dy, x, offs) else grouped_mm_wgrad(dy, x, offs), None, None


class _InnerCtx:
    """Stands in for an autograd context when one Function runs another's forward and backward."""

    def save_for_backward(self, *tensors) -> None:
        self.saved_tensors = tensors

    def asking(self, needs: tuple[bool, ...]) -> "_InnerCtx":
        self.needs_input_grad = needs
        return self


class _SplitFP8(torch.autograd.Function):
    """An FP8 autograd function (``_FP8LinearFn`` or ``_FP8GroupedMMFn`` of :mod:`dsv3.fp8.linear`) with
    its weight gradient deferrable.

    Its forward runs unchanged; its backward runs once asking only for the input gradient (B)
    and once, now or queued, asking only for the weight (and bias) gradients (W): the same
    arithmetic, split. ``args`` are the FP8 function's inputs, tensors first: ``(x, weight,
    bias, ...)`` for the Linear (``n_params`` 2), ``(x, w, offs, ...)`` for the grouped GEMM (1).
    """

    @staticmethod
    def forward(ctx, fn, n_params: int, store: WeightGradStore, *args):
        ctx.fn, ctx.n_params, ctx.store = fn, n_params, store
        ctx.inner = _InnerCtx()
        ctx.params = args[1 : 1 + n_params]
        return fn.forward(ctx.inner, *args)

    @staticmethod
    def backward(ctx, dy):
        fn, k, inner = ctx.fn, ctx.n_params, ctx.inner
        needs = ctx.needs_input_grad[3:]  # after fn, n_params, store
        off = (False,) * (len(needs) - 1 - k)
        need_x, need_p = needs[0], needs[1 : 1 + k]
        if not (ctx.store.enabled and any(need_p)):
            return (None, None, None, *fn.backward(inner.asking(needs), dy))
        dx = fn.backward(inner.asking((need_x,) + (False,) * k + off), dy)[0] if need_x else None
        params = ctx.params

        def deferred() -> None:
            grads = fn.backward(inner.asking((False,) + tuple(need_p) + off), dy)[1 : 1 + k]
            for p, g in zip(params, grads):
                if g is not None:
                    _accumulate(p, g)

        ctx.store.put(deferred)
        return (None, None, None, dx) + (None,) * (len(needs) - 1)


def _split_fp8_linear_forward(self, x: torch.Tensor) -> torch.Tensor:
    save_input = torch.is_grad_enabled() and self.weight.requires_grad
    return _SplitFP8.apply(
        _FP8LinearFn, 2, self._wgrad_store, x, self.weight, self.bias, self.recipe, self.input_cache, save_input
    )


class _SplitFP8GroupedMM:
    """``Experts.mm`` replacement: the FP8 grouped GEMM of ``FP8GroupedMM`` with a deferrable weight gradient."""

    _wgrad_split = True

    def __init__(self, recipe, store: WeightGradStore) -> None:
        self.recipe, self.store = recipe, store

    def __call__(self, x_sorted: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        save_input = torch.is_grad_enabled() and w.requires_grad
        return _SplitFP8.apply(_FP8GroupedMMFn, 1, self.store, x_sorted, w, offs, self.recipe, save_input)


def split_weight_grads(model: nn.Module, store: WeightGradStore) -> int:
    """Route the weight gradients of ``model``'s plain Linears and grouped expert GEMMs through ``store``.

    Idempotent. Returns the number of modules transformed. Other subclasses of ``nn.Linear``
    and experts with another replaced ``mm`` are left alone.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, Experts) and isinstance(module.mm, (FP8GroupedMM, _SplitFP8GroupedMM)):
            module.mm = _SplitFP8GroupedMM(module.mm.recipe, store)
            count += 1
            continue
        if isinstance(module, FP8Linear):
            module._wgrad_store = store
            module.forward = types.MethodType(_split_fp8_linear_forward, module)
            count += 1
        elif type(module) is nn.Linear:
            module._wgrad_store = store
            module.forward = types.MethodType(_split_linear_forward, module)
            count += 1
        elif isinstance(module, Experts) and (module.mm is grouped_mm or getattr(module.mm, "_wgrad_split", False)):

            def mm(x, w, offs, _store=store):
                return _SplitGroupedMM.apply(x, w, offs, _store)

            mm._wgrad_split = True
            module.mm = mm
            count += 1
    return count
