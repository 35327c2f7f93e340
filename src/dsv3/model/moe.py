"""DeepSeekMoE (report 2.1.2): shared experts plus fine-grained routed experts.

    h'_t = u_t + sum_{i=1}^{N_s} FFN^(s)_i(u_t) + sum_{i=1}^{N_r} g_{i,t} FFN^(r)_i(u_t)

Gating: s_{i,t} = sigmoid(u_t . e_i); top-K_r of s + b within the allowed groups; g = normalised s times
``routed_scaling_factor``; the bias b_i only ranks (V2-style softmax configs too). Tokens move through a
:class:`Dispatcher` (the protocol every backend follows; ``dispatch(x, topk_idx, topk_weights) -> (recv_x, counts, handle)``, ``combine(y, handle)``;
:class:`LocalDispatcher` in one process). Loads and balance losses go into a :class:`RoutingStats`
passed down the forward. Balancing: the aux-loss-free bias update (:meth:`MoE.update_bias`) and the
sequence-wise balance loss (:func:`sequence_balance_loss`); gamma and alpha are arguments (the trainer's):
``update_bias(load, gamma)``, ``RoutingStats(alpha)``. Details: docs/model.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model.exchange import CombineState, DispatchState, cut_leaf, leaf_grad
from dsv3.model.ops import combine, grouped_mm, swiglu


class MLP(nn.Module):
    """SwiGLU feed-forward ``down(act(gate(x), up(x)))``; the dense layers and the shared experts.

    Args:
        dim: d. inter_dim: the hidden width.
    ``act`` is a swappable callable (FP8 caching and recomputation replace it).
    """

    def __init__(self, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)
        self.act = swiglu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x), self.up_proj(x)))


class Router(nn.Module):
    """Top-K_r expert selection with group limits (the MoE ``gate``). Computed in FP32.

    Parameters: ``weight`` [N_r, d] (the expert centroids e_i); buffer
    ``e_score_correction_bias`` [N_r] (b_i, FP32, only for ``noaux_tc``).

    ``route_override`` (None by default) is a seam for reinforcement learning
    (:mod:`dsv3.train.rollout`): a callable given the selected experts [N, K_r] that returns the
    experts to use instead (the same tensor to only record them; the rollout's choice for
    routing replay). The gate values g are then gathered for the returned experts.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group if config.group_limited else 1
        self.topk_group = config.topk_group if config.group_limited else 1
        self.topk_method = config.topk_method
        self.scoring_func = config.scoring_func
        self.norm_topk_prob = config.norm_topk_prob
        self.route_scale = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))
        if self.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        self.route_override = None

    def _apply(self, fn, recurse=True):
        # The bias accumulates updates of size gamma = 1e-3: keep it in FP32 whatever the model dtype.
        super()._apply(fn, recurse)
        if self.e_score_correction_bias is not None and self.e_score_correction_bias.dtype != torch.float32:
            self.e_score_correction_bias = self.e_score_correction_bias.float()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route ``x`` [N, d].

        Returns:
            weights [N, K_r] (FP32 gate values g), indices [N, K_r] (selected experts),
            scores [N, N_r] (FP32 s_{i,t}, with gradient; used by the balance loss).
        """
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        with torch.no_grad():
            choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
            if self.n_group > 1:
                grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
                if self.topk_method == "noaux_tc":
                    group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
                else:
                    group_scores = grouped.amax(dim=-1)
                keep = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
                mask = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
                choice = grouped.masked_fill(mask.unsqueeze(-1), float("-inf")).view(-1, self.n_experts)
            indices = choice.topk(self.top_k, dim=-1, sorted=False).indices
            if self.route_override is not None:
                indices = self.route_override(indices)
        weights = scores.gather(1, indices)
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.route_scale, indices, scores


class Experts(nn.Module):
    """N_r routed SwiGLU experts with stacked weights, computed as grouped GEMMs.

    Parameters: ``gate_up_proj`` [N_r, 2I, d] (gate rows first, then up) and
    ``down_proj`` [N_r, d, I]. ``mm`` (grouped GEMM) and ``act`` (SwiGLU) are
    swappable callables. Under expert parallelism a rank holds the contiguous block of
    global experts ``expert_offset .. expert_offset + n_experts - 1``.
    """

    def __init__(self, n_experts: int, dim: int, inter_dim: int, expert_offset: int = 0) -> None:
        super().__init__()
        self.expert_offset = expert_offset
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * inter_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        self.mm = grouped_mm
        self.act = swiglu

    def forward(self, x: torch.Tensor, offs: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Expert outputs for ``x`` [M, d] (rows sorted by expert; ``offs`` [N_r] int32 cumulative row ends),
        each row scaled by its gate value ``weights`` [M, 1] when given. Returns [M, d]."""
        gate, up = self.mm(x, self.gate_up_proj, offs).chunk(2, dim=-1)
        return self.mm(self.act(gate, up, weights), self.down_proj, offs)


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, alpha: float) -> torch.Tensor:
    """The complementary sequence-wise balance loss of report eq. (17)-(20).

    L_Bal = alpha * sum_i f_i P_i with f_i = N_r / (K_r T) * #{t : i selected for t},
    P_i = (1/T) sum_t s'_{i,t}, s'_{i,t} = s_{i,t} / sum_j s_{j,t}; averaged over sequences.

    Args:
        scores: [B, T, N_r] affinity scores s (with gradient).
        indices: [B, T, K_r] selected experts.
        alpha: the balance factor.
    """
    bsz, seqlen, n_experts = scores.shape
    top_k = indices.shape[-1]
    p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # [B, N_r]
    counts = torch.zeros(bsz, n_experts, device=scores.device, dtype=scores.dtype)
    counts.scatter_add_(1, indices.reshape(bsz, -1), torch.ones_like(indices.reshape(bsz, -1), dtype=scores.dtype))
    f = counts * (n_experts / (top_k * seqlen))
    return alpha * (f * p).sum(dim=-1).mean()


