"""Per-device memory of a training run: model states, activations, buffers, fragmentation.

:func:`memory_plan` assembles each pipeline stage (:class:`StageMemory`) and device (:class:`DeviceMemory`):
the model-state bytes of :mod:`dsv3.plan.states` for the tensors a stage holds (:func:`stage_parts`,
:func:`stage_tensors`), the activations, the buffers and the step's transients, and a fragmentation
allowance (a fraction of everything else: the caching allocator rounds and splits blocks).
Activations: one micro-batch of ``b * s`` tokens keeps on a stage the bytes per token of the items of
:mod:`dsv3.plan.activations` for its layers under the recompute policy. A device's peak is found by walking
its op list of the pipeline schedule (:func:`occupancy_profiles`): a stage's bytes are taken when a forward
starts and released when that micro-batch's last backward on the stage ends (weighted by each stage's
bytes, so a DualPipe device holding the first and last stage is charged exactly). While a layer is
recomputed in backward, what its recomputation rebuilds exists once more (the largest over the layers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dsv3.config import ModelConfig
from dsv3.layout import devices_of_stage, stage_devices, stage_layer_indices
from dsv3.plan import activations as act
from dsv3.plan.layout import Layout
from dsv3.plan.params import ModelParams, ParamTensor, aggregate, merge_groups, mtp_layer_is_moe
from dsv3.plan.precision import DTYPE_BYTES, Precision, element_bytes
from dsv3.plan.states import (
    RankSpread,
    StateBytes,
    device_numel,
    optimizer_detail,
    state_bytes,
    step_transient_bytes,
    unit_weight_bytes,
    zero1_optimizer_bytes_by_rank,
    zero1_runtime_applies,
)

#: Megatron-LM's gradient bucket: max(40M, 1M * DP) elements (distributed/param_and_grad_buffer).
GRAD_BUCKET_MIN_ELEMS = 40_000_000
DEFAULT_FRAGMENTATION = 0.10


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
        tensors = stage_tensors(params, part)
        sb.ranks = RankSpread.of(zero1_optimizer_bytes_by_rank(tensors, layout, prec), sb.optimizer)
        sb.optimizer = sb.ranks.high
        sb.transients = step_transient_bytes(tensors, layout, prec)
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

    :func:`memory_plan` adds the step's transients of dsv3's runtime to the same items (:func:`step_buffers`).
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


class _Totals:
    """``subtotal`` and ``total`` of a memory result with weights, grads, optimizer, activations, buffers."""

    weights: float
    grads: float
    optimizer: float
    activations: float
    comm_buffers: dict[str, float]
    fragmentation: float
    ranks: RankSpread | None

    @property
    def optimizer_flat(self) -> float:
        """The flat ``ceil(n / G)`` split (the ZeRO paper's formula)."""
        return self.ranks.flat if self.ranks is not None else self.optimizer

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


def step_buffers(buffers: dict[str, float], states: list[StateBytes], shared: float, activations: float) -> dict:
    """``buffers`` plus the step's transients of a device holding ``states``' stages (dsv3's runtime).

    ``grad_accumulation`` (:func:`~dsv3.plan.states.step_transient_bytes`, the largest over the stages) exists
    during a backward, beside the activations. The all-reduces come after the last backward, when the activations
    are gone: of ``zero1_reduce`` and ``pp_shared_grads`` (``shared``, :func:`shared_grad_bytes`) only the part
    above what the backward held beyond the states (activations, buffers, ``grad_accumulation``) is added, as
    ``after_backward``, so that the total is the larger of the two moments, not their sum.
    """
    items: dict[str, float] = {}
    for sb in states:
        for k, v in sb.transients.items():
            items[k] = max(items.get(k, 0.0), v)
    out = dict(buffers)
    if items.get("grad_accumulation"):
        out["grad_accumulation"] = items["grad_accumulation"]
    extra = max(items.get("zero1_reduce", 0.0), shared) - activations - sum(out.values())
    if extra > 0:
        out["after_backward"] = extra
    return out


def shared_grad_bytes(
    params: ModelParams, parts: list[StageParts], held: list[list[int]], layout: Layout, prec: Precision
) -> list[float]:
    """Per pipeline device: twice the gradient bytes of the tensors another device holds too (the embedding and
    the last stage's copy of it). dsv3's pipeline runtime all-reduces those gradients through a flat copy and
    clones them back, the old ones still referenced (``PipelineRuntime._finish``). Only for dsv3's runtime
    layouts (:func:`~dsv3.plan.states.zero1_runtime_applies`) with PP > 1; else zeros."""
    if layout.pp == 1 or not zero1_runtime_applies(layout, 2 if layout.schedule == "dualpipe" else 1):
        return [0.0] * len(held)
    names = [{t.name: t for s in ss for t in stage_tensors(params, parts[s])} for ss in held]
    out = []
    for d, mine in enumerate(names):
        others = set().union(*(n for e, n in enumerate(names) if e != d))
        shared = [t for n, t in mine.items() if n in others and t.kind in ("weight", "router")]
        out.append(2.0 * DTYPE_BYTES[prec.grads] * sum(device_numel(t, layout) for t in shared))
    return out


@dataclass
class _PlanInputs:
    """What :func:`memory_plan` works out once for its stages and devices."""

    cfg: ModelConfig
    params: ModelParams
    layout: Layout
    prec: Precision
    parts: list[StageParts]
    states: list[StateBytes]
    acts: list[ActivationBytes]
    shared: list[float]  # shared_grad_bytes per device
    replicas: int


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
    inputs = _PlanInputs(
        cfg, params, layout, prec, parts, states, acts, shared_grad_bytes(params, parts, held, layout, prec), replicas
    )
    stages = []
    for part in parts:
        sm = _stage_memory(inputs, part, dev_of[part.stage], max(counts[d][part.stage] for d in dev_of[part.stage]))
        sm.fragmentation = fragmentation * sm.subtotal
        stages.append(sm)
    devices = []
    for dev, ss in enumerate(held):
        dm = _device_memory(inputs, dev, ss, peaks[dev] + max(acts[s].working_set for s in ss))
        dm.fragmentation = fragmentation * dm.subtotal
        devices.append(dm)
    return stages, devices


def _stage_memory(inputs: _PlanInputs, part: StageParts, devices: list[int], n: int) -> StageMemory:
    """One stage's memory with ``n`` of its micro-batches in flight (before the fragmentation allowance)."""
    sb, ab = inputs.states[part.stage], inputs.acts[part.stage]
    activations = n * ab.per_microbatch + ab.working_set
    buffers = comm_buffer_bytes(inputs.cfg, inputs.layout, inputs.prec, [part], [sb])
    return StageMemory(
        stage=part.stage,
        layers=part.layers,
        extras=part.extras,
        devices=devices,
        params_per_device=sb.params,
        weights=sb.weights,
        grads=sb.grads,
        optimizer=sb.optimizer,
        activations_per_microbatch=ab.per_microbatch,
        microbatches_in_flight=n,
        recompute_working_set=ab.working_set,
        activations=activations,
        comm_buffers=step_buffers(buffers, [sb], max(inputs.shared[d] for d in devices), activations),
        ranks=sb.ranks,
    )


def _device_memory(inputs: _PlanInputs, dev: int, ss: list[int], activations: float) -> DeviceMemory:
    """Pipeline device ``dev`` holding stages ``ss`` with its activation peak (before the fragmentation allowance)."""
    layout, prec, params, states = inputs.layout, inputs.prec, inputs.params, inputs.states
    parts = [inputs.parts[s] for s in ss]
    ranks = states[ss[0]].ranks if len(ss) == 1 else None
    # a tensor in two stages of one device (the embedding of the first stage and the last one's copy, the
    # RoPE table) is held once: DualPipe(V) shares them physically (report 3.2.1)
    twice = _device_duplicates(params, parts) if len(ss) > 1 else []
    dup = state_bytes(aggregate(twice, layout.tp_convention), layout, prec, inputs.replicas) if twice else None
    if len(ss) > 1 and all(states[s].ranks is not None for s in ss):
        # a device's DP rank is the same in every stage it holds: add rank by rank, then take the busiest
        tensors = list({t.name: t for p in parts for t in stage_tensors(params, p)}.values())
        ranks = RankSpread.of(
            zero1_optimizer_bytes_by_rank(tensors, layout, prec),
            sum(states[s].ranks.flat for s in ss) - (dup.optimizer if dup else 0),
        )
    held = [states[s] for s in ss]
    buffers = comm_buffer_bytes(inputs.cfg, layout, prec, parts, held)
    return DeviceMemory(
        device=dev,
        stages=ss,
        params=sum(sb.params for sb in held) - (dup.params if dup else 0),
        weights=sum(sb.weights for sb in held) - (dup.weights if dup else 0),
        grads=sum(sb.grads for sb in held) - (dup.grads if dup else 0),
        optimizer=ranks.high if ranks is not None else sum(sb.optimizer for sb in held) - (dup.optimizer if dup else 0),
        activations=activations,
        comm_buffers=step_buffers(buffers, held, inputs.shared[dev], activations),
        ranks=ranks,
    )
