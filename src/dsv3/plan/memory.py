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
for routed-expert tensors, times 2 under DualPipe (whose two devices holding
a stage are replicas too). A sharded flat buffer is padded up to a multiple
of G_t.

Activations per micro-batch are ``b * s`` tokens times the bytes per token of
the items :mod:`dsv3.plan.activations` lists for the stage's layers under the
recompute policy; the stage holds ``in_flight`` micro-batches (the schedule's
peak, from :mod:`dsv3.plan.simulate`) plus the working set of the one layer
being recomputed. Communication buffers and a fragmentation allowance (a
fraction of everything else; PyTorch's caching allocator rounds and splits
blocks) complete the total.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from dsv3.config import ModelConfig
from dsv3.plan import activations as act
from dsv3.plan.layout import Layout, devices_of_stage, stage_devices, stage_layer_indices
from dsv3.plan.params import ModelParams, ParamTensor
from dsv3.plan.precision import DTYPE_BYTES, Precision, element_bytes

#: Megatron-LM's gradient bucket: max(40M, 1M * DP) elements (distributed/param_and_grad_buffer).
GRAD_BUCKET_MIN_ELEMS = 40_000_000
DEFAULT_FRAGMENTATION = 0.10
_LAYER_RE = re.compile(r"^(model\.layers\.\d+|mtp\.\d+)")


