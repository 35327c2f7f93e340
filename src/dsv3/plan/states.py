"""Model-state bytes on one device: weights, gradients, optimizer states, and the step's transients.

The ZeRO formulas (Rajbhandari et al. 2020, arXiv 1910.02054, section 3), per tensor t held after the
TP / EP / ETP split (n_t, :func:`device_numel`): weights ``n_t w_t`` (/ G_t under ZeRO-3) plus buffers,
gradients ``n_t g`` (/ G_t under ZeRO-2), optimizer ``n_t (2 m + master_t)`` (/ G_t under ZeRO-1), with
w_t the weight format, g the gradient format, m one AdamW moment, master_t the FP32 master copy (none for
an FP32 tensor); G_t is DP for dense tensors and EDP for routed experts (x2 under DualPipe), a flat buffer
padded to a multiple of G_t (:func:`state_bytes`). dsv3's own runtime (:mod:`dsv3.parallel.zero`) cuts each
tensor into dim-0 row chunks instead: for its layouts (:func:`zero1_runtime_applies`) the optimizer is the
busiest DP rank's bytes (:func:`zero1_optimizer_bytes_by_rank`), the flat split kept as ``optimizer_flat``.
Its step also holds, for a moment, bytes that are neither state nor activation (:func:`step_transient_bytes`):
the gradient autograd makes beside an existing ``.grad`` and one all-reduce bucket. Torch-free.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from dsv3.plan.layout import Layout
from dsv3.plan.params import GroupKey, ParamTensor, aggregate
from dsv3.plan.precision import DTYPE_BYTES, Precision

#: Elements of the expert weight-gradient piece dsv3 adds into ``.grad`` at a time (at least one expert; the
#: runtime's ``dsv3.model.ops.WGRAD_PIECE_ELEMS``, checked equal by tests/test_plan_runtime_zero.py).
WGRAD_PIECE_ELEMS = 1 << 22
#: Elements of one all-reduce bucket of dsv3's ZeRO-1 gradient reduction (``dsv3.parallel.zero.REDUCE_BUCKET_ELEMS``).
ZERO1_BUCKET_ELEMS = 1 << 22


def device_numel(t: ParamTensor, layout: Layout) -> int:
    """Elements of tensor ``t`` one device holds after the TP / EP / ETP split (under ``layout.tp_convention``)."""
    return sum(_group_numel(k, v, layout) for k, v in aggregate([t], layout.tp_convention).items())


def _group_numel(key: GroupKey, value: int, layout: Layout) -> int:
    shard, _, rows, cols, _ = key
    if shard == "vocab":  # vocabulary rows padded to a multiple of TP
        return value * math.ceil(rows / layout.tp) * cols
    if shard == "tp":
        return math.ceil(value / layout.tp)
    if shard == "expert":
        return value // (layout.ep * layout.etp)
    return value


def weight_format(kind: str, prec: Precision) -> str:
    """Format of a tensor of ``kind`` (``weight``, ``router``, ``buffer`` or ``wbuffer``)."""
    return {"weight": prec.weights, "router": prec.router, "buffer": "fp32", "wbuffer": prec.weights}[kind]


#: Per-rank lists longer than this stay out of the results and ``--json`` (the busiest rank, min and max stay).
MAX_RANKS_LISTED = 4096


@dataclass(frozen=True)
class RankSpread:
    """The optimizer bytes of dsv3's ZeRO-1 runtime over the DP ranks of one stage (or device).

    Attributes:
        busiest: the DP rank holding the most bytes (the lowest such rank).
        low, high: the fewest and the most bytes a rank holds.
        flat: the flat ``ceil(n / G)`` split of :func:`state_bytes` it replaces.
        by_rank: every DP rank's bytes (``None`` above :data:`MAX_RANKS_LISTED` ranks).
    """

    busiest: int
    low: float
    high: float
    flat: float
    by_rank: tuple[float, ...] | None

    @classmethod
    def of(cls, by_rank: list[float], flat: float) -> "RankSpread":
        high = max(by_rank)
        return cls(
            by_rank.index(high), min(by_rank), high, flat, tuple(by_rank) if len(by_rank) <= MAX_RANKS_LISTED else None
        )


@dataclass
class StateBytes:
    """Model-state bytes of one stage on one device."""

    params: int  # trainable elements held (after the TP/EP split, before ZeRO)
    weights: float
    grads: float
    optimizer: float
    grads_unsharded: float  # gradient bytes before ZeRO-2 sharding (sizes the buckets, the DP reduction)
    expert_grads_unsharded: float  # the part in the EDP group (routed experts; reduced over EDP, the rest over DP)
    largest_unit_weights: float = 0.0  # unsharded weight bytes of the biggest layer (ZeRO-3 gathers it)
    ranks: "RankSpread | None" = None  # dsv3's ZeRO-1 runtime: optimizer is its busiest rank (None: the flat split)
    transients: dict[str, float] = field(default_factory=dict)  # step_transient_bytes (stage_state_bytes fills it)

    @property
    def optimizer_flat(self) -> float:
        """The flat ``ceil(n / G)`` split (the ZeRO paper's formula)."""
        return self.ranks.flat if self.ranks is not None else self.optimizer


def state_bytes(groups: dict[GroupKey, int], layout: Layout, prec: Precision, replicas: int = 1) -> StateBytes:
    """Weights, gradients and optimizer states of aggregated tensor ``groups`` on one device.

    Args:
        groups: :func:`dsv3.plan.params.aggregate` of the tensors.
        replicas: devices in one pipeline that hold the same stage (2 under DualPipe);
            they join the ZeRO group.
    """
    zero_group = {False: layout.dp * replicas, True: layout.edp * replicas}
    buffers = 0.0
    w_n: dict[tuple[bool, str], int] = {}
    g_n = {False: 0, True: 0}
    o_n: dict[tuple[bool, float], int] = {}
    params = 0
    for key, value in groups.items():
        kind, expert = key[1], key[4]
        n = _group_numel(key, value, layout)
        fmt = weight_format(kind, prec)
        if kind in ("buffer", "wbuffer"):
            buffers += n * DTYPE_BYTES[fmt]
            continue
        params += n
        w_n[(expert, fmt)] = w_n.get((expert, fmt), 0) + n
        g_n[expert] += n
        per = 2 * DTYPE_BYTES[prec.moments] + prec.master_bytes(fmt)
        o_n[(expert, per)] = o_n.get((expert, per), 0) + n

    def shard(n: int, expert: bool, on: bool) -> int:
        return math.ceil(n / zero_group[expert]) if on else n

    g = DTYPE_BYTES[prec.grads]
    return StateBytes(
        params=params,
        weights=buffers + sum(shard(n, e, layout.zero >= 3) * DTYPE_BYTES[f] for (e, f), n in w_n.items()),
        grads=sum(shard(n, e, layout.zero >= 2) * g for e, n in g_n.items()),
        optimizer=sum(shard(n, e, layout.zero >= 1) * per for (e, per), n in o_n.items()),
        grads_unsharded=(g_n[False] + g_n[True]) * g,
        expert_grads_unsharded=g_n[True] * g,
    )


def zero1_row_chunk(rows: int, n: int, rank):
    """Rows of a tensor's balanced row chunk ``[rank*rows//n, (rank+1)*rows//n)`` (dsv3's ZeRO-1 cut);
    ``rank`` an int or an integer array of ranks.

    ``rows`` are those of the tensor's 2-D view ``[numel / last_dim, last_dim]`` (1-d ``[n]``: ``n`` rows,
    0-d: 1 row), as :func:`dsv3.parallel.zero.rows_shape` cuts it."""
    return (rank + 1) * rows // n - rank * rows // n


def zero1_runtime_applies(layout: Layout, replicas: int = 1) -> bool:
    """Whether dsv3's own ZeRO-1 runtime (:mod:`dsv3.parallel.zero`) runs ``layout``: TP = ETP = 1, ZeRO 1 and
    no DualPipe replica in the ZeRO group. Then the planner reports each rank's row chunks
    (:func:`zero1_optimizer_bytes_by_rank`); otherwise the flat ``ceil(n / G)`` split of :func:`state_bytes`."""
    return layout.tp == 1 and layout.etp == 1 and layout.zero == 1 and replicas == 1


def zero1_optimizer_bytes_by_rank(tensors: list[ParamTensor], layout: Layout, prec: Precision) -> list[float]:
    """Optimizer-state bytes of ``tensors`` on each data-parallel rank ``0..DP-1`` under dsv3's own ZeRO-1.

    :mod:`dsv3.parallel.zero` (DESIGN.md, "Distributed runtime") does not shard a padded flat buffer
    (``ceil(n / G)`` elements on every rank, what :func:`state_bytes` counts): it views *each* trainable
    tensor as ``[numel / last_dim, last_dim]`` (the rank's routed-expert block ``[N_r/EP, 2I, d]`` as
    ``[N_r/EP * 2I, d]``; 1-d ``[n]`` as ``[n, 1]``, 0-d as ``[1, 1]``) and cuts its rows into balanced
    chunks, one per rank of its group -- dense tensors over the DP ranks (chunk ``dp_rank``), the rank's
    expert block over the EDP replicas (chunk ``dp_rank // EP``, ranks being ``edp_idx * EP + ep_idx``) --
    so ranks differ by up to one row (``last_dim`` elements) per tensor. The optimizer state of a chunk is
    its two moments and, for a tensor not stored in FP32, its FP32 master copy
    (:meth:`Precision.master_bytes`: an FP32 tensor is its own master).
    ZeRO 0: every rank holds all. Tensors with the same rows, width and group are summed first, so this
    costs ``DP x`` (distinct row counts). For ``TP = ETP = 1`` and ZeRO 0 or 1 (the runtime's layouts).
    """
    if layout.tp != 1 or layout.etp != 1 or layout.zero > 1:
        raise ValueError("dsv3's ZeRO-1 runtime model needs TP = ETP = 1 and ZeRO <= 1")
    row_bytes: dict[tuple[int, bool], float] = {}  # (rows held before ZeRO, expert) -> bytes of one row, summed
    for t in tensors:
        if t.kind not in ("weight", "router"):
            continue
        fmt = weight_format(t.kind, prec)
        per = 2 * DTYPE_BYTES[prec.moments] + prec.master_bytes(fmt)
        width = t.shape[-1] if len(t.shape) >= 2 else 1  # the 2-D view [numel / last_dim, last_dim]
        rows = t.numel // width
        expert = t.shard == "expert"
        key = (rows // layout.ep if expert else rows, expert)  # experts: the rank's (N_r / EP) * 2I ... rows
        row_bytes[key] = row_bytes.get(key, 0) + width * per
    dp_rank = np.arange(layout.dp, dtype=np.int64)
    out = np.zeros(layout.dp, dtype=np.float64)  # byte counts stay exact integers below 2**53
    for (rows, expert), per_row in row_bytes.items():
        group = 1 if layout.zero == 0 else (layout.edp if expert else layout.dp)
        rank = dp_rank * 0 if group == 1 else (dp_rank // layout.ep if expert else dp_rank)
        out += zero1_row_chunk(rows, group, rank) * float(per_row)  # vectorised over the DP ranks
    return out.tolist()


def zero1_rank_state_bytes(tensors: list[ParamTensor], layout: Layout, prec: Precision, dp_rank: int) -> StateBytes:
    """Model-state bytes of ``tensors`` on data-parallel rank ``dp_rank`` under dsv3's own ZeRO-1.

    The optimizer state is the rank's row chunks (:func:`zero1_optimizer_bytes_by_rank`); weights and
    gradients are not sharded (ZeRO-1); buffers as in :func:`state_bytes`. For ``TP = ETP = 1`` and
    ZeRO 0 or 1 (the runtime's layouts).
    """
    if layout.tp != 1 or layout.etp != 1 or layout.zero > 1:
        raise ValueError("zero1_rank_state_bytes models dsv3's ZeRO-1 runtime: TP = ETP = 1, ZeRO <= 1")
    if not 0 <= dp_rank < layout.dp:
        raise ValueError(f"dp_rank {dp_rank} is outside 0..{layout.dp - 1}")
    sb = state_bytes(aggregate(tensors, layout.tp_convention), dataclasses.replace(layout, zero=0), prec)
    sb.optimizer = zero1_optimizer_bytes_by_rank(tensors, layout, prec)[dp_rank]
    return sb


def unit_weight_bytes(groups: dict[GroupKey, int], layout: Layout, prec: Precision) -> float:
    """Unsharded weight bytes of one unit (a layer) on one device."""
    return sum(_group_numel(k, v, layout) * DTYPE_BYTES[weight_format(k[1], prec)] for k, v in groups.items())


#: ``optimizer_model`` of a memory result: which model of the sharded optimizer state ``optimizer`` is.
RUNTIME_MODEL = "dsv3-zero1-row-chunks"
FLAT_MODEL = "flat-ceil-n-over-G"


def optimizer_detail(optimizer: float, ranks: RankSpread | None) -> dict:
    """The ``--json`` keys that say what ``optimizer`` is: the busiest rank of dsv3's ZeRO-1 runtime (with
    every DP rank's bytes, the busiest rank, and the flat split for comparison) or the flat split itself."""
    if ranks is None:
        return {"optimizer_model": FLAT_MODEL, "optimizer_flat": optimizer}
    return {
        "optimizer_model": RUNTIME_MODEL,
        "optimizer_flat": ranks.flat,
        "optimizer_busiest_dp_rank": ranks.busiest,
        "optimizer_min": ranks.low,
        "optimizer_max": ranks.high,
        "optimizer_by_dp_rank": list(ranks.by_rank) if ranks.by_rank is not None else None,
    }


def step_transient_bytes(tensors: list[ParamTensor], layout: Layout, prec: Precision) -> dict[str, float]:
    """What dsv3's step holds for a moment beside the states and activations of ``tensors`` (a stage or device).

    - ``grad_accumulation`` (more than one micro-batch per step): autograd makes each gradient as a new tensor
      and adds it into the existing ``.grad``; the largest such tensor is the largest dense gradient, or one
      piece of a routed-expert block (dsv3 adds those in place, :data:`WGRAD_PIECE_ELEMS` elements or one
      expert at a time: ``dsv3.model.ops.grouped_mm_wgrad_into``);
    - ``zero1_reduce`` (DP > 1): the FP32 flat buffer of one all-reduce bucket, at most
      :data:`ZERO1_BUCKET_ELEMS` elements (a larger FP32 gradient is reduced in place; one in another format
      is cast to FP32 whole).

    The all-gather of the updated parameters comes after the gradients are freed, so its buffers are not
    counted. Only for the layouts dsv3's runtime runs (:func:`zero1_runtime_applies`); else ``{}``.
    """
    if not zero1_runtime_applies(layout):
        return {}
    g = DTYPE_BYTES[prec.grads]
    sizes = []  # (elements autograd makes at once, elements of the tensor)
    for t in tensors:
        if t.kind not in ("weight", "router"):
            continue
        n = device_numel(t, layout)
        if t.shard == "expert":
            per_expert = n // max(1, t.shape[0] // layout.ep)
            sizes.append((min(n, per_expert * max(1, WGRAD_PIECE_ELEMS // max(1, per_expert))), n))
        else:
            sizes.append((n, n))
    out: dict[str, float] = {}
    if not sizes:
        return out
    if layout.microbatches > 1:
        out["grad_accumulation"] = max(fresh for fresh, _ in sizes) * g
    if layout.dp > 1:
        bucket = min(ZERO1_BUCKET_ELEMS, sum(n for _, n in sizes))
        if prec.grads != "fp32":
            bucket = max(bucket, max(n for _, n in sizes))
        out["zero1_reduce"] = 4.0 * bucket
    return out
