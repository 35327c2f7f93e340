"""``make_plan``: parameters, FLOPs, per-device memory, schedule and cost of one layout.

This is the library function behind ``dsv3 plan``; everything is arithmetic
over the model config (no torch), so a plan for DeepSeek-V3 takes milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dsv3.config import ModelConfig
from dsv3.errors import ConfigError
from dsv3.plan import activations as act
from dsv3.plan.cost import Hardware, Throughput, budget, dp_sync_seconds, run_schedule, stage_times, throughput
from dsv3.plan.flops import ModelFlops, flops_summary, model_flops
from dsv3.plan.layout import Layout, balanced_stage_layers
from dsv3.plan.memory import (
    DEFAULT_FRAGMENTATION,
    DeviceMemory,
    StageMemory,
    memory_plan,
    stage_parts,
    stage_tensors,
    state_bytes,
)
from dsv3.plan.params import ModelParams, count_params
from dsv3.plan.precision import Precision


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

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "microbatches": self.microbatches,
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
            from dsv3.plan.params import mtp_layer_is_moe

            out["mtp"] = [
                i.to_dict()
                for k in range(cfg.num_nextn_predict_layers)
                for i in act.mtp_items(cfg, lay, prec, k, mtp_layer_is_moe(cfg, k))
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
    """
    precision = precision or Precision()
    hardware = hardware or Hardware()
    if not 0 <= fragmentation < 1:
        raise ConfigError(f"--fragmentation must be a fraction in [0, 1), got {fragmentation}")
    layout.validate(cfg)
    params = params or count_params(cfg)
    flops = model_flops(cfg, layout.seq_len, causal, params)
    fsum = flops_summary(cfg, layout.seq_len, causal, layout.mtp, layout.recompute, params)
    stage_layers = tuple(layout.stage_layers) if layout.stage_layers is not None else default_stage_layers(cfg, layout, flops)
    parts = stage_parts(cfg, layout, stage_layers)
    replicas = 2 if layout.schedule == "dualpipe" else 1
    states = [state_bytes(stage_tensors(params, p), layout, precision, replicas) for p in parts]
    times = stage_times(cfg, layout, precision, hardware, flops, parts, states)
    m = layout.microbatches
    if layout.pp == 1:
        sched = ScheduleInfo(layout.schedule, m, m * (times.f + times.b), [0.0], [1.0], times.f, times.b, times.w, times.fb, 0.0)
    else:
        res = run_schedule(layout, times)
        sched = ScheduleInfo(
            layout.schedule, m, float(res.makespan), [float(x) for x in res.bubble],
            [float(x) for x in res.peak_activations], times.f, times.b, times.w, times.fb, times.comm, res,
        )
    stages, devices = memory_plan(cfg, params, layout, precision, stage_layers, sched.peak_activations, fragmentation)
    # Gradient reduction after the last backward, for the device with the most gradients.
    sync = 0.0
    for dev in devices:
        total = sum(states[s].grads_unsharded for s in dev.stages)
        expert = sum(states[s].expert_grads_unsharded for s in dev.stages)
        sync = max(sync, dp_sync_seconds(layout, precision, hardware, total - expert, expert))
    step = sched.makespan + sync
    est_tps = layout.batch * layout.seq_len / (step * layout.gpus)
    tput = throughput(
        fsum["training_per_token"], hardware, tokens_per_s_per_gpu=tokens_per_s_per_gpu, mfu=mfu,
        estimated_tokens_per_s_per_gpu=est_tps,
    )
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
