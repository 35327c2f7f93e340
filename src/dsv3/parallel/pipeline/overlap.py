"""The FB op's overlap: an MoE feed-forward cut at its all-to-alls (report 3.2.1, Figure 4).

DualPipe hides the expert-parallel all-to-all of one micro-batch behind the computation of
another: a forward chunk is split into ATTN, DISPATCH, MLP and COMBINE components, a backward
chunk into the same components in reverse, and the components of the two chunks alternate, so
that each all-to-all is *started* at the end of one component and *waited* at the start of the
next component of the same chunk, with a component of the other chunk in between.

:class:`CutMoE` runs the feed-forward step ``out = h + MoE(RMSNorm(h))`` of one decoder layer
whose dispatcher exchanges tokens (:class:`~dsv3.parallel.dispatch.AllToAllDispatcher`, or any
dispatcher with the same start/wait and ``cut`` protocol, such as :mod:`dsv3.parallel.deepep`'s) as three
forward components and three backward ones:

==========  ================================================================  ===================
component   forward                                                           backward (reverse)
==========  ================================================================  ===================
DISPATCH    RMSNorm, router (loads, L_Bal), ``dispatch_start`` (the shared    wait the gradients
            experts run while the token counts are exchanged)                 of the sent rows;
                                                                              backward to ``h``
MLP         ``dispatch_wait``, routed experts (grouped GEMMs, gate-scaled),   wait; backward of
            per-token sum, ``combine_start``                                  the experts; start
                                                                              the dispatch's
                                                                              gradient exchange
COMBINE     ``combine_wait``, sum over ranks, + shared, + ``h``               backward; start the
                                                                              combine's gradient
                                                                              exchange
==========  ================================================================  ===================

The autograd graph is cut at every exchanged tensor: the received tensors are leaves on the
receiving side, and the backward of an exchange is the exchange of their ``.grad`` with the
splits swapped, started at the end of one backward component and waited at the start of the next
(:meth:`AllToAllDispatcher.dispatch_backward_start` and friends). Each component runs its own
``torch.autograd.backward``, so the weight-gradient split of the expert GEMMs
(:mod:`~dsv3.parallel.pipeline.wgrad`) defers as in any B op, and nothing of the layer is inside a
recomputed region, so recomputation never repeats an all-to-all. A token still travels once to
each destination rank (the receiver expands it to its local experts; combine sums before sending
back), and FP8 dispatch sends E4M3 bytes forward and quantises the gradient before the
down-projection in backward, as in the uncut dispatcher.

All communication is issued from the calling thread, in program order, so ranks that run the same
schedule issue their collectives in the same order (gloo aborts otherwise). On CUDA the exchanges
run on the dispatcher's own stream (:class:`~dsv3.parallel.dispatch._Exchange`).

``events``: when a list is given, every component appends ``(phase, name, start, end)`` with
``time.perf_counter()`` seconds (``phase`` "F" or "B"; ``name`` ATTN / DISPATCH / MLP / COMBINE),
and every exchange start or wait appends ``(phase, "dispatch.start" | "dispatch.wait" |
"combine.start" | "combine.wait", t, t)``; the stage records its ATTN components the same way.
"""

from __future__ import annotations

import time

import torch

from dsv3.memory.recompute import communicates


def cuts(layer) -> bool:
    """Whether :class:`CutMoE` runs ``layer``'s feed-forward: an MoE whose dispatcher exchanges tokens with
    other ranks and has start/wait halves, while gradients are on."""
    disp = getattr(layer.mlp, "dispatcher", None)
    return torch.is_grad_enabled() and communicates(layer) and hasattr(disp, "dispatch_start")


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
        self.disp = self.moe.dispatcher

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

            def shared_experts():  # while the token counts are exchanged
                if moe.shared_experts is not None:
                    self.shared = moe.shared_experts(flat)

            self.pending = self.disp.dispatch_start(flat, indices, weights, meanwhile=shared_experts)
            mark(self.events, "F", "dispatch.start")

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
