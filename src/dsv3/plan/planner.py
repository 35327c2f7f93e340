"""``make_plan``: parameters, FLOPs, per-device memory, schedule and cost of one layout.

This is the library function behind ``dsv3 plan``; everything is arithmetic
over the model config (no torch), so a plan for DeepSeek-V3 takes milliseconds.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from dsv3.config import ModelConfig
from dsv3.errors import ConfigError
from dsv3.layout import DUAL_SCHEDULES, balanced_stage_layers, fill_microbatches
from dsv3.plan import activations as act
from dsv3.plan import limits
from dsv3.plan.cost import (
    Hardware,
    StageTimes,
    Throughput,
    budget,
    dp_sync_seconds,
    run_schedule,
    stage_times,
    throughput,
)
from dsv3.plan.flops import ModelFlops, flops_summary, model_flops
from dsv3.plan.layout import Layout
from dsv3.plan.memory import (
    DEFAULT_FRAGMENTATION,
    DeviceMemory,
    StageMemory,
    memory_plan,
    occupancy_profiles,
    stage_parts,
    stage_state_bytes,
    unit_activations,
)
from dsv3.plan.params import ModelParams, count_params, mtp_layer_is_moe
from dsv3.plan.precision import Precision
from dsv3.schedules import build_schedule


@dataclass
class ScheduleInfo:
    """What the pipeline simulator reported for one step."""

    name: str
    microbatches: int
    makespan: float
    bubble: list[float]
    peak_activations: list[float]
    f: float
    b: float
    w: float
    fb: float
    comm: float
    result: object = field(default=None, repr=False)  # the SimResult (None when PP = 1)
    extrapolated: bool = False  # makespan and bubbles extrapolated linearly from two shorter simulations

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "microbatches": self.microbatches,
            "extrapolated": self.extrapolated,
            "makespan_s": self.makespan,
            "bubble_s": self.bubble,
            "peak_activations": self.peak_activations,
            "stage_times_s": {"f": self.f, "b": self.b, "w": self.w, "fb": self.fb, "comm": self.comm},
        }


@dataclass
class Plan:
    """A complete plan; :meth:`to_dict` is the ``--json`` document."""

    cfg: ModelConfig
    model_name: str
    layout: Layout
    precision: Precision
    hardware: Hardware
    params: ModelParams
    flops: dict
    flops_per_token: float
    stage_layers: tuple[int, ...]
    stages: list[StageMemory]
    devices: list[DeviceMemory]
    schedule: ScheduleInfo
    step_time_s: float
    dp_sync_s: float
    throughput: Throughput
    gpu_memory: int | None = None
    cost: dict | None = None

    @property
    def peak_device_bytes(self) -> float:
        return max(d.total for d in self.devices)

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory is None else self.peak_device_bytes <= self.gpu_memory

    def activation_table(self) -> dict[str, list[dict]]:
        """The itemised saved tensors of each kind of unit (dense layer, MoE layer, head, MTP...)."""
        cfg, lay, prec = self.cfg, self.layout, self.precision
        out: dict[str, list[dict]] = {}
        kinds = {cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)}
        if False in kinds:
            out["dense_layer"] = [i.to_dict() for i in act.decoder_layer_items(cfg, lay, prec, False)]
        if True in kinds:
            out["moe_layer"] = [i.to_dict() for i in act.decoder_layer_items(cfg, lay, prec, True)]
        out["embedding"] = [i.to_dict() for i in act.embedding_items(cfg, lay, prec) + act.rope_items(cfg, lay, prec)]
        out["head"] = [i.to_dict() for i in act.head_items(cfg, lay, prec)]
        if lay.mtp and cfg.num_nextn_predict_layers:
            out["mtp"] = [
                i.to_dict()
                for k in range(cfg.num_nextn_predict_layers)
                for i in act.mtp_items(cfg, lay, prec, k, mtp_layer_is_moe(cfg, k), lay.pp == 1)
            ]
        return out

    def activation_per_token_summary(self) -> dict[str, dict[str, float]]:
        """Bytes per token of one dense / MoE layer under each recompute policy."""
        cfg, lay, prec = self.cfg, self.layout, self.precision
        out = {}
        for name, moe in (("dense_layer", False), ("moe_layer", True)):
            if any(cfg.is_moe_layer(i) == moe for i in range(cfg.num_hidden_layers)):
                items = act.decoder_layer_items(cfg, lay, prec, moe)
                out[name] = {p: act.bytes_per_token(items, p) for p in act.ALL}
        return out

    def to_dict(self) -> dict:
        out = {
            "model": self.model_name,
            "layout": self.layout.to_dict(),
            "precision": self.precision.to_dict(),
            "hardware": {
                "peak_tflops": self.hardware.peak_tflops,
                "efficiency": self.hardware.efficiency,
                "nvlink_gbps": self.hardware.nvlink_gbps,
                "ib_gbps": self.hardware.ib_gbps,
                "gpus_per_node": self.hardware.gpus_per_node,
                "gpu_memory_bytes": self.gpu_memory,
            },
            "params": self.params.to_dict(),
            "flops_per_token": self.flops_per_token,
            "flops": self.flops,
            "stage_layers": list(self.stage_layers),
            "stages": [s.to_dict() for s in self.stages],
            "devices": [d.to_dict() for d in self.devices],
            "peak_device_bytes": self.peak_device_bytes,
            "fits": self.fits,
            "schedule": self.schedule.to_dict(),
            "step_time_s": self.step_time_s,
            "dp_sync_s": self.dp_sync_s,
            "tokens_per_s_per_gpu": self.throughput.tokens_per_s_per_gpu,
            "mfu": self.throughput.mfu,
            "throughput_source": self.throughput.source,
            "activation_bytes_per_token": self.activation_per_token_summary(),
            "activation_items": self.activation_table(),
        }
        if self.cost is not None:
            out.update(self.cost)
        return out


def default_stage_layers(cfg: ModelConfig, layout: Layout, flops: ModelFlops) -> tuple[int, ...]:
    """The balanced split: contiguous, minimising the slowest stage's forward FLOPs."""
    use_mtp = layout.mtp and cfg.num_nextn_predict_layers > 0
    last = flops.head + (sum(flops.mtp) if use_mtp else 0.0)
    return balanced_stage_layers(list(flops.layers), 0.0, last, layout.pp)


