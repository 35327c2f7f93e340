"""The parallel layout's vocabulary, its choice lists and its one validator (torch-free, below plan/ and parallel/).

A run spreads ``pp`` pipeline stages over :func:`pipeline_devices` devices (``pp``, or ``pp / 2`` under
DualPipeV, two stages per device) times ``dp`` data-parallel replicas; expert parallelism splits the
``dp`` ranks into ``edp = dp / ep`` groups of ``ep``, each holding all ``N_r`` routed experts. The
choices a run names (schedule, recomputation, dispatcher, FP8 backend and scales, attention, TP
convention, ZeRO stage) are spelled once here, as ``Literal`` types for the run config and as tuples
for the planner and the CLI. :func:`check_layout` is the one layout check: the planner
(:meth:`dsv3.plan.layout.Layout.validate`), the run (:mod:`dsv3.parallel.pipeline.train`), the world
(:func:`dsv3.parallel.world.init_parallel`) and the schedules (:func:`dsv3.schedules.build_schedule`)
call it, and it raises :class:`~dsv3.errors.ConfigError` with one sentence. Which pipeline stages sit
on which device (:func:`stage_devices`) and the balanced split of layers into stages
(:func:`balanced_stage_layers`) live here too, so the planner and the runtime share them.
The schedules' op lists are data in :mod:`dsv3.schedules`.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

from dsv3.errors import ConfigError, clip

# ----------------------------------------------------------------------------- the choices, spelled once
PipelineSchedule = Literal["1f1b", "zb1p", "dualpipe", "dualpipev"]
"""Pipeline-parallel schedule (:mod:`dsv3.schedules`)."""
RecomputeMode = Literal["none", "selective", "full"]
"""Activation recomputation: nothing, the cheap ops (RMSNorm, MLA up-projection, SwiGLU), or whole blocks."""
Dispatcher = Literal["auto", "local", "alltoall", "deepep"]
"""MoE token dispatcher (auto: alltoall under expert parallelism, else local)."""
FP8Backend = Literal["auto", "emulated", "cuda"]
"""FP8 GEMM implementation."""
FP8ScaleFormat = Literal["fp32", "ue8m0"]
"""Scale format of FP8 GEMM operands."""
AttentionImpl = Literal["fused", "eager"]
"""Attention kernel the planner counts: fused (flash/SDPA, no s x s scores kept) or eager."""
TPConvention = Literal["megatron", "zhang-su"]
"""What tensor parallelism splits (megatron: dsv3 and Megatron-Core; zhang-su: arXiv 2502.07846)."""

SCHEDULES: tuple[str, ...] = get_args(PipelineSchedule)
RECOMPUTE_MODES: tuple[str, ...] = get_args(RecomputeMode)
DISPATCHERS: tuple[str, ...] = get_args(Dispatcher)
FP8_BACKENDS: tuple[str, ...] = get_args(FP8Backend)
FP8_SCALE_FORMATS: tuple[str, ...] = get_args(FP8ScaleFormat)
ATTENTION_IMPLS: tuple[str, ...] = get_args(AttentionImpl)
TP_CONVENTIONS: tuple[str, ...] = get_args(TPConvention)
ZERO_STAGES: tuple[int, ...] = (0, 1, 2, 3)
#: Schedules that hold two stages per device and overlap a forward with a backward (F&B).
DUAL_SCHEDULES: tuple[str, ...] = ("dualpipe", "dualpipev")
#: How messages name the schedules.
DISPLAY_NAMES = {"1f1b": "1F1B", "zb1p": "ZB1P", "dualpipe": "DualPipe", "dualpipev": "DualPipeV"}


# ----------------------------------------------------------------------------- the vocabulary
def pipeline_devices(pp: int, schedule: str | None = None) -> int:
    """Devices one pipeline of ``pp`` stages runs on: ``pp``, or ``pp // 2`` under DualPipeV; 1 without a pipeline."""
    if pp <= 1:
        return 1
    return pp // 2 if str(schedule or "1f1b").lower() == "dualpipev" else pp


def fill_microbatches(pp: int, schedule: str) -> int:
    """The fewest micro-batches that fill the pipeline: 1 without one, 2 PP for DualPipe, else PP."""
    if pp <= 1:
        return 1
    return 2 * pp if schedule == "dualpipe" else pp


