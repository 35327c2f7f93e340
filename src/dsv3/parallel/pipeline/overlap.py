"""The FB op's overlap: an MoE feed-forward cut at its all-to-alls (report 3.2.1, Figure 4).

:class:`CutMoE` runs ``out = h + MoE(RMSNorm(h))`` of one decoder layer through the start/wait halves of
its :class:`~dsv3.model.moe.Dispatcher` as three forward components (DISPATCH, MLP, COMBINE) and three
backward ones in reverse, so that a component of another micro-batch runs while each all-to-all travels.
The autograd graph is cut at every exchanged tensor (``cut`` waits give leaves); the backward of an
exchange is the exchange of the leaves' ``.grad``, started in one component and waited in the next
(the protocol's ``*_backward_start`` / ``*_backward_wait``). Each component runs its own
``torch.autograd.backward``, so weight-gradient splitting applies and no all-to-all is ever recomputed.
All communication is issued from the calling thread, in program order.

``events``: a list that each component appends ``(phase, name, start, end)`` to (``time.perf_counter()``;
phase "F" or "B"; ATTN / DISPATCH / MLP / COMBINE) and each exchange start or wait ``(phase,
"dispatch.start" | "dispatch.wait" | "combine.start" | "combine.wait", t, t)`` (docs/pipeline.md).
"""

from __future__ import annotations

import time
from functools import partial

import torch

from dsv3.memory.recompute import communicates
from dsv3.model.moe import Dispatcher


def cuts(layer) -> bool:
    """Whether :class:`CutMoE` runs ``layer``'s feed-forward: an MoE whose :class:`~dsv3.model.moe.Dispatcher`
    exchanges tokens with other ranks (its ``group`` is set), while gradients are on."""
    return torch.is_grad_enabled() and communicates(layer)


class _Span:
    """Context manager appending ``(phase, name, start, end)`` to ``events`` (when it is a list)."""

    __slots__ = ("events", "phase", "name", "start")

    def __init__(self, events, phase: str, name: str) -> None:
        self.events, self.phase, self.name = events, phase, name

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.events is not None:
            self.events.append((self.phase, self.name, self.start, time.perf_counter()))


def span(events, phase: str, name: str) -> _Span:
    """A timed component span (see the module docstring)."""
    return _Span(events, phase, name)


def mark(events, phase: str, name: str) -> None:
    """An instant event (an exchange started or waited)."""
    if events is not None:
        t = time.perf_counter()
        events.append((phase, name, t, t))


