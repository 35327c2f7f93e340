"""The ``deepep`` backend of :class:`dsv3.model.moe.Dispatcher`: DeepEP's normal (high-throughput) kernels.

:class:`DeepEPDispatcher` drives the V1 ``deep_ep.Buffer`` API (``get_dispatch_layout``, ``dispatch``,
``combine``, the cached dispatch, ``async_finish`` events) with the same rows, counts and handles as
:class:`~dsv3.parallel.dispatch.AllToAllDispatcher`: a token arrives once per rank and is expanded to its
local experts (:func:`~dsv3.model.exchange.expand_to_local_experts`). DeepEP is not autograd-aware, so the
backward of a dispatch is a combine and the backward of a combine a cached dispatch (DeepEP's README
pairing). ``deep_ep`` is an optional dependency, imported only when a buffer is made; FP8 payloads are
refused. Tested against a stand-in ``deep_ep`` with the documented semantics (tests/test_deepep.py), not on
real GPUs here. The API details are in docs/parallel.md.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

import torch

from dsv3.errors import ConfigError
from dsv3.model.exchange import (
    CombineState,
    CommStats,
    DispatchState,
    cut_leaf,
    expand_to_local_experts,
    leaf_grad,
    local_experts,
    node_size,
)
from dsv3.model.moe import DispatchInHalves
from dsv3.model.ops import combine


def check_deepep(device: torch.device | str) -> None:
    """Refuse ``--dispatcher deepep`` where it cannot run: without the ``deep_ep`` package or without CUDA."""
    if importlib.util.find_spec("deep_ep") is None:
        raise ConfigError("--dispatcher deepep needs the deep_ep package (DeepEP) installed; use --dispatcher alltoall")
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        raise ConfigError(
            f"--dispatcher deepep runs on CUDA GPUs only, not on {torch.device(device).type}; use --dispatcher alltoall"
        )


class DeepEPBuffer:
    """The one ``deep_ep.Buffer`` of an expert-parallel group, shared by every MoE layer of a model.

    Allocated at the first dispatch (it needs the hidden size) with the sizes DeepEP's README computes from
    its default dispatch and combine configs, and reallocated only when a larger payload needs more.
    ``module``: the ``deep_ep`` module (a stand-in in tests); imported when not given.
    """

    def __init__(self, group, module=None) -> None:
        self.group = group
        # deep_ep is an optional dependency (CUDA, DeepEP): imported only when a buffer is made.
        self.deep_ep = module if module is not None else importlib.import_module("deep_ep")
        self.buffer = None

    def get(self, x: torch.Tensor):
        Buffer = self.deep_ep.Buffer
        n = self.group.size()
        hidden_bytes = x.shape[1] * max(x.element_size(), 2)
        nvl = rdma = 0
        for cfg in (Buffer.get_dispatch_config(n), Buffer.get_combine_config(n)):
            nvl = max(nvl, cfg.get_nvl_buffer_size_hint(hidden_bytes, n))
            rdma = max(rdma, cfg.get_rdma_buffer_size_hint(hidden_bytes, n))
        b = self.buffer
        if b is None or b.num_nvl_bytes < nvl or b.num_rdma_bytes < rdma:
            self.buffer = Buffer(self.group, nvl, rdma)
        return self.buffer


class _Dispatch(torch.autograd.Function):
    """DeepEP dispatch of ``x`` and ``topk_weights``; backward: combine of their gradients."""

    @staticmethod
    def forward(ctx, x, topk_weights, buf, topk_idx, layout, async_finish, out: dict):
        per_rank, per_rdma, per_expert, in_rank = layout
        recv_x, recv_idx, recv_w, _, handle, event = buf.dispatch(
            x,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            async_finish=async_finish,
        )
        out.update(recv_idx=recv_idx, handle=handle, event=event)
        ctx.buf, ctx.handle, ctx.recv_shape = buf, handle, (recv_x.shape, recv_x.dtype, recv_x.device)
        return recv_x, recv_w

    @staticmethod
    def backward(ctx, grad_x, grad_w):
        if grad_x is None:
            shape, dtype, device = ctx.recv_shape
            grad_x = torch.zeros(shape, dtype=dtype, device=device)
        gx, gw, _ = ctx.buf.combine(
            grad_x.contiguous(),
            ctx.handle,
            topk_weights=None if grad_w is None else grad_w.contiguous(),
            async_finish=False,
        )
        return gx, gw, None, None, None, None, None


class _Combine(torch.autograd.Function):
    """DeepEP combine of per-token rows ``z``; backward: the cached dispatch of the gradient."""

    @staticmethod
    def forward(ctx, z, buf, handle, async_finish, out: dict):
        combined, _, event = buf.combine(z, handle, async_finish=async_finish)
        out["event"] = event
        ctx.buf, ctx.handle = buf, handle
        return combined

    @staticmethod
    def backward(ctx, grad):
        grad_z = ctx.buf.dispatch(grad.contiguous(), handle=ctx.handle, async_finish=False)[0]
        return grad_z, None, None, None, None


@dataclass
class DeepEPHandle:
    """What :meth:`DeepEPDispatcher.dispatch` hands to combine.

    Attributes:
        ep_handle: DeepEP's own handle (the layout of the exchange).
        recv_token: [M] received row of each expert row; n_recv: R, rows received; n_tokens: N, source tokens.
        recv_weights: [M, 1] gate value of each expert row (with gradient).
        n_self: received rows that came from this rank itself (they do not cross the network).
    """

    ep_handle: object
    recv_token: torch.Tensor
    n_recv: int
    n_tokens: int
    recv_weights: torch.Tensor
    n_self: int = 0


@dataclass
class _Pending(DispatchState):
    """A started dispatch: ``send_x`` [N, d] and ``meta`` [N, K] (FP32 gate weights) are what DeepEP sent;
    ``recv_x`` [R, d], ``recv_w`` [R, K], ``recv_idx`` [R, K] what it is receiving."""

    recv_x: torch.Tensor
    recv_w: torch.Tensor
    recv_idx: torch.Tensor
    ep_handle: object
    event: object
    n_tokens: int
    n_self: int


@dataclass
class _PendingCombine(CombineState):
    """A started combine of ``z`` [R, d] into ``combined`` [N, d] (``back``: its leaf after a ``cut`` wait)."""

    combined: torch.Tensor
    event: object


@dataclass
class _PendingGrad:
    """Gradients on their way back (backward of a cut exchange)."""

    tensors: tuple
    event: object


def _wait(event) -> None:
    if event is not None:
        event.current_stream_wait()


class DeepEPDispatcher(DispatchInHalves):
    """Dispatch/combine with DeepEP's kernels (see the module docstring); same interface as AllToAllDispatcher.

    Args:
        group: the expert-parallel process group (NCCL); ep: its size; ep_rank: this rank's index in it.
        n_experts: N_r, all routed experts (this rank holds ``N_r / ep``, a contiguous block).
        buffer: the model's shared :class:`DeepEPBuffer` (one is made when not given).
        fp8: refused (FP8 payloads are not wired to DeepEP here).
        ranks_per_node: ranks of one node, to count the nodes a token reaches.
    """

    def __init__(
        self,
        group,
        ep: int,
        ep_rank: int,
        n_experts: int,
        *,
        buffer: DeepEPBuffer | None = None,
        fp8: bool = False,
        ranks_per_node: int | None = None,
    ) -> None:
        if fp8:
            raise ConfigError(
                "--dispatcher deepep does not carry FP8 dispatch payloads in this version; "
                "use --dispatcher alltoall with --fp8"
            )
        self.group, self.ep, self.ep_rank = group, ep, ep_rank
        self.n_experts, self.n_local = n_experts, local_experts(n_experts, ep)
        self.buffer = buffer if buffer is not None else DeepEPBuffer(group)
        self.ranks_per_node = node_size(ranks_per_node, ep)
        self.stats = CommStats()

    def dispatch_start(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, *, meanwhile=None
    ) -> _Pending:
        """Compute the layout and start DeepEP's dispatch (``async_finish=True``); ``meanwhile``: a callable run
        while the tokens are in flight (the cut MoE of the FB overlap runs its shared experts there)."""
        buf = self.buffer.get(x)
        idx = topk_idx.to(getattr(self.buffer.deep_ep, "topk_idx_t", torch.int64)).contiguous()  # DeepEP's index type
        per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, self.n_experts)
        out: dict = {}
        send_x, meta = x.contiguous(), topk_weights.float().contiguous()
        recv_x, recv_w = _Dispatch.apply(send_x, meta, buf, idx, (per_rank, per_rdma, per_expert, in_rank), True, out)
        n = x.shape[0]
        with torch.no_grad():
            sent, n_self = int(in_rank.sum()), int(in_rank[:, self.ep_rank].sum())
            self.stats.tokens += n
            self.stats.ranks_reached += sent
            self.stats.nodes_reached += int(in_rank.view(n, -1, self.ranks_per_node).any(dim=-1).sum())
            self.stats.bytes_sent += (sent - n_self) * x.shape[1] * x.element_size()
        if meanwhile is not None:
            meanwhile()
        return _Pending(
            recv_x, recv_w, out["recv_idx"], out["handle"], out["event"], n, n_self, send_x=send_x, meta=meta
        )

    def dispatch_wait(self, p: _Pending, *, cut: bool = False):
        """Finish a dispatch: ``(recv_x [M, d], counts [N_r/ep], handle)`` with rows sorted by local expert.

        ``cut``: the received tensors become the leaves ``p.recv`` / ``p.recv_meta`` instead of staying linked
        to ``x`` through autograd; their gradients go back with :meth:`dispatch_backward_start` / ``_wait``.
        """
        _wait(p.event)
        recv_x, recv_w = p.recv_x, p.recv_w
        if cut:
            recv_x = p.recv = cut_leaf(recv_x, p.send_x)
            recv_w = p.recv_meta = cut_leaf(recv_w, p.meta)
        with torch.no_grad():
            recv_token, pos, counts = expand_to_local_experts(p.recv_idx.long(), self.n_local)
        recv_weights = recv_w.reshape(-1).index_select(0, pos).unsqueeze(-1)
        handle = DeepEPHandle(p.ep_handle, recv_token, recv_x.shape[0], p.n_tokens, recv_weights, p.n_self)
        return recv_x.index_select(0, recv_token), counts, handle

    def combine_start(self, y: torch.Tensor, handle: DeepEPHandle) -> _PendingCombine:
        """Sum each received token's local expert outputs ``y`` [M, d]; start DeepEP's combine."""
        z = combine(y, handle.recv_token, handle.n_recv)  # [R, d], one row per received token
        out: dict = {}
        combined = _Combine.apply(z.contiguous(), self.buffer.get(z), handle.ep_handle, True, out)
        self.stats.bytes_sent += (handle.n_recv - handle.n_self) * z.shape[1] * z.element_size()
        return _PendingCombine(combined, out["event"], z=z, handle=handle)

    def combine_wait(self, p: _PendingCombine, *, cut: bool = False) -> torch.Tensor:
        """Finish a combine: ``out`` [N, d], each token's expert outputs summed over ranks (``cut``: as the leaf
        ``p.back``, whose gradient goes back with :meth:`combine_backward_start` / ``_wait``)."""
        _wait(p.event)
        if cut:
            p.back = cut_leaf(p.combined, p.z)
            return p.back
        return p.combined

    # ---------------------------------------------- backward of cut exchanges (the FB overlap's protocol)
    def combine_backward_start(self, p: _PendingCombine) -> _PendingGrad:
        """Start sending ``p.back.grad`` [N, d] to the ranks that computed the expert sums (a cached dispatch)."""
        grad = leaf_grad(p.back).contiguous()
        p.back = None
        with torch.no_grad():
            g, _, _, _, _, event = self.buffer.get(grad).dispatch(grad, handle=p.handle.ep_handle, async_finish=True)
        return _PendingGrad((g,), event)

    @staticmethod
    def combine_backward_wait(pending: _PendingGrad) -> torch.Tensor:
        """The gradient of the combined rows ``p.z`` [R, d]."""
        _wait(pending.event)
        return pending.tensors[0]

    def dispatch_backward_start(self, p: _Pending) -> _PendingGrad:
        """Start sending the gradients of the received leaves (``p.recv`` [R, d], ``p.recv_meta`` [R, K]) back to
        the tokens' ranks (a combine, which sums each token's gradients over the ranks it went to)."""
        gx, gw = leaf_grad(p.recv).contiguous(), leaf_grad(p.recv_meta).contiguous()
        p.recv = p.recv_meta = None
        with torch.no_grad():
            x, w, event = self.buffer.get(gx).combine(gx, p.ep_handle, topk_weights=gw, async_finish=True)
        return _PendingGrad((x, w), event)

    @staticmethod
    def dispatch_backward_wait(pending: _PendingGrad) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradients of the sent tokens ``p.send_x`` [N, d] and gate weights ``p.meta`` [N, K]."""
        _wait(pending.event)
        return pending.tensors


__all__ = ["DeepEPBuffer", "DeepEPDispatcher", "DeepEPHandle", "check_deepep"]
