"""Expert-parallel token dispatchers: backends of :class:`dsv3.model.moe.Dispatcher` (report 2.1.2, 3.2.2).

Backends (``--dispatcher``): ``local`` (:class:`~dsv3.model.moe.LocalDispatcher`, one process);
``alltoall`` (:class:`AllToAllDispatcher`: ``all_to_all_single`` with uneven, also empty, splits over
the expert-parallel group; a token travels once to each destination rank, which expands it to its
local experts; payloads travel as raw bytes, E4M3 with power-of-two 1x128 scales under ``fp8``);
``deepep`` (:class:`dsv3.parallel.deepep.DeepEPDispatcher`, only where ``deep_ep`` and CUDA exist).
:func:`shard_experts` applies expert parallelism to a built model; :func:`comm_stats` sums the
:class:`~dsv3.model.exchange.CommStats` of its dispatchers. The exchange protocol, its autograd and FP8
rules are described in docs/parallel.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from dsv3.errors import ConfigError
from dsv3.fp8.comm import FP8Payload, quantize_for_dispatch
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
from dsv3.model.moe import DispatchInHalves, Experts, LocalDispatcher, MoE, combine
from dsv3.parallel.deepep import DeepEPBuffer, DeepEPDispatcher, check_deepep

BACKENDS = ("auto", "local", "alltoall", "deepep")


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A 2-D tensor [S, C] as its raw bytes [S, C * itemsize] (gloo cannot carry float8 or some dtypes)."""
    t = t.contiguous()
    return t if t.dtype == torch.uint8 else t.view(torch.uint8)


class _Exchange:
    """One asynchronous all-to-all of row blocks: rank r's rows ``in_splits[j]`` go to rank j.

    ``stream``: on CUDA, the communication stream the exchange is issued on (it first waits for the
    compute stream that produced ``t``; :meth:`wait` makes the compute stream wait for it). None on CPU.
    """

    def __init__(
        self,
        t: torch.Tensor,
        in_splits: list[int],
        out_splits: list[int],
        group,
        stats: CommStats,
        self_index: int,
        stream=None,
    ) -> None:
        self.dtype, self.cols = t.dtype, t.shape[1]
        self.raw = raw = _as_bytes(t)  # held until wait: the send buffer must outlive the exchange
        self.out = raw.new_empty(sum(out_splits), raw.shape[1])
        self.stream = stream
        if stream is None:
            self.work = dist.all_to_all_single(self.out, raw, out_splits, in_splits, group=group, async_op=True)
        else:  # pragma: no cover - needs CUDA (not run in this CPU build)
            stream.wait_stream(torch.cuda.current_stream(raw.device))
            with torch.cuda.stream(stream):
                self.work = dist.all_to_all_single(self.out, raw, out_splits, in_splits, group=group, async_op=True)
            raw.record_stream(stream)
            self.out.record_stream(stream)
        stats.bytes_sent += (sum(in_splits) - in_splits[self_index]) * raw.shape[1]

    def wait(self) -> torch.Tensor:
        self.work.wait()
        if self.stream is not None:  # pragma: no cover - needs CUDA
            torch.cuda.current_stream(self.out.device).wait_stream(self.stream)
        self.raw = None
        out = self.out
        return out if self.dtype == torch.uint8 else out.view(self.dtype)


class _PendingRows:
    """An exchange started by :meth:`AllToAllDispatcher.exchange_start`; :meth:`wait` returns the received
    rows [sum(out_splits), C] in the sent dtype (dequantised when they travelled as FP8)."""

    def __init__(self, exchange: _Exchange, fp8: bool, cols: int, dtype: torch.dtype) -> None:
        self.exchange, self.fp8, self.cols, self.dtype = exchange, fp8, cols, dtype

    def wait(self) -> torch.Tensor:
        raw = self.exchange.wait()
        return _fp8_unpack(raw, self.cols, self.dtype) if self.fp8 else raw


def _exchange(t, in_splits, out_splits, group, stats, self_index) -> torch.Tensor:
    return _Exchange(t, in_splits, out_splits, group, stats, self_index).wait()


