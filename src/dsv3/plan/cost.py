"""Step time, throughput, MFU, GPU-hours and cost.

Throughput comes from the first given of: a measured ``--tokens-per-s-per-gpu``; an assumed ``--mfu``
(tokens/s/GPU = MFU x peak FLOP/s / training FLOPs per token); the step-time model (an estimate for
ranking layouts, not a measurement). Then (PaLM, arXiv 2204.02311, appendix B)::

    MFU        = tokens/s/GPU x FLOPs per token / peak FLOP/s
    GPU-hours  = tokens / (tokens/s/GPU) / 3600
    wall-clock = GPU-hours / GPUs;   cost = GPU-hours x price per GPU-hour

The step-time model gives the slowest stage's F, B = 2F + R (R: recomputed forward) and W per
micro-batch, adds the communication that cannot hide (EP all-to-all, TP's SP collectives, ZeRO-3 gathers;
DualPipe/DualPipeV overlap the first and last), lets :mod:`dsv3.plan.simulate` turn them into the
makespan, and adds the DP/EDP gradient reduction (docs/planner.md, "Module notes: the step-time model").
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv3.config import ModelConfig
from dsv3.errors import ConfigError, DsV3Error, clip
from dsv3.layout import DUAL_SCHEDULES
from dsv3.plan.flops import ModelFlops
from dsv3.plan.layout import Layout
from dsv3.plan.limits import MAX_GPUS, check_float, check_int
from dsv3.plan.memory import StageParts, StateBytes
from dsv3.plan.precision import Precision, element_bytes
from dsv3.plan.simulate import simulate

#: H800 / H100 SXM dense BF16 tensor-core peak, TFLOP/s.
DEFAULT_PEAK_TFLOPS = 989.0


@dataclass(frozen=True)
class Hardware:
    """The accelerator and network the estimate assumes.

    Attributes:
        peak_tflops: peak dense FLOP/s of one GPU in TFLOP/s (MFU's denominator).
        efficiency: fraction of the peak the GEMMs reach (assumed, for the step-time model).
        nvlink_gbps: GB/s one GPU moves to a GPU of its node.
        ib_gbps: GB/s one GPU moves to another node.
        gpus_per_node: GPUs sharing NVLink.
    """

    peak_tflops: float = DEFAULT_PEAK_TFLOPS
    efficiency: float = 0.5
    nvlink_gbps: float = 160.0
    ib_gbps: float = 50.0
    gpus_per_node: int = 8

    def __post_init__(self) -> None:
        for name in ("peak_tflops", "nvlink_gbps", "ib_gbps"):
            check_float(name.replace("_", "-"), getattr(self, name), inclusive=False)
        check_float("efficiency", self.efficiency, inclusive=False, maximum=1.0)
        check_int("gpus-per-node", self.gpus_per_node, maximum=MAX_GPUS)

    @property
    def peak(self) -> float:
        return self.peak_tflops * 1e12

    def link(self, group: int) -> float:
        """Bytes/s of a collective over ``group`` consecutive devices."""
        return (self.nvlink_gbps if group <= self.gpus_per_node else self.ib_gbps) * 1e9


def stage_forward_flops(flops: ModelFlops, part: StageParts) -> float:
    """Forward FLOPs per token of one stage (its layers, the head and MTP modules it holds)."""
    fwd = sum(flops.layers[i] for i in part.layers)
    if part.head:
        fwd += flops.head
    if part.mtp:
        fwd += sum(flops.mtp)
    return fwd


def recompute_flops(flops: ModelFlops, part: StageParts, policy: str) -> float:
    """Forward FLOPs per token the stage re-runs in its backward under ``policy``."""
    if policy == "full":
        return sum(flops.layers[i] for i in part.layers) + (sum(m - flops.head for m in flops.mtp) if part.mtp else 0.0)
    if policy == "selective":
        return sum(flops.recompute_selective[i] for i in part.layers) + (
            sum(flops.mtp_recompute_selective) if part.mtp else 0.0
        )
    return 0.0


def all_to_all_seconds(cfg: ModelConfig, layout: Layout, prec: Precision, hw: Hardware) -> float:
    """One MoE layer's dispatch + combine time for one micro-batch (forward; the backward repeats it).

    Each device sends its ``K_r * ETP / TP * b * s`` token copies of ``d`` elements
    (dispatch in FP8 with ``--fp8``, combine in the activation format), the
    fraction ``(EP-1)/EP`` leaving the device. Inside a node that is NVLink.
    When EP spans ``n`` nodes, ``(n-1)/n`` of the copies cross InfiniBand; with
    node-limited routing (report 3.2.2: a token reaches at most ``topk_group``
    nodes, each receiving one copy over IB that NVLink forwards) only
    ``min(K_r, topk_group)`` copies per token do. IB and NVLink run concurrently.
    """
    t = layout.tokens_per_microbatch
    k = cfg.num_experts_per_tok
    per_copy = cfg.hidden_size * (
        (element_bytes(prec.fp8_cache) if layout.fp8 else element_bytes(prec.activations))
        + element_bytes(prec.activations)
    )
    tokens = t * layout.etp / layout.tp
    span = layout.ep * layout.etp
    nvlink = tokens * k * (layout.ep - 1) / layout.ep * per_copy / (hw.nvlink_gbps * 1e9)
    if span <= hw.gpus_per_node:
        return nvlink
    nodes = span / hw.gpus_per_node
    ib_copies = min(k, cfg.topk_group) if cfg.group_limited else k
    ib = tokens * ib_copies * (nodes - 1) / nodes * per_copy / (hw.ib_gbps * 1e9)
    return max(ib, nvlink)


@dataclass
class StageTimes:
    """Seconds per micro-batch on the slowest stage (what the simulator takes)."""

    f: float
    b: float
    w: float
    fb: float
    comm: float  # stage-to-stage transfer of one activation
    compute_f: float
    exposed_comm_per_microbatch: float
    slowest_stage: int


def stage_times(
    cfg: ModelConfig,
    layout: Layout,
    prec: Precision,
    hw: Hardware,
    flops: ModelFlops,
    parts: list[StageParts],
    states: list[StateBytes],
) -> StageTimes:
    """F, B, W, F&B and the P2P time of the slowest stage (see the module docstring)."""
    t = layout.tokens_per_microbatch
    rate = hw.peak * hw.efficiency
    a = element_bytes(prec.activations)
    d = cfg.hidden_size
    overlap = layout.schedule in DUAL_SCHEDULES
    best = None
    for part, st in zip(parts, states):
        fwd = stage_forward_flops(flops, part)
        F = fwd * t / layout.tp / rate
        R = recompute_flops(flops, part, layout.recompute) * t / layout.tp / rate
        n_moe = sum(cfg.is_moe_layer(i) for i in part.layers) + (cfg.num_nextn_predict_layers if part.mtp else 0)
        n_layers = len(part.layers) + (cfg.num_nextn_predict_layers if part.mtp else 0)
        # TP collectives sit between the GEMMs of a chunk: always exposed. The EP all-to-all and ZeRO-3's
        # gathers can overlap another chunk's computation, which DualPipe and DualPipeV arrange.
        exposed_f = 0.0
        if layout.tp > 1:
            exposed_f += n_layers * 4 * (layout.tp - 1) / layout.tp * t * d * a / hw.link(layout.tp)
        hidden_f = 0.0
        if layout.ep > 1 and cfg.n_routed_experts:
            hidden_f += n_moe * all_to_all_seconds(cfg, layout, prec, hw)
        if layout.zero >= 3:
            g = layout.dp
            hidden_f += st.weights * (g - 1) / hw.link(g * layout.tp)
        # the backward moves the same volumes (gradients instead of activations)
        B = 2 * F + R
        W = F
        f, b = F + exposed_f + hidden_f, B + exposed_f + hidden_f
        if overlap:
            fb = max(F + B + 2 * exposed_f, 2 * hidden_f)
        else:
            fb = f + b
        comm_f = exposed_f + hidden_f
        comm_b = comm_f
        p2p = t / layout.sp * d * a / (hw.ib_gbps * 1e9)  # stages sit on different nodes
        cand = StageTimes(f, b, W, fb, p2p, F, comm_f + comm_b, part.stage)
        if best is None or cand.f + cand.b > best.f + best.b:
            best = cand
    assert best is not None
    return best


def dp_sync_seconds(layout: Layout, prec: Precision, hw: Hardware, dense_grads: float, expert_grads: float) -> float:
    """Gradient all-reduce (ring: 2(n-1)/n of the bytes) over DP for dense and EDP for expert gradients."""
    secs = 0.0
    for n, nbytes in ((layout.dp, dense_grads), (layout.edp, expert_grads)):
        if n > 1:
            secs += 2 * (n - 1) / n * nbytes / hw.link(n * layout.tp)
    return secs


def run_schedule(schedule, times: StageTimes):
    """Simulate one step of a built pipeline schedule; returns ``dsv3.plan.simulate.SimResult``."""
    try:
        return simulate(schedule, f=times.f, b=times.b, w=times.w, fb=times.fb, comm=times.comm)
    except DsV3Error:
        raise
    except ValueError as exc:  # pragma: no cover - the simulator raises ConfigError for bad input
        raise ConfigError(str(exc).rstrip(".")) from None


@dataclass
class Throughput:
    tokens_per_s_per_gpu: float
    mfu: float
    source: str  # "measured", "assumed_mfu" or "estimated"


def throughput(
    flops_per_token: float,
    hw: Hardware,
    *,
    tokens_per_s_per_gpu: float | None = None,
    mfu: float | None = None,
    estimated_tokens_per_s_per_gpu: float | None = None,
) -> Throughput:
    """Tokens/s per GPU and MFU from the first source given (module docstring)."""
    if tokens_per_s_per_gpu is not None:
        check_float("tokens-per-s-per-gpu", tokens_per_s_per_gpu, inclusive=False)
        return Throughput(tokens_per_s_per_gpu, tokens_per_s_per_gpu * flops_per_token / hw.peak, "measured")
    if mfu is not None:
        check_float("mfu", mfu, inclusive=False, maximum=1.0)
        return Throughput(mfu * hw.peak / flops_per_token, mfu, "assumed_mfu")
    if estimated_tokens_per_s_per_gpu is None:
        raise ConfigError("give --tokens-per-s-per-gpu or --mfu to compute a cost")
    tps = estimated_tokens_per_s_per_gpu
    return Throughput(tps, tps * flops_per_token / hw.peak, "estimated")


def budget(tokens: float, gpus: int, tp: Throughput, price_per_gpu_hour: float | None = None) -> dict:
    """GPU-hours, wall-clock hours and cost of training on ``tokens`` tokens with ``gpus`` GPUs."""
    check_float("tokens", tokens, inclusive=False)
    gpu_hours = tokens / tp.tokens_per_s_per_gpu / 3600.0
    out = {
        "tokens": tokens,
        "gpus": gpus,
        "gpu_hours": gpu_hours,
        "wall_clock_hours": gpu_hours / gpus,
        "wall_clock_days": gpu_hours / gpus / 24.0,
    }
    if price_per_gpu_hour is not None:
        check_float("price-per-gpu-hour", price_per_gpu_hour)
        out["price_per_gpu_hour"] = price_per_gpu_hour
        out["cost"] = gpu_hours * price_per_gpu_hour
    return out


def parse_count(text: str | float | int, what: str) -> float:
    """A count written plainly or with a suffix: ``14.8T``, ``2e12``, ``500B``, ``3M``."""
    if isinstance(text, (int, float)):
        return float(text)
    s = str(text).strip().replace("_", "").replace(",", "")
    scale = 1.0
    suffixes = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12, "P": 1e15}
    if s and s[-1].upper() in suffixes:
        scale = suffixes[s[-1].upper()]
        s = s[:-1]
    try:
        value = float(s) * scale
    except ValueError:
        raise ConfigError(f"{what} {clip(text)} is not a number; write it like 14.8T, 500B or 2e12") from None
    return value


__all__ = [
    "Hardware",
    "StageTimes",
    "stage_times",
    "run_schedule",
    "throughput",
    "budget",
    "dp_sync_seconds",
    "parse_count",
]
