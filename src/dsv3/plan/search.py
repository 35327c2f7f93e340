"""``dsv3 plan search``: every layout of a GPU count, which fit, ranked by estimated step time.

The grid: for each schedule, every PP whose pipeline devices (PP, or PP/2 for
DualPipeV) times TP divide the GPU count (PP >= 2 for the DualPipes, which
also need it even; PP = 1 is listed once, as ``1f1b``: no pipeline), every TP
in the list, DP = GPUs / (pipeline devices x TP), and every EP, ETP, ZeRO
stage and recompute policy in the lists. A layout is rejected with the
sentence :meth:`Layout.validate` or the schedule raises (it does not divide,
too few micro-batches) or because its largest device needs more than the GPU
memory. The rest are ranked by the estimated step time of the plan (see
:mod:`dsv3.plan.cost`), computed with the approximate simulation of
:class:`~dsv3.plan.planner.PlanCache`; the ``top`` fastest are then planned
exactly and re-ranked, so every number shown comes from a full simulation.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from dsv3.config import ModelConfig
from dsv3.errors import ConfigError, DsV3Error, clip
from dsv3.layout import RECOMPUTE_MODES, SCHEDULES, pipeline_devices
from dsv3.plan import limits
from dsv3.plan.cost import Hardware
from dsv3.plan.layout import Layout
from dsv3.plan.limits import divisors
from dsv3.plan.memory import DEFAULT_FRAGMENTATION
from dsv3.plan.params import count_params
from dsv3.plan.planner import PlanCache, make_plan
from dsv3.plan.precision import Precision, format_bytes


@dataclass
class Candidate:
    """One layout of the search and its verdict."""

    layout: Layout
    fits: bool
    reason: str | None = None
    peak_bytes: float | None = None
    step_time_s: float | None = None
    tokens_per_s_per_gpu: float | None = None
    mfu: float | None = None
    exact: bool = False

    def to_dict(self) -> dict:
        return {
            "layout": {k: v for k, v in self.layout.to_dict().items() if k != "stage_layers"},
            "fits": self.fits,
            "reason": self.reason,
            "peak_bytes": self.peak_bytes,
            "step_time_s": self.step_time_s,
            "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
            "mfu": self.mfu,
            "exact": self.exact,
        }


@dataclass
class SearchResult:
    model_name: str
    gpus: int
    gpu_memory: int
    tp_convention: str = "megatron"
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def fits(self) -> list[Candidate]:
        """Fitting layouts, fastest first (ties: lower ZeRO stage, then less memory)."""
        ok = [c for c in self.candidates if c.fits]
        return sorted(ok, key=lambda c: (not c.exact, c.step_time_s, c.layout.zero, c.peak_bytes))

    @property
    def rejected(self) -> list[Candidate]:
        """Rejected layouts: those that ran out of memory first (least over), then those that do not divide."""
        bad = [c for c in self.candidates if not c.fits]
        return sorted(bad, key=lambda c: (c.peak_bytes is None, c.peak_bytes or 0.0))

    def to_dict(self) -> dict:
        return {
            "model": self.model_name,
            "gpus": self.gpus,
            "gpu_memory_bytes": self.gpu_memory,
            "tp_convention": self.tp_convention,
            "tried": len(self.candidates),
            "fits": [c.to_dict() for c in self.fits],
            "rejected": [c.to_dict() for c in self.rejected],
        }


def default_grid(cfg: ModelConfig, gpus: int, gpus_per_node: int) -> dict[str, list]:
    """Default candidate lists: PP up to the layer count, TP within a node dividing the heads, EP dividing N_r,
    ETP 1, ZeRO-1 (the report's choice; pass more stages to compare), every recompute policy and schedule."""
    n = cfg.num_hidden_layers
    pps = sorted({d for d in divisors(gpus) if d <= n} | {2 * d for d in divisors(gpus) if 2 * d <= n})
    tps = [t for t in divisors(cfg.num_attention_heads) if t <= gpus_per_node and gpus % t == 0]
    eps = [e for e in divisors(cfg.n_routed_experts) if e <= gpus] if cfg.n_routed_experts else [1]
    return {
        "pp": pps,
        "tp": tps,
        "ep": eps,
        "etp": [1],
        "zero": [1],
        "recompute": list(RECOMPUTE_MODES),
        "schedule": list(SCHEDULES),
    }


def search(
    cfg: ModelConfig,
    gpus: int,
    gpu_memory: int,
    *,
    model_name: str = "custom",
    grid: dict[str, list] | None = None,
    seq_len: int = 4096,
    micro_batch: int = 1,
    global_batch: int | None = None,
    fp8: bool = False,
    attention: str = "fused",
    mtp: bool = True,
    balance_loss: bool = True,
    precision: Precision | None = None,
    hardware: Hardware | None = None,
    fragmentation: float = DEFAULT_FRAGMENTATION,
    causal: bool = True,
    top: int = 20,
    tp_convention: str = "megatron",
) -> SearchResult:
    """Try every layout of ``gpus`` GPUs in ``grid`` (defaults: :func:`default_grid`); see the module docstring."""
    limits.check_gpus("gpus", gpus)
    limits.check_size("gpu-memory", gpu_memory)
    for name, value in (("seq-len", seq_len), ("micro-batch", micro_batch), ("global-batch", global_batch)):
        if value is not None:  # every layout would be rejected for the same reason: say it once
            limits.check_int(name, value)
    limits.check_int("top", top, minimum=0, maximum=limits.MAX_SEARCH_LAYOUTS)
    limits.check_model(cfg)
    hardware = hardware or Hardware()
    precision = precision or Precision()
    g = _grid(cfg, gpus, hardware, grid)
    fixed = dict(
        seq_len=seq_len,
        micro_batch=micro_batch,
        global_batch=global_batch,
        fp8=fp8,
        attention=attention,
        mtp=mtp,
        balance_loss=balance_loss,
        tp_convention=tp_convention,
    )
    params = count_params(cfg)
    cache = PlanCache(approximate=True)
    result = SearchResult(model_name, gpus, gpu_memory, tp_convention)
    for lay in _layouts(g, gpus, fixed):
        result.candidates.append(
            _try(cfg, lay, precision, hardware, fragmentation, causal, gpu_memory, params, cache, model_name)
        )
    # Plan the fastest exactly and re-rank them.
    for c in result.fits[:top]:
        exact = _try(cfg, c.layout, precision, hardware, fragmentation, causal, gpu_memory, params, None, model_name)
        exact.exact = exact.fits
        result.candidates[result.candidates.index(c)] = exact
    return result


def _grid(cfg: ModelConfig, gpus: int, hardware: Hardware, grid: dict[str, list] | None) -> dict[str, list]:
    """The default grid with the user's values in place of its own, checked and within the search's size."""
    g = default_grid(cfg, gpus, hardware.gpus_per_node)
    for key, values in (grid or {}).items():
        if key not in g:
            raise ConfigError(f"unknown search grid key {clip(key)}; use {', '.join(g)}")
        if values:
            g[key] = list(dict.fromkeys(values))  # each value once, in the order given
    _check_grid(g)
    n = count_layouts(g, gpus)
    if n > limits.MAX_SEARCH_LAYOUTS:
        raise ConfigError(
            f"the search grid holds {n:,} layouts, more than the {limits.MAX_SEARCH_LAYOUTS:,} one search tries; "
            f"narrow it with --pp, --tp, --ep, --etp, --zero, --recompute or --schedule"
        )
    return g


def _layouts(g: dict[str, list], gpus: int, fixed: dict):
    """Each distinct layout of ``gpus`` GPUs in grid ``g`` (dp fills the rest), with the ``fixed`` options."""
    seen: set = set()
    for schedule in g["schedule"]:
        for pp in g["pp"]:
            name = "1f1b" if pp == 1 else schedule  # without a pipeline the schedule does not matter
            devices = pipeline_devices(pp, name) if pp % 2 == 0 else pp  # odd PP: validate says why not
            for tp in g["tp"]:
                if gpus % (devices * tp):
                    continue
                dp = gpus // (devices * tp)
                for ep, etp, zero, recompute in itertools.product(g["ep"], g["etp"], g["zero"], g["recompute"]):
                    lay = Layout(
                        pp=pp, tp=tp, ep=ep, etp=etp, dp=dp, zero=zero, recompute=recompute, schedule=name, **fixed
                    )
                    if lay not in seen:
                        seen.add(lay)
                        yield lay


def _check_grid(g: dict[str, list]) -> None:
    """Every value of the grid is a valid one, before any layout is tried."""
    for key in ("pp", "tp", "ep", "etp"):
        for v in g[key]:
            limits.check_int(f"{key} value", v, maximum=limits.MAX_GPUS)
    for v in g["zero"]:
        if not isinstance(v, int) or isinstance(v, bool) or v not in (0, 1, 2, 3):
            raise ConfigError(f"--zero values must be 0, 1, 2 or 3, got {clip(v)}")
    for v in g["recompute"]:
        if v not in RECOMPUTE_MODES:
            raise ConfigError(f"unknown --recompute {clip(v)}; choose from {', '.join(RECOMPUTE_MODES)}")
    for v in g["schedule"]:
        if v not in SCHEDULES:
            raise ConfigError(f"unknown schedule {clip(v)}; choose one of {', '.join(SCHEDULES)}")


def count_layouts(g: dict[str, list], gpus: int) -> int:
    """How many layouts :func:`search` tries for grid ``g`` (at most; an upper bound before de-duplication)."""
    per = len(g["ep"]) * len(g["etp"]) * len(g["zero"]) * len(g["recompute"])
    n = 0
    for schedule in g["schedule"]:
        for pp in g["pp"]:
            name = "1f1b" if pp == 1 else schedule
            devices = pipeline_devices(pp, name) if pp % 2 == 0 else pp
            n += per * sum(1 for tp in g["tp"] if gpus % (devices * tp) == 0)
    return n


def _try(cfg, lay, precision, hardware, fragmentation, causal, gpu_memory, params, cache, model_name) -> Candidate:
    kwargs = dict(
        model_name=model_name,
        causal=causal,
        fragmentation=fragmentation,
        gpu_memory=gpu_memory,
        params=params,
        cache=cache,
    )
    try:
        plan = make_plan(cfg, lay, precision, hardware, simulate=False, **kwargs)
        peak = plan.peak_device_bytes
        if peak <= gpu_memory:
            plan = make_plan(cfg, lay, precision, hardware, **kwargs)
    except DsV3Error as exc:
        return Candidate(lay, False, str(exc).rstrip("."))
    if peak <= gpu_memory:
        return Candidate(
            lay, True, None, peak, plan.step_time_s, plan.throughput.tokens_per_s_per_gpu, plan.throughput.mfu
        )
    worst = max(plan.devices, key=lambda d: d.total)
    parts = {
        "weights": worst.weights,
        "grads": worst.grads,
        "optimizer": worst.optimizer,
        "activations": worst.activations,
    }
    big = max(parts, key=parts.get)
    reason = (
        f"needs {format_bytes(peak)} on pipeline device {worst.device} (more than {format_bytes(gpu_memory)}), "
        f"mostly {big} ({format_bytes(parts[big])})"
    )
    return Candidate(lay, False, reason, peak)
