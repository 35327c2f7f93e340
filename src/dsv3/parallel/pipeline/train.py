"""Pipeline parallelism in a training run: the layout check, the runtime of a session, traces.

``torchrun --nproc-per-node N -m dsv3 train --pp P --pipeline S [--ep E] [--dp D]`` runs
``N = devices * dp`` processes, ``devices = P`` (``P / 2`` under DualPipeV), laid out as
:mod:`dsv3.parallel.world` describes. Every rank runs the ordinary loop
(:func:`dsv3.train.loop.train`); :func:`dsv3.train.session.build_session` joins the world,
shards the experts over the expert-parallel group, keeps only this device's stages
(:func:`~dsv3.parallel.pipeline.stages.select_stages`), builds the :class:`PipelineRuntime` with
:func:`build_pipeline` (the context's pipelines: the ranks of one data-parallel index) and
ZeRO-1 over the parameters of this device's stages; the CPU EMA shadows only those. One optimizer step
(:func:`dsv3.train.step.train_step`: ``_pipeline_pass``, then the ``_update`` that every layout shares) then is:

1. :meth:`PipelineRuntime.step` runs this data-parallel rank's ``global_batch / (micro_batch x dp)``
   micro-batches through the schedule's op lists (losses and expert loads reduced over the
   pipeline, the gradients of shared parameters all-reduced among their holders);
2. losses and loads are reduced over the data-parallel ranks, gradients by ZeRO-1 (dense over
   dp, experts over edp), and the global gradient norm counts every parameter once over the
   pipeline; every rank takes the same clip and NaN-skip decisions;
3. ZeRO-1 updates the held parameters, the auxiliary-loss-free bias update uses the loads of
   all stages, micro-batches and data-parallel ranks (bit-identical everywhere), the EMA
   averages the held parameters. Nothing is broadcast: no device ever holds another's stages.

Validation (:func:`validation_loss`) is a forward-only pipelined pass
(:meth:`PipelineRuntime.evaluate`), its batches split over the data-parallel ranks; with
``--use-ema`` each device swaps its EMA into its own stages first. Checkpoints are sharded:
every rank writes its stages (:mod:`dsv3.parallel.checkpoint`).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from dsv3.errors import ConfigError
from dsv3.model.loss import IGNORE_INDEX
from dsv3.parallel.pipeline.executor import (
    PipelineRuntime,
    PipelineStepResult,
    TraceEvent,
    check_layout,
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

    Returns the micro-batches per pipeline and step. Raises :class:`ConfigError` (one sentence) for
    fewer layers than stages, an odd pp for DualPipe(V), ranks that do not factor into pipelines
    x dp, ep not dividing dp or N_r (:func:`dsv3.parallel.world.check_layout`), a global batch that
    does not split over dp, or too few micro-batches for the schedule.
    """
    from dsv3.parallel.pipeline.executor import devices_of
    from dsv3.parallel.pipeline.schedules import build_schedule
    from dsv3.parallel.world import check_layout as check_world

    if isinstance(pp, int) and not isinstance(pp, bool) and 1 <= pp <= num_layers:
        build_schedule(schedule, pp, 2 * pp + 2)  # the schedule's own rules on pp (e.g. even for DualPipe)
    else:
        check_layout(num_layers, schedule, pp, 1, world_size)  # raises the layer-count error
    ndev = devices_of(schedule, pp)
    if world_size % ndev:
        raise ConfigError(
            f"{world_size} processes do not factor into pipelines of {ndev} devices "
            f"({schedule} with pp={pp}); launch a multiple of {ndev} with torchrun --nproc-per-node."
        )
    _, dp, _ = check_world(world_size, pp, dp, ep, n_routed_experts, schedule)
    m = pipeline_microbatches(global_batch, micro_batch, dp)
    try:
        check_layout(num_layers, schedule, pp, m, world_size)
    except ConfigError as exc:
        reason = str(exc).split("; use ")[0].replace(f"microbatches={m}", f"{m}")
        raise ConfigError(
            f"{reason} per step (--global-batch {global_batch} / (--micro-batch {micro_batch} x dp {dp})); "
            f"{_microbatch_fix(num_layers, schedule, pp, world_size, global_batch, micro_batch, dp)}"
        ) from None
    return m


def _microbatch_fix(
    num_layers: int, schedule: str, pp: int, world_size: int, global_batch: int, micro_batch: int, dp: int
) -> str:
    """``dsv3 train``'s flags and values that give a step micro-batches the schedule runs: the next larger
    --global-batch, and a smaller --micro-batch for the same global batch where one exists."""

    def fits(m: int) -> bool:
        try:
            check_layout(num_layers, schedule, pp, m, world_size)
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