class _Linked(torch.autograd.Function):
    """Connects an exchanged tensor to the tensor it came from, for autograd.

    The forward exchange already happened (asynchronously); this node only returns it. Its
    backward sends the gradient back along the reversed splits (quantised to FP8 when
    ``spec["grad_fp8"]``).
    """

    @staticmethod
    def forward(ctx, source: torch.Tensor, spec: dict) -> torch.Tensor:
        ctx.spec = spec
        return spec.pop("received")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        s = ctx.spec
        grad = grad.contiguous()
        if s["grad_fp8"]:
            back = _fp8_exchange(grad, s["out_splits"], s["in_splits"], s["group"], s["stats"], s["self_index"])
        else:
            back = _exchange(grad, s["out_splits"], s["in_splits"], s["group"], s["stats"], s["self_index"])
        return back.to(s["source_dtype"]), None


def _link(
    source: torch.Tensor,
    received: torch.Tensor,
    in_splits,
    out_splits,
    group,
    stats,
    self_index,
    grad_fp8: bool = False,
) -> torch.Tensor:
    if not (torch.is_grad_enabled() and source.requires_grad):
        return received
    spec = {
        "received": received,
        "in_splits": in_splits,
        "out_splits": out_splits,
        "group": group,
        "stats": stats,
        "self_index": self_index,
        "grad_fp8": grad_fp8,
        "source_dtype": source.dtype,
    }
    return _Linked.apply(source, spec)


def _fp8_pack(x: torch.Tensor) -> torch.Tensor:
    """[S, d] -> uint8 [S, D_p + D_p/128]: E4M3 bytes then UE8M0 scale bytes (1x128 tiles)."""
    p = quantize_for_dispatch(x)
    return torch.cat([p.data.view(torch.uint8), p.scale], dim=1)


