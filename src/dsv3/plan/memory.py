"""Per-device memory of a training run: weights, gradients, optimizer states, activations, buffers.

For one pipeline stage on one device (the formulas of ZeRO, Rajbhandari et al.
2020, arXiv 1910.02054, section 3, with the report's formats):

    weights    = sum_t n_t * w_t / (G_t if ZeRO >= 3)         + buffers
    grads      = sum_t n_t * g   / (G_t if ZeRO >= 2)
    optimizer  = sum_t n_t * (2 m + master_t) / (G_t if ZeRO >= 1)

where n_t is the part of tensor t the device holds after the TP / EP / ETP
split (:func:`device_numel`), w_t its weight format (BF16, the router FP32),
g the gradient format (FP32), m the format of each AdamW moment (BF16) and
master_t the FP32 master copy (none for a tensor already stored in FP32).
G_t, the ZeRO group, is DP for non-expert tensors and EDP = DP*TP/(EP*ETP)
for routed-expert tensors (for the whole MoE block under the ``zhang-su``
convention, see :data:`dsv3.layout.TP_CONVENTIONS`), times 2 under DualPipe (whose two devices holding
a stage are replicas too). A sharded flat buffer is padded up to a multiple
of G_t. Buffers (the routing bias) are never sharded.

That flat split is the ZeRO paper's. dsv3's own runtime (:mod:`dsv3.parallel.zero`)
cuts each tensor into dim-0 row chunks instead, so its ranks hold slightly
different optimizer bytes: for the layouts it runs (TP = ETP = 1, ZeRO-1, see
:func:`zero1_runtime_applies`) a stage's ``optimizer`` is the busiest DP rank's
bytes of :func:`zero1_optimizer_bytes_by_rank`, and the flat split is kept as
``optimizer_flat``.

Activations: one micro-batch of ``b * s`` tokens keeps, on a stage, the bytes
per token of the items :mod:`dsv3.plan.activations` lists for its layers
under the recompute policy. A device's activation peak is found by walking
its op list of the pipeline schedule (:mod:`dsv3.parallel.pipeline`), adding
a stage's per-micro-batch bytes when a forward starts and removing them when
that micro-batch's last backward on the stage ends (the convention of
``SimResult.peak_activations``, weighted by each stage's bytes, so a DualPipe
device holding the first and the last stage is charged exactly). While a
layer is recomputed in backward, the tensors its recomputation rebuilds
(those ``none`` keeps and the policy does not) exist once more (the
recompute working set, the largest over the device's layers).
Communication buffers and a fragmentation allowance (a fraction of everything
else: PyTorch's caching allocator rounds and splits blocks) complete the total.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from dsv3.config import ModelConfig
from dsv3.layout import devices_of_stage, stage_devices, stage_layer_indices
from dsv3.plan import activations as act
from dsv3.plan.layout import Layout
from dsv3.plan.params import GroupKey, ModelParams, ParamTensor, aggregate, merge_groups, mtp_layer_is_moe
from dsv3.plan.precision import DTYPE_BYTES, Precision, element_bytes

#: Megatron-LM's gradient bucket: max(40M, 1M * DP) elements (distributed/param_and_grad_buffer).
GRAD_BUCKET_MIN_ELEMS = 40_000_000
DEFAULT_FRAGMENTATION = 0.10


# ---------------------------------------------------------------------------- model states
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


# ---------------------------------------------------------------------------- stages
@dataclass
class StageParts:
    """What one pipeline stage holds: its layers and the extra modules at the ends of the pipeline."""

    stage: int
    layers: list[int]
    embedding: bool
    head: bool
    mtp: bool
    embedding_copy: bool = False  # the last stage's copy of the embedding (MTP embeds tokens; a tied head)

    @property
    def extras(self) -> list[str]:
        return [n for n, on in (("embedding", self.embedding), ("head", self.head), ("mtp", self.mtp)) if on]

    @property
    def holds_embedding(self) -> bool:
        """The stage's parameters include the embedding (its own, or the last stage's copy for MTP/a tied head)."""
        return self.embedding or self.embedding_copy


def stage_parts(cfg: ModelConfig, layout: Layout, stage_layers: tuple[int, ...]) -> list[StageParts]:
    """Stage 0 holds the embedding; the last stage the final norm, output head and MTP modules, and (with
    more than one stage) a copy of the embedding when the MTP modules embed tokens or the head is tied to it
    (as dsv3's pipeline runtime holds it; a device holding the first stage too keeps one: :func:`memory_plan`)."""
    idx = stage_layer_indices(stage_layers)
    last = layout.pp - 1
    use_mtp = layout.mtp and cfg.num_nextn_predict_layers > 0
    copy = last > 0 and (use_mtp or bool(cfg.tie_word_embeddings))
    return [
        StageParts(s, idx[s], s == 0, s == last, s == last and use_mtp, s == last and copy) for s in range(layout.pp)
    ]


def stage_tensors(params: ModelParams, part: StageParts) -> list[ParamTensor]:
    """The parameter tensors of one stage."""
    out: list[ParamTensor] = []
    if part.holds_embedding:
        out += params.embedding
    if part.layers or part.mtp:
        out += params.rotary
    for i in part.layers:
        out += params.layers[i]
    if part.head:
        out += params.head
    if part.mtp:
        out += params.mtp_tensors
    return out


def stage_state_bytes(
    params: ModelParams, part: StageParts, layout: Layout, prec: Precision, replicas: int = 1
) -> StateBytes:
    """:func:`state_bytes` of one stage, from the cached per-layer groups (fast).

    Where dsv3's ZeRO-1 runtime runs the layout (:func:`zero1_runtime_applies`), ``optimizer`` is the
    busiest data-parallel rank's bytes of :func:`zero1_optimizer_bytes_by_rank` (kept in
    ``ranks``, with the flat ``ceil(n / G)`` split it replaces).
    """
    g = params.groups_for(layout.tp_convention)
    units = [g["layers"][i] for i in part.layers]
    if part.mtp:
        units += g["mtp_modules"]
    extra = ([g["embedding"]] if part.holds_embedding else []) + ([g["head"]] if part.head else [])
    extra += [g["rotary"]] if (part.layers or part.mtp) else []  # every stage with blocks computes RoPE
    sb = state_bytes(merge_groups(units + extra), layout, prec, replicas)
    sb.largest_unit_weights = max((unit_weight_bytes(u, layout, prec) for u in units + extra), default=0.0)
    if zero1_runtime_applies(layout, replicas):  # what dsv3's runtime holds: the busiest rank's row chunks
        sb.ranks = RankSpread.of(zero1_optimizer_bytes_by_rank(stage_tensors(params, part), layout, prec), sb.optimizer)
        sb.optimizer = sb.ranks.high
    return sb


# ---------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class UnitActivations:
    """Bytes per token one unit keeps under the layout's policy, and what its backward rebuilds.

    ``dropped`` is the bytes of the items ``none`` keeps and the policy does not: what the
    recomputation of the unit rebuilds in backward (its working set).
    """

    kept: float
    dropped: float


def unit_activations(cfg: ModelConfig, layout: Layout, prec: Precision) -> dict[str, UnitActivations]:
    """Per-token activation bytes of each kind of unit: ``dense``, ``moe``, ``embedding``, ``rope``, ``head``,
    ``mtp`` (all MTP modules) and ``mtp_shared`` (the same on a stage that also holds the embedding)."""
    policy = layout.recompute

    def ua(items: list[act.ActItem]) -> UnitActivations:
        rebuilt = sum(i.bytes_per_token for i in items if i.kept("none") and not i.kept(policy))
        return UnitActivations(act.bytes_per_token(items, policy), rebuilt)

    out = {
        "dense": ua(act.decoder_layer_items(cfg, layout, prec, False)),
        "embedding": ua(act.embedding_items(cfg, layout, prec)),
        "rope": ua(act.rope_items(cfg, layout, prec)),
        "head": ua(act.head_items(cfg, layout, prec)),
    }
    if cfg.n_routed_experts:
        out["moe"] = ua(act.decoder_layer_items(cfg, layout, prec, True))
    for key, shared in (("mtp", False), ("mtp_shared", True)):
        mtp = [
            act.mtp_items(cfg, layout, prec, k, mtp_layer_is_moe(cfg, k), shared)
            for k in range(cfg.num_nextn_predict_layers)
        ]
        out[key] = ua([i for items in mtp for i in items])
    return out


@dataclass
class ActivationBytes:
    per_microbatch: float  # bytes one micro-batch keeps for backward on this stage
    working_set: float  # extra bytes while one layer is recomputed in backward


def stage_activation_bytes(
    cfg: ModelConfig, layout: Layout, part: StageParts, units: dict[str, UnitActivations]
) -> ActivationBytes:
    present: list[UnitActivations] = []
    if part.embedding:
        present.append(units["embedding"])
    if part.layers:
        present.append(units["rope"])
    present += [units["moe" if cfg.is_moe_layer(i) else "dense"] for i in part.layers]
    if part.head:
        present.append(units["head"])
    if part.mtp:  # on the stage that also embeds, MTP reuses the embedding output
        present.append(units["mtp_shared" if part.embedding else "mtp"])
    t = layout.tokens_per_microbatch
    return ActivationBytes(
        per_microbatch=t * sum(u.kept for u in present),
        working_set=t * max((u.dropped for u in present), default=0.0),
    )


#: Per device, the count vectors ((stage, micro-batches held), ...) at which its live activations can peak.
Profiles = list[list[tuple[tuple[int, int], ...]]]


def occupancy_profiles(device_ops, pp: int) -> Profiles:
    """Walk each device's op list and record how many micro-batches of each stage it holds after every forward.

    Args:
        device_ops: for each device, its compute ops in execution order (objects
            with ``parts()`` giving ops of ``kind`` F / B / W / BW and a ``stage``),
            e.g. ``Schedule.ops`` or the ops of ``SimResult.timeline``.

    A micro-batch's set on a stage is taken when its forward starts and released
    when its last backward (W of a split backward, or the full BW) ends; an
    overlapped F&B takes the forward's set before releasing the backward's
    (the convention of ``SimResult.peak_activations``). Live memory only grows
    at a forward, so the peak is at one of the recorded vectors; vectors that
    another one dominates are dropped.
    """
    out: Profiles = []
    for ops in device_ops:
        n = [0] * pp
        seen: set[tuple[tuple[int, int], ...]] = set()
        for op in ops:
            parts = op.parts()
            took = False
            for p in parts:
                if p.kind == "F":
                    n[p.stage] += 1
                    took = True
            if took:
                seen.add(tuple((s, c) for s, c in enumerate(n) if c))
            for p in parts:
                if p.kind in ("BW", "W"):
                    n[p.stage] -= 1
        vecs = [dict(v) for v in seen]
        keep = []
        for i, v in enumerate(vecs):
            dominated = any(j != i and all(w.get(s, 0) >= c for s, c in v.items()) for j, w in enumerate(vecs))
            if not dominated:
                keep.append(tuple(sorted(v.items())))
        out.append(sorted(keep))
    return out


def weighted_peaks(profiles: Profiles, stage_bytes: list[float]) -> tuple[list[float], list[list[int]]]:
    """Each device's peak live activation bytes, and the most micro-batches of each stage it holds at once.

    Args:
        profiles: :func:`occupancy_profiles` of the schedule.
        stage_bytes: activation bytes one micro-batch keeps on each stage.
    """
    peaks, counts = [], []
    pp = len(stage_bytes)
    for vecs in profiles:
        peaks.append(max((sum(c * stage_bytes[s] for s, c in v) for v in vecs), default=0.0))
        top = [0] * pp
        for v in vecs:
            for s, c in v:
                top[s] = max(top[s], c)
        counts.append(top)
    return peaks, counts


# ---------------------------------------------------------------------------- buffers
def comm_buffer_bytes(
    cfg: ModelConfig, layout: Layout, prec: Precision, parts: list[StageParts], states: list[StateBytes]
) -> dict[str, float]:
    """Communication buffers one device keeps for the stages ``parts`` it holds.

    - ``pp_p2p``: send and receive buffers for the activation and its gradient
      at the stage boundary, ``T/SP x d`` each, per direction of data flow;
    - ``tp_gather``: two all-gathered ``T x d`` sequence buffers (sequence parallelism);
    - ``ep_all_to_all``: dispatch and combine buffers of ``K_r * ETP / TP * T``
      token copies of ``d`` (dispatch in FP8 with ``--fp8``);
    - ``grad_buckets``: with ZeRO-2/3, two reduce-scatter buckets of
      max(40M, 1M * DP) gradient elements (capped at the device's gradients);
    - ``zero3_gather``: with ZeRO-3, the gathered weights of two layers (the one
      computing and the one prefetched).
    """
    t = layout.tokens_per_microbatch
    d = cfg.hidden_size
    a = element_bytes(prec.activations)
    out: dict[str, float] = {}
    if layout.pp > 1:
        directions = 2 if layout.schedule in ("dualpipe", "dualpipev") else 1
        out["pp_p2p"] = 4 * directions * t / layout.sp * d * a
    if layout.tp > 1:
        out["tp_gather"] = 2 * t * d * a
    has_moe = any(cfg.is_moe_layer(i) for p in parts for i in p.layers) or any(p.mtp for p in parts)
    if layout.ep > 1 and has_moe and cfg.n_routed_experts:
        copies = t * cfg.num_experts_per_tok * layout.etp / layout.tp
        dispatch = element_bytes(prec.fp8_cache) if layout.fp8 else a
        out["ep_all_to_all"] = copies * d * (dispatch + a)
    if layout.zero >= 2:
        bucket = max(GRAD_BUCKET_MIN_ELEMS, 1_000_000 * layout.dp) * DTYPE_BYTES[prec.grads]
        out["grad_buckets"] = min(2 * bucket, sum(s.grads_unsharded for s in states))
    if layout.zero >= 3:
        out["zero3_gather"] = 2 * max(s.largest_unit_weights for s in states)
    return out


# ---------------------------------------------------------------------------- results
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


class _Totals:
    """``subtotal`` and ``total`` of a memory result with weights, grads, optimizer, activations, buffers."""

    weights: float
    grads: float
    optimizer: float
    activations: float
    comm_buffers: dict[str, float]
    fragmentation: float

    @property
    def subtotal(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + sum(self.comm_buffers.values())

    @property
    def total(self) -> float:
        return self.subtotal + self.fragmentation


@dataclass
class StageMemory(_Totals):
    """Memory of one pipeline stage on a device that holds it (bytes unless said otherwise).

    For a device that holds one stage (1F1B, ZB1P) this equals the device's
    memory. Under DualPipe / DualPipeV a device holds two stages and
    :class:`DeviceMemory` is the authority: it adds the stages' states, takes
    the device's activation peak from the schedule, and counts buffers once.
    """

    stage: int
    layers: list[int]
    extras: list[str]
    devices: list[int]
    params_per_device: int
    weights: float
    grads: float
    optimizer: float
    activations_per_microbatch: float
    microbatches_in_flight: int
    recompute_working_set: float
    activations: float
    comm_buffers: dict[str, float] = field(default_factory=dict)
    fragmentation: float = 0.0
    ranks: RankSpread | None = None  # see StateBytes

    @property
    def optimizer_flat(self) -> float:
        """The flat ``ceil(n / G)`` split (the ZeRO paper's formula)."""
        return self.ranks.flat if self.ranks is not None else self.optimizer

    def to_dict(self) -> dict:
        return {
            "stage": self.stage,
            "layers": self.layers,
            "extras": self.extras,
            "devices": self.devices,
            "params_per_device": self.params_per_device,
            "memory_bytes": {
                "weights": self.weights,
                "grads": self.grads,
                "optimizer": self.optimizer,
                **optimizer_detail(self.optimizer, self.ranks),
                "activations": self.activations,
                "activations_per_microbatch": self.activations_per_microbatch,
                "microbatches_in_flight": self.microbatches_in_flight,
                "recompute_working_set": self.recompute_working_set,
                "comm_buffers": sum(self.comm_buffers.values()),
                "comm_buffer_items": self.comm_buffers,
                "fragmentation": self.fragmentation,
                "total": self.total,
            },
        }


@dataclass
class DeviceMemory(_Totals):
    """Everything one pipeline device holds: its stages, buffers and the fragmentation allowance."""

    device: int
    stages: list[int]
    params: int
    weights: float
    grads: float
    optimizer: float
    activations: float
    comm_buffers: dict[str, float]
    fragmentation: float = 0.0
    ranks: RankSpread | None = None  # see StateBytes

    @property
    def optimizer_flat(self) -> float:
        """The flat ``ceil(n / G)`` split (the ZeRO paper's formula)."""
        return self.ranks.flat if self.ranks is not None else self.optimizer

    def to_dict(self) -> dict:
        return {
            "device": self.device,
            "stages": self.stages,
            "params": self.params,
            "memory_bytes": {
                "weights": self.weights,
                "grads": self.grads,
                "optimizer": self.optimizer,
                **optimizer_detail(self.optimizer, self.ranks),
                "activations": self.activations,
                "comm_buffers": sum(self.comm_buffers.values()),
                "comm_buffer_items": self.comm_buffers,
                "fragmentation": self.fragmentation,
                "total": self.total,
            },
        }


def _device_duplicates(params: ModelParams, parts: list[StageParts]) -> list[ParamTensor]:
    """The tensors that more than one of a device's stages list (each extra occurrence once)."""
    seen: set[str] = set()
    twice = []
    for part in parts:
        for t in stage_tensors(params, part):
            if t.name in seen:
                twice.append(t)
            seen.add(t.name)
    return twice


def memory_plan(
    cfg: ModelConfig,
    params: ModelParams,
    layout: Layout,
    prec: Precision,
    stage_layers: tuple[int, ...],
    profiles: Profiles | None = None,
    fragmentation: float = DEFAULT_FRAGMENTATION,
    states: list[StateBytes] | None = None,
    units: dict[str, UnitActivations] | None = None,
) -> tuple[list[StageMemory], list[DeviceMemory]]:
    """Per-stage and per-device memory.

    Args:
        stage_layers: layers per stage.
        profiles: :func:`occupancy_profiles` of the schedule's op lists; ``None``
            for PP = 1, where one micro-batch is in flight at a time.
        fragmentation: allowance as a fraction of the device's other memory.
        states: precomputed :func:`stage_state_bytes` of each stage (optional).
        units: precomputed :func:`unit_activations` (optional).
    """
    parts = stage_parts(cfg, layout, stage_layers)
    replicas = 2 if layout.schedule == "dualpipe" else 1
    if states is None:
        states = [stage_state_bytes(params, p, layout, prec, replicas) for p in parts]
    units = units or unit_activations(cfg, layout, prec)
    acts = [stage_activation_bytes(cfg, layout, p, units) for p in parts]
    held = stage_devices(layout.pp, layout.schedule)
    if profiles is None:
        peaks, counts = [acts[0].per_microbatch], [[1]]
    else:
        peaks, counts = weighted_peaks(profiles, [a.per_microbatch for a in acts])
    dev_of = devices_of_stage(layout.pp, layout.schedule)
    stages: list[StageMemory] = []
    for part, sb, ab in zip(parts, states, acts):
        n = max(counts[dev][part.stage] for dev in dev_of[part.stage])
        sm = StageMemory(
            stage=part.stage,
            layers=part.layers,
            extras=part.extras,
            devices=dev_of[part.stage],
            params_per_device=sb.params,
            weights=sb.weights,
            grads=sb.grads,
            optimizer=sb.optimizer,
            activations_per_microbatch=ab.per_microbatch,
            microbatches_in_flight=n,
            recompute_working_set=ab.working_set,
            activations=n * ab.per_microbatch + ab.working_set,
            comm_buffers=comm_buffer_bytes(cfg, layout, prec, [part], [sb]),
            ranks=sb.ranks,
        )
        sm.fragmentation = fragmentation * sm.subtotal
        stages.append(sm)
    devices: list[DeviceMemory] = []
    for dev, ss in enumerate(held):
        ranks = states[ss[0]].ranks if len(ss) == 1 else None
        # a tensor in two stages of one device (the embedding of the first stage and the last one's copy, the
        # RoPE table) is held once: DualPipe(V) shares them physically (report 3.2.1)
        twice = _device_duplicates(params, [parts[s] for s in ss]) if len(ss) > 1 else []
        dup = state_bytes(aggregate(twice, layout.tp_convention), layout, prec, replicas) if twice else None
        if len(ss) > 1 and all(states[s].ranks is not None for s in ss):
            # a device's DP rank is the same in every stage it holds: add rank by rank, then take the busiest
            tensors = list({t.name: t for s in ss for t in stage_tensors(params, parts[s])}.values())
            ranks = RankSpread.of(
                zero1_optimizer_bytes_by_rank(tensors, layout, prec),
                sum(states[s].ranks.flat for s in ss) - (dup.optimizer if dup else 0),
            )
        dm = DeviceMemory(
            device=dev,
            stages=ss,
            params=sum(states[s].params for s in ss) - (dup.params if dup else 0),
            weights=sum(states[s].weights for s in ss) - (dup.weights if dup else 0),
            grads=sum(states[s].grads for s in ss) - (dup.grads if dup else 0),
            optimizer=ranks.high
            if ranks is not None
            else sum(states[s].optimizer for s in ss) - (dup.optimizer if dup else 0),
            activations=peaks[dev] + max(acts[s].working_set for s in ss),
            comm_buffers=comm_buffer_bytes(cfg, layout, prec, [parts[s] for s in ss], [states[s] for s in ss]),
            ranks=ranks,
        )
        dm.fragmentation = fragmentation * dm.subtotal
        devices.append(dm)
    return stages, devices
