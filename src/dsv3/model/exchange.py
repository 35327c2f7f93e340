"""Bookkeeping shared by the token dispatchers (:class:`dsv3.model.moe.Dispatcher` and its backends).

What every dispatcher needs, whatever moves the bytes: the counters of what it moved
(:class:`CommStats`), the layout checks of an expert-parallel group (:func:`local_experts`,
:func:`node_size`), the permutation from per-token rows to per-expert rows
(:func:`expand_to_local_experts`), and the leaves at which the overlap's cut layer stops autograd
(:func:`cut_leaf`, :func:`leaf_grad`), and the fields every started exchange has (:class:`DispatchState`,
:class:`CombineState`). No communication happens here (model/ never imports
torch.distributed); the backends live in :mod:`dsv3.parallel.dispatch` and :mod:`dsv3.parallel.deepep`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv3.errors import ConfigError


@dataclass
class CommStats:
    """Counters of one dispatcher since the last :meth:`reset` (per rank).

    Attributes:
        bytes_sent: payload bytes sent to other ranks by dispatch and combine (forward and backward).
        tokens: tokens dispatched.
        ranks_reached: sum over tokens of the number of ranks each token was sent to.
        nodes_reached: sum over tokens of the number of nodes each token was sent to.
    """

    bytes_sent: int = 0
    tokens: int = 0
    ranks_reached: int = 0
    nodes_reached: int = 0

    def reset(self) -> None:
        self.bytes_sent = self.tokens = self.ranks_reached = self.nodes_reached = 0


@dataclass(kw_only=True)
class DispatchState:
    """A started dispatch, as every dispatcher's pending object extends it (the rest is the backend's own).

    Attributes:
        send_x: [S, d] the rows this rank sent (autograd-linked to the dispatched ``x``).
        meta: [S, *] the gate values (and routing metadata) sent with them (linked to ``topk_weights``).
        recv, recv_meta: after a ``cut`` wait, the received rows and metadata as autograd leaves.
    """

    send_x: torch.Tensor
    meta: torch.Tensor
    recv: torch.Tensor | None = None
    recv_meta: torch.Tensor | None = None


@dataclass(kw_only=True)
class CombineState:
    """A started combine, as every dispatcher's pending object extends it.

    Attributes:
        z: [R, d] the rows this rank sends back (autograd-linked to the expert outputs).
        handle: the dispatch's handle.
        back: after a ``cut`` wait, the received rows as an autograd leaf.
    """

    z: torch.Tensor
    handle: object
    back: torch.Tensor | None = None


def local_experts(n_experts: int, ep: int) -> int:
    """N_r / ep, the routed experts each rank of an expert-parallel group of ``ep`` ranks holds.

    Raises:
        ConfigError: ``ep`` does not divide N_r.
    """
    if n_experts % ep:
        raise ConfigError(f"--ep {ep} does not divide the model's {n_experts} routed experts; pick another ep")
    return n_experts // ep


def node_size(ranks_per_node: int | None, ep: int) -> int:
    """Ranks of one node within the group (to count the nodes a token reaches): ``ranks_per_node`` capped at
    ``ep``; ``ep`` (the group counts as one node) when not given or when nodes do not tile the group."""
    size = min(ranks_per_node or ep, ep)
    return size if ep % size == 0 else ep


def expand_to_local_experts(local_id: torch.Tensor, n_local: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-expert rows from per-token rows.

    Args:
        local_id: [R, K] local expert of each received token's choices, -1 for experts on other ranks.
        n_local: experts on this rank.

    Returns:
        recv_token [M] (the received row of each expert row), pos [M] (its flat index in ``local_id``),
        counts [n_local] (rows per local expert); expert rows sorted by local expert, then by received row.
    """
    k = local_id.shape[1]
    flat = local_id.reshape(-1)
    flat_pos = (flat >= 0).nonzero(as_tuple=True)[0]
    expert = flat.index_select(0, flat_pos)
    order = expert.argsort(stable=True)
    pos = flat_pos.index_select(0, order)
    return pos // k, pos, torch.bincount(expert, minlength=n_local)


def cut_leaf(received: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``received`` as an autograd leaf that requires grad when its ``source`` on the sending side does (the
    graph is cut there; the leaf's ``.grad`` is sent back explicitly)."""
    return received.detach().requires_grad_(torch.is_grad_enabled() and source.requires_grad)


def leaf_grad(leaf: torch.Tensor) -> torch.Tensor:
    """The gradient accumulated into a cut leaf (zeros when nothing used it, e.g. no rows)."""
    return leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