class CutMoE:
    """The feed-forward step of ``layer`` on ``h`` [B, T, d] (a leaf requiring grad) in components.

    Forward: call :meth:`dispatch`, :meth:`mlp`, :meth:`combine` (which returns the step output
    ``h + MoE(RMSNorm(h))`` [B, T, d]) with any other work in between; the layer records its loads
    and balance loss into ``stats`` (a :class:`~dsv3.model.moe.RoutingStats`) in :meth:`dispatch`.
    Backward: :meth:`backward_combine` (output gradient [B, T, d]), :meth:`backward_mlp`,
    :meth:`backward_dispatch` (the balance loss's weight), after which ``h.grad`` is the input gradient.
    ``events``: a list to record components into (module docstring), None, or a callable returning one.
    """

    def __init__(self, layer, h: torch.Tensor, stats=None, events=None) -> None:
        self.layer, self.moe, self.h, self.stats, self._events = layer, layer.mlp, h, stats, events
        self.disp: Dispatcher = self.moe.dispatcher

    @property
    def events(self) -> list | None:
        """The event list (``events`` may be a list, None, or a callable returning either when a component runs)."""
        return self._events() if callable(self._events) else self._events

    # ------------------------------------------------------------------ forward
    def dispatch(self) -> None:
        """DISPATCH: RMSNorm, router, exchange the token counts (the shared experts run meanwhile), start the
        token exchange."""
        with span(self.events, "F", "DISPATCH"):
            moe, h = self.moe, self.h
            bsz, seqlen, dim = h.shape
            flat = self.layer.post_attention_layernorm(h).reshape(-1, dim)
            weights, indices, scores = moe.gate(flat)
            moe.record(self.stats, scores, indices, bsz, seqlen)
            self.aux = None if self.stats is None else self.stats.balance.get(moe.layer_idx)
            self.shared = None
            meanwhile = partial(self._shared_experts, flat)  # while the token counts are exchanged
            self.pending = self.disp.dispatch_start(flat, indices, weights, meanwhile=meanwhile)
            mark(self.events, "F", "dispatch.start")

    def _shared_experts(self, flat: torch.Tensor) -> None:
        """The shared experts on the normalised tokens ``flat`` [N, d] (into ``self.shared``), if the layer has any."""
        if self.moe.shared_experts is not None:
            self.shared = self.moe.shared_experts(flat)

    def mlp(self) -> None:
        """MLP: wait for the tokens, run the local routed experts, start sending their sums back."""
        with span(self.events, "F", "MLP"):
            mark(self.events, "F", "dispatch.wait")
            recv_x, counts, handle = self.disp.dispatch_wait(self.pending, cut=True)
            self.z_pending = self.disp.combine_start(self.moe.routed(recv_x, counts, handle), handle)
            mark(self.events, "F", "combine.start")

    def combine(self) -> torch.Tensor:
        """COMBINE: wait for the expert outputs, sum them per token, add the shared experts and ``h``."""
        with span(self.events, "F", "COMBINE"):
            mark(self.events, "F", "combine.wait")
            out = self.disp.combine_wait(self.z_pending, cut=True)
            if self.shared is not None:
                self.shared_leaf = self.shared.detach().requires_grad_(self.shared.requires_grad)
                out = out + self.shared_leaf
            self.out = self.h + out.view(self.h.shape)
            return self.out

    # ----------------------------------------------------------------- backward
    def backward_combine(self, grad: torch.Tensor) -> None:
        """Backward of COMBINE; starts sending the expert outputs' gradient back (FP8 with FP8 dispatch)."""
        with span(self.events, "B", "COMBINE"):
            torch.autograd.backward([self.out], [grad])
            self.out = None
            self.z_grad = self.disp.combine_backward_start(self.z_pending)
            mark(self.events, "B", "combine.start")

    def backward_mlp(self) -> None:
        """Backward of MLP: wait for the gradient of the expert sums, back-propagate through the experts,
        start sending the received tokens' gradients back."""
        with span(self.events, "B", "MLP"):
            mark(self.events, "B", "combine.wait")
            z = self.z_pending.z
            torch.autograd.backward([z], [self.disp.combine_backward_wait(self.z_grad).to(z.dtype)])
            self.z_pending = self.z_grad = None
            self.x_grad = self.disp.dispatch_backward_start(self.pending)
            mark(self.events, "B", "dispatch.start")

    def backward_dispatch(self, scale: float) -> None:
        """Backward of DISPATCH: wait for the sent rows' gradients and back-propagate them, the shared experts'
        gradient and the balance loss (weight ``scale``) to ``h``."""
        with span(self.events, "B", "DISPATCH"):
            mark(self.events, "B", "dispatch.wait")
            p = self.pending
            g_x, g_meta = self.disp.dispatch_backward_wait(self.x_grad)
            tensors, grads = [], []
            for t, g in ((p.send_x, g_x), (p.meta, g_meta)):
                if t.requires_grad:
                    tensors.append(t)
                    grads.append(g.to(t.dtype))
            if self.shared is not None and self.shared.requires_grad:
                tensors.append(self.shared)
                grads.append(
                    self.shared_leaf.grad if self.shared_leaf.grad is not None else torch.zeros_like(self.shared)
                )
            if self.aux is not None and self.aux.requires_grad:
                tensors.append(self.aux)
                grads.append(torch.full_like(self.aux, scale))
            if tensors:
                torch.autograd.backward(tensors, grads)
            self.pending = self.x_grad = self.shared = self.shared_leaf = self.aux = None