def stage_devices(pp: int, schedule: str) -> list[list[int]]:
    """``out[dev]`` = the pipeline stages device ``dev`` holds.

    DualPipe: device i holds stages i and pp-1-i (every stage on two devices); DualPipeV: the same
    pairs on pp/2 devices; otherwise device i holds stage i.
    """
    if schedule == "dualpipe":
        return [sorted({i, pp - 1 - i}) for i in range(pp)]
    if schedule == "dualpipev":
        return [[i, pp - 1 - i] for i in range(pp // 2)]
    return [[i] for i in range(pp)]


def devices_of_stage(pp: int, schedule: str) -> list[list[int]]:
    """``out[stage]`` = the pipeline devices that hold ``stage``."""
    out: list[list[int]] = [[] for _ in range(pp)]
    for dev, stages in enumerate(stage_devices(pp, schedule)):
        for s in stages:
            out[s].append(dev)
    return out


def stage_layer_indices(stage_layers: tuple[int, ...]) -> list[list[int]]:
    """Layer indices of each stage from the layer counts."""
    out, start = [], 0
    for n in stage_layers:
        out.append(list(range(start, start + n)))
        start += n
    return out


def balanced_stage_layers(layer_costs: list[float], first_extra: float, last_extra: float, pp: int) -> tuple[int, ...]:
    """Contiguous split of the layers into ``pp`` stages that minimises the slowest stage.

    Args:
        layer_costs: cost (forward FLOPs per token) of each decoder layer.
        first_extra: cost the first stage carries besides its layers (the embedding).
        last_extra: cost the last stage carries (final norm, output head, MTP modules).
        pp: number of stages, at most ``len(layer_costs)``.

    Returns:
        Layers per stage, each at least 1. Among splits with the smallest maximum stage cost, the one with
        the smallest sum of squared stage costs (the most even); remaining ties go to the split that gives
        the last stage the most layers, then the one before it, and so on (dynamic programming over stages;
        a stage's first layer is scanned from the back and the scan stops once the stage alone costs more
        than the best found, so the work is about ``n^2`` steps, not ``pp * n^2``).
    """
    if any(c < 0 for c in layer_costs) or first_extra < 0 or last_extra < 0:
        raise ValueError("balanced_stage_layers needs non-negative costs")
    n = len(layer_costs)
    prefix = [0.0]
    for c in layer_costs:
        prefix.append(prefix[-1] + c)
    inf = (float("inf"), float("inf"))

    def cost(stage: int, a: int, b: int) -> float:  # layers a..b-1 on stage `stage`
        extra = (first_extra if stage == 0 else 0.0) + (last_extra if stage == pp - 1 else 0.0)
        return prefix[b] - prefix[a] + extra

    # best[k][j]: (max cost, sum of squares) placing the first j layers on stages 0..k-1
    best = [[inf] * (n + 1) for _ in range(pp + 1)]
    choice = [[0] * (n + 1) for _ in range(pp + 1)]
    best[0][0] = (0.0, 0.0)
    for k in range(1, pp + 1):
        for j in range(k, n - (pp - k) + 1):
            cand, arg = inf, 0
            for i in range(j - 1, k - 2, -1):  # stage k-1 gets layers i..j-1; fewer layers first
                c = cost(k - 1, i, j)
                if c > cand[0]:
                    break  # earlier starts only make this stage dearer
                prev = best[k - 1][i]
                if prev[0] == float("inf"):
                    continue
                val = (max(prev[0], c), prev[1] + c * c)
                if val <= cand:  # ties: the earliest start, as a forward scan keeping the first would
                    cand, arg = val, i
            best[k][j], choice[k][j] = cand, arg
    out, j = [], n
    for k in range(pp, 0, -1):
        i = choice[k][j]
        out.append(j - i)
        j = i
    return tuple(reversed(out))


# ----------------------------------------------------------------------------- the one validator
class CheckedLayout(NamedTuple):
    """What :func:`check_layout` returns: the degrees, ``dp`` filled in from the world size."""

    pp: int
    dp: int
    ep: int


def check_layout(
    world_size: int | None = None,
    pp: int = 1,
    dp: int | None = None,
    ep: int = 1,
    n_routed_experts: int | None = None,
    schedule: str | None = None,
    *,
    num_layers: int | None = None,
    microbatches: int | None = None,
    tp: int = 1,
    etp: int = 1,
) -> CheckedLayout:
    """Check a parallel layout; raise :class:`ConfigError` (one sentence) for the first thing that does not fit.

    Args:
        world_size: processes launched (None: not checked; ``dp`` defaults to 1).
        pp, dp, ep: pipeline stages, data-parallel and expert-parallel degrees (``dp`` None: from the world).
        n_routed_experts: the model's N_r (None: not checked).
        schedule: a name of :data:`SCHEDULES` (None: 1F1B).
        num_layers: the model's decoder layers (None: not checked against ``pp``).
        microbatches: micro-batches per pipeline and step (None: not checked against the schedule).
        tp, etp: the planner's tensor-parallel sizes (the experts re-fold TP x DP devices as ETP x EP x EDP).

    Returns:
        ``(pp, dp, ep)`` with ``dp`` filled in.
    """
    for name, value in (("pp", pp), ("ep", ep)) + ((("dp", dp),) if dp is not None else ()):
        _positive(name, value)
    name = _schedule_name(schedule)
    if num_layers is not None and pp > num_layers:
        raise ConfigError(
            f"the model has {num_layers} layers, fewer than --pp {pp} pipeline stages: {num_layers} layers cannot "
            f"fill --pp {pp} stages; use at most {num_layers} stages."
        )
    if name in DUAL_SCHEDULES and pp % 2:
        raise ConfigError(
            f"{DISPLAY_NAMES[name]} needs an even number of pipeline stages, got --pp {pp}; use --pp {pp + 1}."
        )
    dp = _world_dp(world_size, pp, dp, name)
    _check_experts(dp, ep, n_routed_experts, tp, etp)
    if microbatches is not None:
        _check_microbatches(name, pp, microbatches)
    return CheckedLayout(pp, dp, ep)


def _positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"--{name} must be a positive integer, got {value!r}.")


def _schedule_name(schedule: str | None) -> str:
    key = "1f1b" if schedule is None else str(schedule).lower()
    if key not in SCHEDULES:
        raise ConfigError(f"unknown schedule {clip(schedule)}; choose one of {', '.join(SCHEDULES)}.")
    return key


def _world_dp(world_size: int | None, pp: int, dp: int | None, schedule: str) -> int:
    """``dp`` from (or checked against) the world: ``world = pipeline devices x dp``."""
    if world_size is None:
        return 1 if dp is None else dp
    ndev = pipeline_devices(pp, schedule)
    if world_size % ndev:
        raise ConfigError(
            f"{world_size} processes do not factor into pipelines of {ndev} devices: the world size {world_size} "
            f"is not a multiple of the {ndev} pipeline devices of --pp {pp} ({schedule}); launch a multiple of "
            f"{ndev} with torchrun --nproc-per-node."
        )
    if dp is None:
        return world_size // ndev
    if ndev * dp != world_size:
        raise ConfigError(
            f"the world size {world_size} does not factor as {ndev} pipeline devices x --dp {dp}; "
            f"launch {ndev * dp} processes or change --dp."
        )
    return dp


def _check_experts(dp: int, ep: int, n_routed_experts: int | None, tp: int, etp: int) -> None:
    """``ep x etp`` dividing the ``dp x tp`` devices the experts re-fold, then ``N_r / ep`` experts per rank."""
    if (dp * tp) % (ep * etp):
        refold = (
            f"EP x ETP = {ep * etp} must divide DP x TP = {dp * tp}, because the expert layers re-fold the same devices"
        )
        if tp == etp == 1:
            raise ConfigError(
                f"--ep {ep} does not divide the data-parallel degree {dp} ({refold}); pick an ep that divides dp."
            )
        raise ConfigError(f"{refold}; raise --dp or lower --ep/--etp.")
    if n_routed_experts and n_routed_experts % ep:
        raise ConfigError(
            f"--ep {ep} does not divide the model's {n_routed_experts} routed experts: {n_routed_experts} routed "
            f"experts cannot be split over --ep {ep}; choose an EP size that divides {n_routed_experts}."
        )


def _check_microbatches(schedule: str, pp: int, m: int) -> None:
    """DualPipe needs an even ``m >= 2 pp``, DualPipeV ``m >= pp``; 1F1B and ZB1P run any ``m >= 1``."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ConfigError(f"microbatches must be an integer >= 1, got {m!r}.")
    if schedule not in DUAL_SCHEDULES:
        return
    even = schedule == "dualpipe"
    need = fill_microbatches(pp, schedule)
    if m < need or (even and m % 2):
        what = "an even number of micro-batches" if even else "a number of micro-batches"
        raise ConfigError(
            f"{DISPLAY_NAMES[schedule]} with pp={pp} needs {what} >= {need}, got microbatches={m}; "
            f"use microbatches={max(need, m + (m % 2 if even else 0))}."
        )