def _quantise(x: float, step: float = 1.1) -> float:
    """``x`` rounded to the nearest power of ``step`` (relative error at most about 5 %)."""
    if x <= 0:
        return 0.0
    return step ** round(math.log(x) / math.log(step))


class PlanCache:
    """Memoises what many plans of one model share; :func:`dsv3.plan.search.search` plans thousands.

    Exact (the default): every plan runs the pipeline simulator on its own
    times. Approximate (``approximate=True``, for ranking in a search): times
    relative to F are rounded to powers of 1.1 (the P2P time to steps of
    0.05 F), so that layouts with nearly the same times share a simulation, and
    a step of more than ``m1 + 2`` micro-batches (m1 = PP, 2 PP for DualPipe,
    the fewest that fill the pipeline) is extrapolated linearly from
    simulations of ``m1`` and ``m1 + 2``: the schedules are periodic in steady
    state, so makespan and bubbles grow linearly with the micro-batch count
    (exactly without P2P time, within a few % with it) and the in-flight
    peaks no longer change. In exact mode a step of more stage micro-batches
    than one simulation runs (:data:`dsv3.plan.limits.MAX_PIPELINE_CELLS`) is
    extrapolated too, with the exact times and along whole periods of 4
    micro-batches from a simulation in the same phase, which reproduces the
    full simulation (the schedules repeat every 4 micro-batches in steady state).
    """

    def __init__(self, approximate: bool = False) -> None:
        self.approximate = approximate
        self._flops: dict = {}
        self._split: dict = {}
        self._sims: dict = {}
        self._profiles: dict = {}
        self._built: dict = {}
        self._states: dict = {}
        self._units: dict = {}

    def states(self, params: ModelParams, part, layout: Layout, prec: Precision, replicas: int):
        key = (
            tuple(part.layers),
            part.embedding,
            part.embedding_copy,
            part.head,
            part.mtp,
            layout.tp,
            layout.ep,
            layout.etp,
            layout.dp,
            layout.zero,
            replicas,
            prec,
            layout.tp_convention,
        )
        if key not in self._states:
            self._states[key] = stage_state_bytes(params, part, layout, prec, replicas)
        return dataclasses.replace(self._states[key])

    def units(self, cfg: ModelConfig, layout: Layout, prec: Precision):
        key = (
            layout.tp,
            layout.sp,
            layout.etp,
            layout.fp8,
            layout.attention,
            layout.seq_len,
            layout.micro_batch,
            layout.recompute,
            prec,
        )
        if key not in self._units:
            self._units[key] = unit_activations(cfg, layout, prec)
        return self._units[key]

    def flops(self, cfg: ModelConfig, params: ModelParams, seq_len: int, causal: bool, mtp: bool, recompute: str):
        key = (seq_len, causal, mtp, recompute)
        if key not in self._flops:
            self._flops[key] = (
                model_flops(cfg, seq_len, causal, params),
                flops_summary(cfg, seq_len, causal, mtp, recompute, params),
            )
        return self._flops[key]

    def stage_layers(self, cfg: ModelConfig, layout: Layout, flops: ModelFlops) -> tuple[int, ...]:
        key = (layout.pp, layout.mtp, flops.layers, flops.head, flops.mtp)
        if key not in self._split:
            self._split[key] = default_stage_layers(cfg, layout, flops)
        return self._split[key]

    def built(self, name: str, pp: int, m: int):
        """The schedule's op lists (``dsv3.schedules.build_schedule``), built once."""
        key = (name, pp, m)
        if key not in self._built:
            self._built[key] = build_schedule(name, pp, m)
        return self._built[key]

    def profiles(self, name: str, pp: int, m: int):
        key = (name, pp, m)
        if key not in self._profiles:
            self._profiles[key] = occupancy_profiles(self.built(name, pp, m).ops, pp)
        return self._profiles[key]

    def _simulate(self, layout: Layout, m: int, times: StageTimes):
        key = (layout.schedule, layout.pp, m, times.f, times.b, times.w, times.fb, times.comm)
        if key not in self._sims:
            self._sims[key] = run_schedule(self.built(layout.schedule, layout.pp, m), times)
        return self._sims[key]

    @staticmethod
    def too_long(layout: Layout) -> bool:
        """Whether the step holds more stage micro-batches than one simulation runs
        (:data:`dsv3.plan.limits.MAX_PIPELINE_CELLS`); such a step is extrapolated even in exact mode."""
        return layout.pp * layout.microbatches > limits.MAX_PIPELINE_CELLS

    def profile_microbatches(self, layout: Layout) -> int:
        """Micro-batches whose op lists give the in-flight peaks (fewer when extrapolating: peaks saturate)."""
        m = layout.microbatches
        if not self.approximate and not self.too_long(layout):
            return m
        return min(m, fill_microbatches(layout.pp, layout.schedule) + 2)

    def schedule(self, layout: Layout, times: StageTimes) -> "ScheduleInfo":
        """Simulate the layout's schedule (see the class docstring for the approximate mode).

        In exact mode a step longer than one simulation runs (:meth:`too_long`) is
        extrapolated from simulations of ``m1`` and ``m1 + 2`` micro-batches with the
        exact (unrounded) times, as the approximate mode does.
        """
        m = layout.microbatches
        if not self.approximate and not self.too_long(layout):
            res = self._simulate(layout, m, times)
            return ScheduleInfo(
                layout.schedule,
                m,
                float(res.makespan),
                [float(x) for x in res.bubble],
                [float(x) for x in res.peak_activations],
                times.f,
                times.b,
                times.w,
                times.fb,
                times.comm,
                res,
            )
        f = times.f
        # Only the times the schedule uses enter the key: 1F1B runs F and full backwards only.
        uses_w = layout.schedule != "1f1b"
        uses_fb = layout.schedule in DUAL_SCHEDULES
        if self.approximate:
            b = _quantise(times.b / f)
            w = min(b, _quantise(times.w / f)) if uses_w else 0.0
            fb = _quantise(times.fb / f) if uses_fb else None
            comm = round(times.comm / f / 0.05) * 0.05
        else:
            b, comm = times.b / f, times.comm / f
            w = times.w / f if uses_w else 0.0
            fb = times.fb / f if uses_fb else None
        scaled = StageTimes(1.0, b, w, fb, comm, 1.0, 0.0, times.slowest_stage)
        m1 = fill_microbatches(layout.pp, layout.schedule)
        m2 = m1 + 2
        if not self.approximate:
            # Exact times, a step too long to simulate: in steady state the makespan grows by a pattern that
            # repeats every 4 micro-batches (1F1B and DualPipe alternate two increments when P2P time is not
            # zero), so extrapolate along whole periods from a simulation in the same phase as m.
            m1 = m2 + (m - m2) % 4
            m2 = m1 + 4
        if m <= m2:
            res = self._simulate(layout, m, scaled)
            makespan, bubble, peak = res.makespan, list(res.bubble), list(res.peak_activations)
        else:
            r1, r2 = self._simulate(layout, m1, scaled), self._simulate(layout, m2, scaled)
            k = (m - m1) / (m2 - m1)
            makespan = r1.makespan + k * (r2.makespan - r1.makespan)
            bubble = [x1 + k * (x2 - x1) for x1, x2 in zip(r1.bubble, r2.bubble)]
            peak = list(r2.peak_activations)
        return ScheduleInfo(
            layout.schedule,
            m,
            makespan * f,
            [x * f for x in bubble],
            [float(x) for x in peak],
            times.f,
            times.b,
            times.w,
            times.fb,
            times.comm,
            extrapolated=m > m2,
        )