def _fp8_unpack(raw: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    d_p = raw.shape[1] * 128 // 129
    data = raw[:, :d_p].contiguous().view(torch.float8_e4m3fn)
    return FP8Payload(data, raw[:, d_p:].contiguous(), dim).dequantize(dtype)


def _fp8_exchange(t, in_splits, out_splits, group, stats, self_index) -> torch.Tensor:
    """Quantise rows to E4M3 + power-of-two scales, exchange the bytes, dequantise (no autograd)."""
    raw = _exchange(_fp8_pack(t), in_splits, out_splits, group, stats, self_index)
    return _fp8_unpack(raw, t.shape[1], t.dtype)


@dataclass
class AllToAllHandle:
    """What :meth:`AllToAllDispatcher.dispatch` hands to combine.

    Attributes:
        send_token: [S] source token of each sent row (rows grouped by destination rank).
        send_splits: rows sent to each rank; recv_splits: rows received from each rank.
        recv_token: [M] received row of each dispatched expert row (rows sorted by local expert).
        n_recv: R, rows received.
        n_tokens: N, source tokens.
        recv_weights: [M, 1] gate value of each expert row (with gradient).
    """

    send_token: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    recv_token: torch.Tensor
    n_recv: int
    n_tokens: int
    recv_weights: torch.Tensor


@dataclass
class _PendingDispatch(DispatchState):
    """A started dispatch: the two exchanges in flight and what combine and the cut backward need."""

    x_exchange: _Exchange
    meta_exchange: _Exchange
    x: torch.Tensor
    send_token: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    n_tokens: int


@dataclass
class _PendingCombine(CombineState):
    """A started combine: the exchange in flight (``z`` [R, d]; ``back`` [S, d] after a ``cut`` wait)."""

    exchange: _Exchange


class AllToAllDispatcher(DispatchInHalves):
    """Dispatch/combine over ``torch.distributed.all_to_all_single`` (see the module docstring).

    Args:
        group: the expert-parallel process group (``ep`` consecutive ranks).
        ep: its size; ep_rank: this rank's index in it.
        n_experts: N_r, all routed experts (this rank holds ``N_r / ep`` of them, a contiguous block).
        fp8: send dispatch payloads (and the backward gradient before the down-projection) as E4M3.
        ranks_per_node: ranks of one node (to count the nodes a token reaches).
    """

    def __init__(
        self, group, ep: int, ep_rank: int, n_experts: int, *, fp8: bool = False, ranks_per_node: int | None = None
    ) -> None:
        self.group, self.ep, self.ep_rank = group, ep, ep_rank
        self.n_experts, self.n_local = n_experts, local_experts(n_experts, ep)
        self.fp8 = fp8
        self.ranks_per_node = node_size(ranks_per_node, ep)
        self.stats = CommStats()
        self.stream = None  # the CUDA communication stream, made on first use on a CUDA device

    def _stream_for(self, device: torch.device):
        """The stream exchanges are issued on: None on CPU, this dispatcher's own CUDA stream on GPU."""
        if device.type != "cuda":
            return None
        if self.stream is None:  # pragma: no cover - needs CUDA
            self.stream = torch.cuda.Stream(device)
        return self.stream  # pragma: no cover

    def exchange_start(
        self, rows: torch.Tensor, in_splits: list[int], out_splits: list[int], *, fp8: bool = False
    ) -> _PendingRows:
        """Start an all-to-all of ``rows`` [S, C] (rows ``in_splits[j]`` to rank j; ``sum(out_splits)`` rows
        arrive), quantised to E4M3 with power-of-two 1x128 scales when ``fp8``; no autograd. The backward
        of a cut exchange is this with the forward's splits swapped."""
        rows = rows.detach().contiguous()
        payload = _fp8_pack(rows) if fp8 else rows
        ex = _Exchange(
            payload, in_splits, out_splits, self.group, self.stats, self.ep_rank, self._stream_for(rows.device)
        )
        return _PendingRows(ex, fp8, rows.shape[1], rows.dtype)

    # ------------------------------------------------------------------ dispatch
    def dispatch_start(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, *, meanwhile=None
    ) -> _PendingDispatch:
        """Route ``x`` [N, d]: count, exchange the counts (one small all-to-all, waited here), start the payloads.

        ``meanwhile``: a callable run while the counts are in flight (the cut MoE runs its shared experts there).
        """
        n, k = topk_idx.shape
        with torch.no_grad():
            dest = topk_idx // self.n_local  # [N, K] destination rank of each choice
            mask = torch.zeros(n, self.ep, dtype=torch.bool, device=x.device)
            mask.scatter_(1, dest, True)  # token t goes to rank r (once, however many experts it picks there)
            rank_of_row, send_token = mask.t().nonzero(as_tuple=True)  # rows grouped by destination rank
            send_counts = mask.sum(dim=0)
            recv_counts = torch.empty_like(send_counts)
            counts_work = dist.all_to_all_single(recv_counts, send_counts, group=self.group, async_op=True)
        if meanwhile is not None:
            meanwhile()
        counts_work.wait()
        with torch.no_grad():
            send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
            self.stats.tokens += n
            self.stats.ranks_reached += int(mask.sum())
            nodes = mask.view(n, -1, self.ranks_per_node).any(dim=-1)
            self.stats.nodes_reached += int(nodes.sum())
            here = dest.index_select(0, send_token) == rank_of_row.unsqueeze(1)  # [S, K] choices on that rank
            local_id = torch.where(
                here,
                topk_idx.index_select(0, send_token) - rank_of_row.unsqueeze(1) * self.n_local,
                torch.full_like(topk_idx[:1], -1).expand(len(send_token), k),
            )
        wdtype = torch.promote_types(topk_weights.dtype, torch.float32)  # gate values stay at least FP32
        send_w = topk_weights.to(wdtype).index_select(0, send_token) * here
        meta = torch.cat([send_w, local_id.to(wdtype)], dim=1)  # [S, 2K]: gate values, local ids (-1: elsewhere)
        send_x = x.index_select(0, send_token)
        payload = _fp8_pack(send_x) if self.fp8 else send_x
        stream = self._stream_for(x.device)
        return _PendingDispatch(
            x_exchange=_Exchange(payload, send_splits, recv_splits, self.group, self.stats, self.ep_rank, stream),
            meta_exchange=_Exchange(
                meta.detach(), send_splits, recv_splits, self.group, self.stats, self.ep_rank, stream
            ),
            x=x,
            meta=meta,
            send_x=send_x,
            send_token=send_token,
            send_splits=send_splits,
            recv_splits=recv_splits,
            n_tokens=n,
        )

    def dispatch_wait(self, p: _PendingDispatch, *, cut: bool = False):
        """Finish a dispatch: returns ``(recv_x [M, d], counts [N_r/ep], handle)``.

        ``cut``: instead of linking the received tensors to the sent ones through autograd (whose backward
        then exchanges synchronously), keep them as leaves ``p.recv`` / ``p.recv_meta``; the caller sends their
        gradients back with :meth:`dispatch_backward_start` / :meth:`dispatch_backward_wait`.
        """
        raw = p.x_exchange.wait()
        recv = _fp8_unpack(raw, p.x.shape[1], p.x.dtype) if self.fp8 else raw
        meta = p.meta_exchange.wait()
        if cut:
            recv = p.recv = cut_leaf(recv, p.send_x)
            meta = p.recv_meta = cut_leaf(meta, p.meta)
        else:
            recv = _link(p.send_x, recv, p.send_splits, p.recv_splits, self.group, self.stats, self.ep_rank)
            meta = _link(p.meta, meta, p.send_splits, p.recv_splits, self.group, self.stats, self.ep_rank)
        k = meta.shape[1] // 2
        with torch.no_grad():
            recv_token, pos, counts = expand_to_local_experts(meta[:, k:].detach().long(), self.n_local)
        recv_weights = meta[:, :k].reshape(-1).index_select(0, pos).unsqueeze(-1)
        handle = AllToAllHandle(
            p.send_token, p.send_splits, p.recv_splits, recv_token, recv.shape[0], p.n_tokens, recv_weights
        )
        return recv.index_select(0, recv_token), counts, handle

    # ------------------------------------------------------------------- combine
    def combine_start(self, y: torch.Tensor, handle: AllToAllHandle) -> _PendingCombine:
        """Sum each received token's local expert outputs ``y`` [M, d] and start sending them back."""
        z = combine(y, handle.recv_token, handle.n_recv)  # [R, d], one row per received token
        ex = _Exchange(
            z.detach(),
            handle.recv_splits,
            handle.send_splits,
            self.group,
            self.stats,
            self.ep_rank,
            self._stream_for(z.device),
        )
        return _PendingCombine(ex, z=z, handle=handle)

    def combine_wait(self, p: _PendingCombine, *, cut: bool = False) -> torch.Tensor:
        """Finish a combine: returns ``out`` [N, d], the sum over ranks of each token's expert outputs.

        ``cut``: keep the received rows as the leaf ``p.back`` (see :meth:`dispatch_wait`); their gradient
        goes back with :meth:`combine_backward_start` / :meth:`combine_backward_wait`.
        """
        back = p.exchange.wait()
        if cut:
            back = p.back = cut_leaf(back, p.z)
        else:
            back = _link(
                p.z,
                back,
                p.handle.recv_splits,
                p.handle.send_splits,
                self.group,
                self.stats,
                self.ep_rank,
                grad_fp8=self.fp8,
            )
        return combine(back, p.handle.send_token, p.handle.n_tokens)

    # ---------------------------------------------- backward of cut exchanges
    def combine_backward_start(self, p: _PendingCombine) -> _PendingRows:
        """Start sending ``p.back.grad`` [S, d] back to the ranks that computed the expert outputs (the
        combine's splits swapped; E4M3 when ``fp8``: the gradient before the down-projection)."""
        grad = leaf_grad(p.back)
        p.back = None
        return self.exchange_start(grad, p.handle.send_splits, p.handle.recv_splits, fp8=self.fp8)

    @staticmethod
    def combine_backward_wait(pending: _PendingRows) -> torch.Tensor:
        """The gradient of the combined rows ``p.z`` [R, d] (in the activation dtype)."""
        return pending.wait()

    def dispatch_backward_start(self, p: _PendingDispatch) -> tuple[_PendingRows, _PendingRows]:
        """Start sending the gradients of the received leaves (``p.recv`` [R, d], ``p.recv_meta`` [R, 2K]) back
        to the tokens' ranks (the dispatch's splits swapped; in the activation precision)."""
        grads = leaf_grad(p.recv), leaf_grad(p.recv_meta)
        p.recv = p.recv_meta = None
        return tuple(self.exchange_start(g, p.recv_splits, p.send_splits) for g in grads)

    @staticmethod
    def dispatch_backward_wait(pending: tuple[_PendingRows, _PendingRows]) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradients of the sent rows ``p.send_x`` [S, d] and gate/expert metadata ``p.meta`` [S, 2K]."""
        return pending[0].wait(), pending[1].wait()


def resolve_backend(name: str, ep: int, device: torch.device) -> str:
    """``auto`` -> ``alltoall`` for ep > 1, else ``local``; ``deepep`` only when asked for (and runnable)."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown dispatcher {name!r}; use one of {', '.join(BACKENDS)}")
    if name == "deepep":
        check_deepep(device)
    if name == "auto":
        if ep == 1:
            return "local"
        return "alltoall"
    if name == "local" and ep > 1:
        raise ConfigError(f"--dispatcher local cannot run with --ep {ep} (experts on other ranks); use alltoall")
    return name