@runtime_checkable
class Dispatcher(Protocol):
    """How an MoE layer moves tokens to its routed experts and back (report 2.1.2, 3.2.2; DeepEP-shaped).

    Symbols: N tokens of this rank, d hidden size, K = K_r experts per token, E = N_r / ep experts held here,
    M rows dispatched to them (one per (token, local expert)), S rows sent, R rows received (one per
    (token, destination rank)). One round trip::

        recv_x, counts, handle = dispatch(x [N, d], topk_idx [N, K], topk_weights [N, K])
        y = experts(recv_x [M, d], counts [E], handle.recv_weights [M, 1])   # rows sorted by local expert
        out = combine(y [M, d], handle)                                      # [N, d]

    Each call is also split into a start and a wait half, so that other work (the shared experts, another
    micro-batch) runs while the tokens travel. A ``cut`` wait returns the received tensors as autograd leaves
    instead of linking them to the sent ones; the FB overlap (:mod:`dsv3.parallel.pipeline.overlap`) then
    sends their gradients back itself with the ``*_backward_start`` / ``*_backward_wait`` halves. The start
    halves return a backend's extension of :class:`~dsv3.model.exchange.DispatchState` (``send_x``, ``meta``)
    or :class:`~dsv3.model.exchange.CombineState` (``z``), whose gradients the backward waits return.
    ``group`` is the expert-parallel process group (None when every expert is local: no exchange).
    """

    group: object | None

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> tuple:
        """``x`` [N, d], ``topk_idx`` [N, K] global expert ids, ``topk_weights`` [N, K] gate values g ->
        ``(recv_x [M, d], counts [E] int64, handle)``; ``handle.recv_weights`` [M, 1] is g of each row."""
        ...

    def combine(self, y: torch.Tensor, handle) -> torch.Tensor:
        """Gate-scaled expert outputs ``y`` [M, d] -> ``out`` [N, d], each token's sum over its experts."""
        ...

    def dispatch_start(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, *, meanwhile=None
    ) -> DispatchState:
        """Start :meth:`dispatch`; ``meanwhile``: a callable run while the first exchange is in flight."""
        ...

    def dispatch_wait(self, pending: DispatchState, *, cut: bool = False) -> tuple:
        """Finish a dispatch: ``(recv_x [M, d], counts [E], handle)`` (``cut``: received tensors as leaves)."""
        ...

    def combine_start(self, y: torch.Tensor, handle) -> CombineState:
        """Start :meth:`combine` of ``y`` [M, d]."""
        ...

    def combine_wait(self, pending: CombineState, *, cut: bool = False) -> torch.Tensor:
        """Finish a combine: ``out`` [N, d] (``cut``: the received rows as a leaf)."""
        ...

    def combine_backward_start(self, pending: CombineState) -> object:
        """After a ``cut`` combine's backward: start sending the leaf's gradient back to the senders of ``z``."""
        ...

    def combine_backward_wait(self, started: object) -> torch.Tensor:
        """The gradient of ``pending.z`` [R, d]."""
        ...

    def dispatch_backward_start(self, pending: DispatchState) -> object:
        """After a ``cut`` dispatch's backward: start sending the leaves' gradients back to the tokens' ranks."""
        ...

    def dispatch_backward_wait(self, started: object) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradients of ``pending.send_x`` [S, d] and ``pending.meta`` [S, *]."""
        ...


class DispatchInHalves:
    """:meth:`dispatch` and :meth:`combine` of a :class:`Dispatcher` as their start half, then their wait half
    (mixed into every dispatcher, so that one code path serves the blocking and the overlapped calls)."""

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> tuple:
        """``dispatch_start`` then ``dispatch_wait`` (see :meth:`Dispatcher.dispatch`)."""
        return self.dispatch_wait(self.dispatch_start(x, topk_idx, topk_weights))

    def combine(self, y: torch.Tensor, handle) -> torch.Tensor:
        """``combine_start`` then ``combine_wait`` (see :meth:`Dispatcher.combine`)."""
        return self.combine_wait(self.combine_start(y, handle))


class DispatchHandle:
    """What :meth:`LocalDispatcher.dispatch` hands to :meth:`LocalDispatcher.combine`.

    Attributes:
        token: [M] int64 source token of each dispatched row (rows sorted by expert).
        n_tokens: N, the number of source tokens.
        recv_weights: [M, 1] gate value g of each dispatched row (with gradient).
    """

    __slots__ = ("token", "n_tokens", "recv_weights")

    def __init__(self, token: torch.Tensor, n_tokens: int, recv_weights: torch.Tensor) -> None:
        self.token, self.n_tokens, self.recv_weights = token, n_tokens, recv_weights


@dataclass
class LocalPending(DispatchState):
    """A started local dispatch (nothing travels): ``send_x`` = x [N, d], ``meta`` = topk_weights [N, K], and
    ``topk_idx`` [N, K]."""

    topk_idx: torch.Tensor


class LocalDispatcher(DispatchInHalves):
    """The single-process :class:`Dispatcher`: every expert is local, nothing travels (``group`` None).

    Dispatch copies each token once per selected expert, rows sorted by expert (M = N*K);
    combine sums the (already gate-scaled) expert outputs back into their tokens. The halves exist
    so that every dispatcher has the same protocol: start records the inputs, wait does the work.
    """

    group = None

    def __init__(self, n_experts: int) -> None:
        self.n_experts = n_experts

    def dispatch_start(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, *, meanwhile=None
    ) -> LocalPending:
        """Record ``x`` [N, d], ``topk_idx`` [N, K] (global expert ids), ``topk_weights`` [N, K] (g); run
        ``meanwhile``."""
        if meanwhile is not None:
            meanwhile()
        return LocalPending(topk_idx, send_x=x, meta=topk_weights)

    def dispatch_wait(self, p: LocalPending, *, cut: bool = False):
        """Returns recv_x [M, d] (M = N*K rows sorted by expert), counts [E] int64 rows per expert, and a
        :class:`DispatchHandle` (``cut``: computed from the leaves ``p.recv`` / ``p.recv_meta``)."""
        x, topk_weights = p.send_x, p.meta
        if cut:
            x = p.recv = cut_leaf(x, p.send_x)
            topk_weights = p.recv_meta = cut_leaf(topk_weights, p.meta)
        top_k = p.topk_idx.shape[-1]
        with torch.no_grad():
            flat_idx = p.topk_idx.reshape(-1)
            counts = torch.bincount(flat_idx, minlength=self.n_experts)
            order = flat_idx.argsort(stable=True)  # dispatch order: grouped by expert
            token = order // top_k
        # index_select, not x[token]: its backward (index_add) is deterministic on CPU, while
        # advanced indexing accumulates the duplicated rows in a thread-dependent order.
        recv_weights = topk_weights.reshape(-1).index_select(0, order).unsqueeze(-1)  # g of each row
        return x.index_select(0, token), counts, DispatchHandle(token, x.shape[0], recv_weights)

    def combine_start(self, y: torch.Tensor, handle: DispatchHandle) -> CombineState:
        """Record the expert outputs ``y`` [M, d] (rows as dispatched)."""
        return CombineState(z=y, handle=handle)

    def combine_wait(self, p: CombineState, *, cut: bool = False) -> torch.Tensor:
        """Per-token sums [N, d] (``cut``: of the leaf ``p.back``)."""
        y = p.z
        if cut:
            y = p.back = cut_leaf(y, p.z)
        return combine(y, p.handle.token, p.handle.n_tokens)

    def combine_backward_start(self, p: CombineState) -> torch.Tensor:
        """The gradient of the leaf ``p.back`` [M, d] (nothing to send)."""
        grad, p.back = leaf_grad(p.back), None
        return grad

    @staticmethod
    def combine_backward_wait(grad: torch.Tensor) -> torch.Tensor:
        """The gradient of ``p.z`` [M, d]."""
        return grad

    def dispatch_backward_start(self, p: LocalPending) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradients of the leaves ``p.recv`` [N, d] and ``p.recv_meta`` [N, K] (nothing to send)."""
        grads = leaf_grad(p.recv), leaf_grad(p.recv_meta)
        p.recv = p.recv_meta = None
        return grads

    @staticmethod
    def dispatch_backward_wait(grads: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradients of ``p.send_x`` [N, d] and ``p.meta`` [N, K]."""
        return grads


class RoutingStats:
    """Per-forward MoE statistics, passed down the forward instead of stored on modules.

    Args:
        alpha: the sequence-wise balance factor of this forward (the trainer's; 0: no balance loss).

    Each MoE layer records, under its layer index, the tokens routed to each expert
    (``load`` [N_r] int64) and its sequence-wise balance loss (a scalar with gradient, or
    None). Recording is by key, so a recomputed forward (activation checkpointing) that
    records the same layer again counts its tokens once.
    """

    def __init__(self, alpha: float = 0.0) -> None:
        self.alpha = alpha
        self.load: dict[int, torch.Tensor] = {}
        self.balance: dict[int, torch.Tensor] = {}

    def record(self, layer_idx: int, load: torch.Tensor, balance: torch.Tensor | None) -> None:
        self.load[layer_idx] = load
        if balance is not None:
            self.balance[layer_idx] = balance
        else:
            self.balance.pop(layer_idx, None)


class MoE(nn.Module):
    """A DeepSeekMoE feed-forward layer: ``gate`` (router), ``experts`` (routed), ``shared_experts``.

    Args:
        config: the model configuration.
        layer_idx: the block's index (the key of its statistics in :class:`RoutingStats`).

    ``dispatcher`` is a swappable :class:`Dispatcher` (:class:`LocalDispatcher` by default; expert
    parallelism installs a distributed one and keeps only the local experts in ``experts``).
    When a :class:`RoutingStats` is passed to :meth:`forward`, the layer records its expert
    loads and (in training with ``stats.alpha`` > 0) its balance loss there.
    """

    def __init__(self, config: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.layer_idx = layer_idx
        self.gate = Router(config)
        self.experts = Experts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (
            MLP(config.hidden_size, config.n_shared_experts * config.moe_intermediate_size)
            if config.n_shared_experts > 0
            else None
        )
        self.dispatcher = LocalDispatcher(config.n_routed_experts)

    def forward(self, x: torch.Tensor, stats: RoutingStats | None = None) -> torch.Tensor:
        """``x`` [B, T, d] -> [B, T, d]."""
        bsz, seqlen, dim = x.shape
        flat = x.reshape(-1, dim)
        weights, indices, scores = self.gate(flat)
        recv_x, counts, handle = self.dispatcher.dispatch(flat, indices, weights)
        routed = self.routed(recv_x, counts, handle)
        out = self.dispatcher.combine(routed, handle)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        self.record(stats, scores, indices, bsz, seqlen)
        return out.view(bsz, seqlen, dim)

    # The pieces of :meth:`forward` that a caller cutting the layer at its all-to-alls reuses
    # (dsv3.parallel.pipeline.overlap: the FB op's DISPATCH / MLP / COMBINE components).
    def routed(self, recv_x: torch.Tensor, counts: torch.Tensor, handle) -> torch.Tensor:
        """The local routed experts on dispatched rows ``recv_x`` [M, d] (sorted by expert, ``counts`` rows
        per local expert), each scaled by its gate value ``handle.recv_weights`` [M, 1]. Returns [M, d]."""
        offs = counts.cumsum(0).to(torch.int32)
        return self.experts(recv_x, offs, handle.recv_weights)

    def record(
        self, stats: RoutingStats | None, scores: torch.Tensor, indices: torch.Tensor, bsz: int, seqlen: int
    ) -> None:
        """Record this forward's expert loads [N_r] and (training, ``stats.alpha`` > 0) balance loss L_Bal into ``stats``
        (``scores`` [B*T, N_r], ``indices`` [B*T, K_r]); nothing when ``stats`` is None."""
        if stats is None:
            return
        with torch.no_grad():
            load = torch.bincount(indices.reshape(-1), minlength=self.n_experts)
        balance = None
        if self.training and stats.alpha > 0:
            balance = sequence_balance_loss(scores.view(bsz, seqlen, -1), indices.view(bsz, seqlen, -1), stats.alpha)
        stats.record(self.layer_idx, load, balance)

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, gamma: float) -> None:
        """Auxiliary-loss-free balancing: b_i += gamma * sign(mean load - load_i).

        ``load`` [N_r] is the number of tokens routed to each expert over the whole
        step (all micro-batches). Layers without a bias (softmax routing) are unchanged.
        """
        bias = self.gate.e_score_correction_bias
        if bias is None or gamma == 0:
            return
        load = load.to(bias.device, torch.float32)
        bias.add_(gamma * torch.sign(load.mean() - load))