def _check_inputs(cfg: ModelConfig, layout: Layout, fragmentation: float, gpu_memory: int | None) -> None:
    """The allocator allowance, the GPU memory and the layout (:meth:`Layout.validate`)."""
    if not 0 <= fragmentation < 1:
        raise ConfigError(f"--fragmentation must be a fraction in [0, 1), got {fragmentation}")
    if gpu_memory is not None:
        limits.check_size("gpu-memory", gpu_memory)
    layout.validate(cfg)


def _dp_sync(layout: Layout, precision: Precision, hardware: Hardware, devices, states) -> float:
    """Seconds of the gradient reduction after the last backward, for the device with the most gradients."""
    sync = 0.0
    for dev in devices:
        total = sum(states[s].grads_unsharded for s in dev.stages)
        expert = sum(states[s].expert_grads_unsharded for s in dev.stages)
        sync = max(sync, dp_sync_seconds(layout, precision, hardware, total - expert, expert))
    return sync


def _step_schedule(layout: Layout, times, cache: PlanCache, simulate: bool) -> ScheduleInfo:
    """The step's schedule: not simulated (``nan``), gradient accumulation (PP 1) or the simulated pipeline."""
    m = layout.microbatches
    if not simulate:
        return ScheduleInfo(layout.schedule, m, math.nan, [], [], times.f, times.b, times.w, times.fb, times.comm)
    if layout.pp == 1:
        return ScheduleInfo(
            layout.schedule, m, m * (times.f + times.b), [0.0], [1.0], times.f, times.b, times.w, times.fb, 0.0
        )
    return cache.schedule(layout, times)


