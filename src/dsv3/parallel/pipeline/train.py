"""Pipeline parallelism in a training run: the layout check, the runtime of a session, traces, validation.

``torchrun --nproc-per-node N -m dsv3 train --pp P --pipeline S [--ep E] [--dp D]`` runs
``N = devices * dp`` processes (:mod:`dsv3.parallel.world`). :func:`check_pipeline_layout` checks the
run's layout and batch with :func:`dsv3.layout.check_layout` before anything is written and gives the
micro-batches per pipeline and step; :func:`build_pipeline` builds a session's :class:`PipelineRuntime`
over this device's stages (collective); :func:`validation_loss` is the forward-only pipelined
validation pass, its batches split over the data-parallel ranks; :func:`write_step_trace` writes
``--trace``'s timeline. How one optimizer step runs through the pipeline (the runtime's step, then
the update every layout shares) is in docs/pipeline.md ("`dsv3 train --pp`").
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from dsv3.errors import ConfigError
from dsv3.layout import check_layout
from dsv3.model.loss import IGNORE_INDEX
from dsv3.parallel.pipeline.executor import (
    PipelineRuntime,
    PipelineStepResult,
    TraceEvent,
    write_chrome_trace,
)
from dsv3.parallel.pipeline.stages import select_stages

TRACE_FILE = "pipeline_trace.json"  # --trace: the last step's timeline, in the run directory


def pipeline_microbatches(global_batch: int, micro_batch: int, dp: int = 1) -> int:
    """Micro-batches per pipeline and step: ``global_batch / (micro_batch * dp)``.

    Raises:
        ConfigError: the global batch does not divide.
    """
    if global_batch % (micro_batch * dp):
        raise ConfigError(
            f"global batch {global_batch} is not a multiple of micro-batch {micro_batch} x dp {dp}; "
            f"use a global batch of {max(1, round(global_batch / (micro_batch * dp))) * micro_batch * dp}."
        )
    return global_batch // (micro_batch * dp)


def check_pipeline_layout(
    num_layers: int,
    *,
    pp: int,
    schedule: str,
    global_batch: int,
    micro_batch: int,
    world_size: int,
    dp: int | None = None,
    ep: int = 1,
    n_routed_experts: int | None = None,
) -> int:
    """Check ``--pp``/``--pipeline``/``--dp``/``--ep`` against the model and the world before anything is written.

    Returns the micro-batches per pipeline and step. Raises :class:`ConfigError` (one sentence) for what
    :func:`dsv3.layout.check_layout` refuses (fewer layers than stages, an odd pp for DualPipe(V), ranks that
    do not factor into pipelines x dp, ep not dividing dp or N_r, too few micro-batches for the schedule, with
    the ``dsv3 train`` flags that fix it) or a global batch that does not split over dp.
    """
    _, dp, _ = check_layout(world_size, pp, dp, ep, n_routed_experts, schedule, num_layers=num_layers)
    m = pipeline_microbatches(global_batch, micro_batch, dp)
    try:
        check_layout(pp=pp, schedule=schedule, microbatches=m)
    except ConfigError as exc:
        reason = str(exc).split("; use ")[0].replace(f"microbatches={m}", f"{m}")
        raise ConfigError(
            f"{reason} per step (--global-batch {global_batch} / (--micro-batch {micro_batch} x dp {dp})); "
            f"{_microbatch_fix(schedule, pp, global_batch, micro_batch, dp)}"
        ) from None
    return m


def _microbatch_fix(schedule: str, pp: int, global_batch: int, micro_batch: int, dp: int) -> str:
    """``dsv3 train``'s flags and values that give a step micro-batches the schedule runs: the next larger
    --global-batch, and a smaller --micro-batch for the same global batch where one exists."""

    def fits(m: int) -> bool:
        try:
            check_layout(pp=pp, schedule=schedule, microbatches=m)
            return True
        except ConfigError:
            return False

    m = global_batch // (micro_batch * dp)
    bigger = next(k for k in range(m + 1, m + 4 * pp + 8) if fits(k))
    fix = f"use --global-batch {bigger * micro_batch * dp}"
    smaller = [
        b for b in range(micro_batch - 1, 0, -1) if global_batch % (b * dp) == 0 and fits(global_batch // (b * dp))
    ]
    return fix + (f", or --micro-batch {smaller[0]} with this global batch" if smaller else "")


def build_pipeline(model, ctx, config, run_dir: str | None = None) -> PipelineRuntime:
    """The :class:`PipelineRuntime` of a training session (collective: every rank at once).

    ``model`` is the (expert-sharded) model, on the meta device or built; the stages this device does not
    run are removed from it first (:func:`~dsv3.parallel.pipeline.stages.select_stages`), so they never get
    storage. ``ctx`` is the :class:`~dsv3.parallel.world.ParallelContext` (its pipelines: one per
    data-parallel index), ``config`` the :class:`~dsv3.train.config.TrainConfig`. With ``--trace`` each
    step's timeline is written to ``run_dir/pipeline_trace.json`` by the first pipeline.
    """
    p = config.parallel
    select_stages(model, ctx, seq_len=config.data.seq_len)
    runtime = PipelineRuntime(model, p.pipeline, p.pp, seq_len=config.data.seq_len, pipelines=ctx.pipelines)
    if p.trace and ctx.dp_rank == 0:
        runtime.trace_path = os.path.join(run_dir or ".", TRACE_FILE)
    return runtime


def set_loss_weights(runtime: PipelineRuntime, mtp_loss_weight: float, seq_aux_alpha: float) -> None:
    """The step's loss arguments, lambda (``mtp_loss_weight``) and alpha (``seq_aux_alpha``), for every stage this
    device runs (what ``model(ids, labels, mtp_loss_weight=..., seq_aux_alpha=...)`` takes on one process)."""
    for stage in runtime.stages.values():
        stage.mtp_loss_weight, stage.seq_aux_alpha = mtp_loss_weight, seq_aux_alpha


def gather_traces(runtime: PipelineRuntime, result: PipelineStepResult) -> dict[int, list[TraceEvent]] | None:
    """Collect every pipeline device's executed-op trace on the pipeline's first rank, on one time axis
    (returns None on the other ranks)."""
    mine = (result.t0, [(e.op, e.start, e.end) for e in result.trace])
    got: list = [None] * len(runtime.ranks) if runtime.device == 0 else None
    dist.gather_object(mine, got, dst=runtime.ranks[0], group=runtime.group)
    if runtime.device != 0:
        return None
    base = min(t0 for t0, _ in got)
    return {
        d: [TraceEvent(op, s + t0 - base, e + t0 - base) for op, s, e in trace] for d, (t0, trace) in enumerate(got)
    }


def write_step_trace(path: str, runtime: PipelineRuntime, result: PipelineStepResult) -> None:
    """``--trace``: write the step's per-device timeline (Chrome trace / Perfetto JSON) from the first rank
    (collective over the pipeline)."""
    traces = gather_traces(runtime, result)
    if traces is not None:
        write_chrome_trace(path, traces)


def validation_loss(runtime: PipelineRuntime, ctx, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Token-weighted mean main-model loss of ``batches`` (every rank passes the same list) under pipeline
    parallelism: data-parallel rank r evaluates every dp-th batch from r through its pipeline
    (:meth:`PipelineRuntime.evaluate`), the sums are added over dp. Ranks with one batch fewer run a copy
    without labels (it counts zero), so that expert-parallel peers exchange tokens equally often.
    Collective over the world; the same value on every rank."""
    if not batches:
        return 0.0
    mine = batches[ctx.dp_rank :: ctx.dp]
    ids, labels = batches[0]
    mine += [(ids, torch.full_like(labels, IGNORE_INDEX))] * (-(-len(batches) // ctx.dp) - len(mine))
    sums = runtime.evaluate(mine)
    if ctx.dp > 1:
        dist.all_reduce(sums, group=ctx.dp_group)
    total, count = sums.tolist()
    return total / max(count, 1.0)