def shard_experts(
    model: torch.nn.Module, ctx, *, dispatcher: str = "auto", fp8: bool = False, ranks_per_node: int | None = None
) -> torch.nn.Module:
    """Expert parallelism as a transformation of a built model (in place; returns it).

    Each MoE layer keeps only this rank's contiguous block of experts (global experts
    ``[ep_rank * N_r/ep, (ep_rank+1) * N_r/ep)``), created directly at the local size on the
    layer's device, and gets a dispatcher of the chosen backend. On the ``meta`` device (the
    set-up of :func:`dsv3.parallel.parallelize.parallelize`) nothing is allocated: the block is
    initialised later from the per-expert seeds; a materialised layer's block takes its values
    from the full layer (so they equal one process's). Router, shared experts and all dense
    parameters stay replicated.
    """
    backend = resolve_backend(dispatcher, ctx.ep, ctx.device)
    shared = None  # deepep: one DeepEP buffer for every layer
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        if backend == "local":
            moe.dispatcher = LocalDispatcher(moe.n_experts)
            continue
        start, end = ctx.expert_block(moe.n_experts)
        old = moe.experts
        if old.gate_up_proj.shape[0] == moe.n_experts:  # not sharded yet
            with torch.device(old.gate_up_proj.device):
                new = Experts(end - start, old.gate_up_proj.shape[2], old.down_proj.shape[2], expert_offset=start)
            new = new.to(dtype=old.gate_up_proj.dtype)
            if not old.gate_up_proj.is_meta:
                with torch.no_grad():
                    new.gate_up_proj.copy_(old.gate_up_proj[start:end])
                    new.down_proj.copy_(old.down_proj[start:end])
            new.mm, new.act = old.mm, old.act
            moe.experts = new
        if backend == "deepep":
            shared = shared or DeepEPBuffer(ctx.ep_group)
            moe.dispatcher = DeepEPDispatcher(
                ctx.ep_group,
                ctx.ep,
                ctx.ep_rank,
                moe.n_experts,
                buffer=shared,
                fp8=fp8,
                ranks_per_node=ranks_per_node or getattr(ctx, "ranks_per_node", None),
            )
        else:
            moe.dispatcher = AllToAllDispatcher(
                ctx.ep_group,
                ctx.ep,
                ctx.ep_rank,
                moe.n_experts,
                fp8=fp8,
                ranks_per_node=ranks_per_node or getattr(ctx, "ranks_per_node", None),
            )
    return model


def comm_stats(model: torch.nn.Module, *, reset: bool = True) -> CommStats:
    """The summed :class:`CommStats` of every dispatcher of ``model`` (then reset them)."""
    total = CommStats()
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        s = getattr(moe.dispatcher, "stats", None)
        if s is None:
            continue
        total.bytes_sent += s.bytes_sent
        total.tokens += s.tokens
        total.ranks_reached += s.ranks_reached
        total.nodes_reached += s.nodes_reached
        if reset:
            s.reset()
    return total