def make_plan(
    cfg: ModelConfig,
    layout: Layout,
    precision: Precision | None = None,
    hardware: Hardware | None = None,
    *,
    model_name: str = "custom",
    causal: bool = True,
    fragmentation: float = DEFAULT_FRAGMENTATION,
    gpu_memory: int | None = None,
    tokens: float | None = None,
    mfu: float | None = None,
    tokens_per_s_per_gpu: float | None = None,
    price_per_gpu_hour: float | None = None,
    params: ModelParams | None = None,
    cache: PlanCache | None = None,
    simulate: bool = True,
) -> Plan:
    """Plan one training layout of ``cfg``.

    Args:
        cfg: the model.
        layout: the parallel layout and batch (validated here; raises ConfigError).
        precision: formats of each memory item (default: the DeepSeek-V3 recipe).
        hardware: peak FLOP/s, assumed efficiency and links (default: H800 cluster of the report).
        causal: count attention FLOPs for the causal triangle only.
        fragmentation: allocator allowance, a fraction of the rest of the memory.
        gpu_memory: bytes per GPU, to say whether the plan fits.
        tokens: token budget; with it the plan has ``gpu_hours`` (and ``cost`` with a price).
        mfu / tokens_per_s_per_gpu: assumed / measured throughput (see :mod:`dsv3.plan.cost`).
        params: the parameter inventory of ``cfg`` (computed when not given).
        cache: shared memo for many plans of one model (see :class:`PlanCache`).
        simulate: run the pipeline simulator; without it the plan has memory but no
            step time (``nan``), which is all a search needs to reject a layout.
    """
    precision = precision or Precision()
    hardware = hardware or Hardware()
    cache = cache or PlanCache()
    _check_inputs(cfg, layout, fragmentation, gpu_memory)
    params = params or count_params(cfg)
    flops, fsum = cache.flops(cfg, params, layout.seq_len, causal, layout.mtp, layout.recompute)
    stage_layers = (
        tuple(layout.stage_layers) if layout.stage_layers is not None else cache.stage_layers(cfg, layout, flops)
    )
    parts = stage_parts(cfg, layout, stage_layers)
    replicas = 2 if layout.schedule == "dualpipe" else 1
    states = [cache.states(params, p, layout, precision, replicas) for p in parts]
    times = stage_times(cfg, layout, precision, hardware, flops, parts, states)
    # gradient accumulation (PP 1) runs one micro-batch after the other: no pipeline profiles
    profiles = cache.profiles(layout.schedule, layout.pp, cache.profile_microbatches(layout)) if layout.pp > 1 else None
    units = cache.units(cfg, layout, precision)
    stages, devices = memory_plan(
        cfg, params, layout, precision, stage_layers, profiles, fragmentation, states=states, units=units
    )
    sync = _dp_sync(layout, precision, hardware, devices, states)
    sched = _step_schedule(layout, times, cache, simulate)
    step = sched.makespan + sync
    est_tps = layout.batch * layout.seq_len / (step * layout.gpus) if simulate else math.nan
    observed = dict(tokens_per_s_per_gpu=tokens_per_s_per_gpu, mfu=mfu, estimated_tokens_per_s_per_gpu=est_tps)
    tput = throughput(fsum["training_per_token"], hardware, **observed)
    cost = budget(tokens, layout.gpus, tput, price_per_gpu_hour) if tokens is not None else None
    return Plan(
        cfg=cfg,
        model_name=model_name,
        layout=layout,
        precision=precision,
        hardware=hardware,
        params=params,
        flops=fsum,
        flops_per_token=fsum["training_per_token"],
        stage_layers=stage_layers,
        stages=stages,
        devices=devices,
        schedule=sched,
        step_time_s=step,
        dp_sync_s=sync,
        throughput=tput,
        gpu_memory=gpu_memory,
        cost=cost,
    )