def device_numel(t: ParamTensor, layout: Layout) -> int:
    """Elements of tensor ``t`` one device holds after the TP / EP / ETP split."""
    if t.shard == "tp":
        return t.numel // layout.tp
    if t.shard == "vocab":  # vocabulary rows padded to a multiple of TP
        rows = math.ceil(t.shape[0] / layout.tp)
        return rows * (t.numel // t.shape[0])
    if t.shard == "expert":
        return t.numel // (layout.ep * layout.etp)
    return t.numel


def weight_format(t: ParamTensor, prec: Precision) -> str:
    return {"weight": prec.weights, "router": prec.router, "buffer": "fp32"}[t.kind]


@dataclass
class StageParts:
    """What one pipeline stage holds: its layers and the extra modules at the ends of the pipeline."""

    stage: int
    layers: list[int]
    embedding: bool
    head: bool
    mtp: bool

    @property
    def extras(self) -> list[str]:
        return [n for n, on in (("embedding", self.embedding), ("head", self.head), ("mtp", self.mtp)) if on]


def stage_parts(cfg: ModelConfig, layout: Layout, stage_layers: tuple[int, ...]) -> list[StageParts]:
    idx = stage_layer_indices(stage_layers)
    last = layout.pp - 1
    use_mtp = layout.mtp and cfg.num_nextn_predict_layers > 0
    return [StageParts(s, idx[s], s == 0, s == last, s == last and use_mtp) for s in range(layout.pp)]


def stage_tensors(params: ModelParams, part: StageParts) -> list[ParamTensor]:
    out: list[ParamTensor] = []
    if part.embedding:
        out += params.embedding
    for i in part.layers:
        out += params.layers[i]
    if part.head:
        out += params.head
    if part.mtp:
        out += params.mtp_tensors
    return out


@dataclass
class StateBytes:
    """Model-state bytes of one stage on one device."""

    params: int  # trainable elements held (after the TP/EP split, before ZeRO)
    weights: float
    grads: float
    optimizer: float
    grads_unsharded: float  # gradient bytes before ZeRO-2 sharding (sizes the buckets)
    expert_grads_unsharded: float  # the routed-expert part of it (reduced over EDP, the rest over DP)
    largest_layer_weights: float  # unsharded weight bytes of the biggest layer (ZeRO-3 gathers it)


def state_bytes(tensors: list[ParamTensor], layout: Layout, prec: Precision, replicas: int = 1) -> StateBytes:
    """Weights, gradients and optimizer states of ``tensors`` on one device (module docstring formulas).

    Args:
        replicas: devices in one pipeline that hold the same stage (2 under DualPipe);
            they join the ZeRO group.
    """
    groups = {False: layout.dp * replicas, True: layout.edp * replicas}
    # Sum per (is_expert, format) so that each flat ZeRO buffer is padded once.
    w_sum: dict[tuple[bool, str], int] = {}
    buffers = 0.0
    grad_n = {False: 0, True: 0}
    opt_sum: dict[tuple[bool, float], int] = {}
    params = 0
    for t in tensors:
        n = device_numel(t, layout)
        fmt = weight_format(t, prec)
        if not t.trainable:
            buffers += n * DTYPE_BYTES[fmt]
            continue
        params += n
        w_sum[(t.is_expert, fmt)] = w_sum.get((t.is_expert, fmt), 0) + n
        grad_n[t.is_expert] += n
        per = 2 * DTYPE_BYTES[prec.moments] + prec.master_bytes(fmt)
        opt_sum[(t.is_expert, per)] = opt_sum.get((t.is_expert, per), 0) + n

    def shard(n: int, expert: bool, on: bool) -> int:
        return math.ceil(n / groups[expert]) if on else n

    weights = buffers + sum(shard(n, e, layout.zero >= 3) * DTYPE_BYTES[f] for (e, f), n in w_sum.items())
    g = DTYPE_BYTES[prec.grads]
    grads = sum(shard(n, e, layout.zero >= 2) * g for e, n in grad_n.items())
    optimizer = sum(shard(n, e, layout.zero >= 1) * per for (e, per), n in opt_sum.items())
    layer_w: dict[str, float] = {}
    for t in tensors:
        m = _LAYER_RE.match(t.name)
        key = m.group(0) if m else t.name
        layer_w[key] = layer_w.get(key, 0.0) + device_numel(t, layout) * DTYPE_BYTES[weight_format(t, prec)]
    return StateBytes(
        params=params,
        weights=weights,
        grads=grads,
        optimizer=optimizer,
        grads_unsharded=sum(grad_n.values()) * g,
        expert_grads_unsharded=grad_n[True] * g,
        largest_layer_weights=max(layer_w.values(), default=0.0),
    )


def stage_activation_items(cfg: ModelConfig, layout: Layout, prec: Precision, part: StageParts) -> list[list[act.ActItem]]:
    """The saved-tensor items of a stage, one list per unit (each layer; embedding, rope, head, MTP)."""
    units: list[list[act.ActItem]] = []
    if part.embedding:
        units.append(act.embedding_items(cfg, layout, prec))
    if part.layers:
        units.append(act.rope_items(cfg, layout, prec))
    for i in part.layers:
        units.append(act.decoder_layer_items(cfg, layout, prec, cfg.is_moe_layer(i), f"layers.{i}."))
    if part.head:
        units.append(act.head_items(cfg, layout, prec))
    if part.mtp:
        from dsv3.plan.params import mtp_layer_is_moe

        for k in range(cfg.num_nextn_predict_layers):
            units.append(act.mtp_items(cfg, layout, prec, k, mtp_layer_is_moe(cfg, k)))
    return units


@dataclass
class ActivationBytes:
    per_microbatch: float  # bytes one micro-batch keeps for backward on this stage
    working_set: float  # extra bytes while one layer is recomputed in backward


def activation_bytes(units: list[list[act.ActItem]], layout: Layout) -> ActivationBytes:
    tokens = layout.tokens_per_microbatch
    policy = layout.recompute
    kept = sum(act.bytes_per_token(u, policy) for u in units)
    dropped = max((act.bytes_per_token(u, "none") - act.bytes_per_token(u, policy) for u in units), default=0.0)
    return ActivationBytes(per_microbatch=tokens * kept, working_set=tokens * dropped)


def comm_buffer_bytes(cfg: ModelConfig, layout: Layout, prec: Precision, parts: list[StageParts],
                      states: list[StateBytes]) -> dict[str, float]:
    """Communication buffers one device keeps (for the stages ``parts`` it holds).

    - ``pp_p2p``: send and receive buffers for the activation and its gradient
      at the stage boundary, ``T/SP x d`` each, per direction of data flow;
    - ``tp_gather``: two all-gathered ``T x d`` sequence buffers (sequence parallelism);
    - ``ep_all_to_all``: dispatch and combine buffers of ``K_r * ETP / TP * T``
      token copies of ``d``;
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
        out["zero3_gather"] = 2 * max(s.largest_layer_weights for s in states)
    return out


@dataclass
class StageMemory:
    """Memory of one pipeline stage on a device that holds it (bytes unless said otherwise).

    For a device that holds one stage (1F1B, ZB1P) this equals the device's
    memory; under DualPipe / DualPipeV, :class:`DeviceMemory` adds up the two
    stages a device holds (activations: its peak in-flight count times the
    larger stage's per-micro-batch bytes; buffers counted once).
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
    microbatches_in_flight: float
    recompute_working_set: float
    activations: float
    comm_buffers: dict[str, float] = field(default_factory=dict)
    fragmentation: float = 0.0
    items: list[list[act.ActItem]] = field(repr=False, default_factory=list)

    @property
    def subtotal(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + sum(self.comm_buffers.values())

    @property
    def total(self) -> float:
        return self.subtotal + self.fragmentation

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
class DeviceMemory:
    """Everything one pipeline device holds: its stages, buffers and the fragmentation allowance."""

    device: int
    stages: list[int]
    params: int
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

    def to_dict(self) -> dict:
        return {
            "device": self.device,
            "stages": self.stages,
            "params": self.params,
            "memory_bytes": {
                "weights": self.weights,
                "grads": self.grads,
                "optimizer": self.optimizer,
                "activations": self.activations,
                "comm_buffers": sum(self.comm_buffers.values()),
                "comm_buffer_items": self.comm_buffers,
                "fragmentation": self.fragmentation,
                "total": self.total,
            },
        }


def memory_plan(cfg: ModelConfig, params: ModelParams, layout: Layout, prec: Precision, stage_layers: tuple[int, ...],
                in_flight: list[float], fragmentation: float = DEFAULT_FRAGMENTATION) -> tuple[list[StageMemory], list[DeviceMemory]]:
    """Per-stage and per-device memory.

    Args:
        stage_layers: layers per stage.
        in_flight: peak micro-batches whose activations each pipeline device
            holds (``SimResult.peak_activations``), in units of one stage's
            activations. A device holding two stages is charged its peak times
            the larger of its stages' per-micro-batch activations.
        fragmentation: allowance as a fraction of the device's other memory.
    """
    parts = stage_parts(cfg, layout, stage_layers)
    dev_of = devices_of_stage(layout.pp, layout.schedule)
    replicas = 2 if layout.schedule == "dualpipe" else 1
    stages: list[StageMemory] = []
    states: list[StateBytes] = []
    for part in parts:
        sb = state_bytes(stage_tensors(params, part), layout, prec, replicas)
        units = stage_activation_items(cfg, layout, prec, part)
        ab = activation_bytes(units, layout)
        peak = max(in_flight[d] for d in dev_of[part.stage])
        stages.append(
            StageMemory(
                stage=part.stage,
                layers=part.layers,
                extras=part.extras,
                devices=dev_of[part.stage],
                params_per_device=sb.params,
                weights=sb.weights,
                grads=sb.grads,
                optimizer=sb.optimizer,
                activations_per_microbatch=ab.per_microbatch,
                microbatches_in_flight=peak,
                recompute_working_set=ab.working_set,
                activations=peak * ab.per_microbatch + ab.working_set,
                comm_buffers=comm_buffer_bytes(cfg, layout, prec, [part], [sb]),
                items=units,
            )
        )
        stages[-1].fragmentation = fragmentation * stages[-1].subtotal
        states.append(sb)
    devices: list[DeviceMemory] = []
    for dev, held in enumerate(stage_devices(layout.pp, layout.schedule)):
        ss = [stages[s] for s in held]
        act_bytes = in_flight[dev] * max(s.activations_per_microbatch for s in ss) + max(s.recompute_working_set for s in ss)
        buffers = comm_buffer_bytes(cfg, layout, prec, [parts[s] for s in held], [states[s] for s in held])
        dm = DeviceMemory(
            device=dev,
            stages=held,
            params=sum(s.params_per_device for s in ss),
            weights=sum(s.weights for s in ss),
            grads=sum(s.grads for s in ss),
            optimizer=sum(s.optimizer for s in ss),
            activations=act_bytes,
            comm_buffers=buffers,
            fragmentation=0.0,
        )
        dm.fragmentation = fragmentation * dm.subtotal
        devices.append(dm)
    return stages, devices
