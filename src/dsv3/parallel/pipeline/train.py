"""The training step of a pipeline-parallel run: the hook ``train_step`` calls when ``parallel.pp > 1``.

One optimizer step under pipeline parallelism is what the single-process loop does
(``dsv3.train.loop``), with the micro-batch loop replaced by the schedule:

1. :meth:`PipelineRuntime.step` runs the step's gradient-accumulation micro-batches
   through the schedule's op lists (losses and expert loads come back reduced over
   the pipeline, shared parameters' gradients all-reduced);
2. the global gradient norm over all stages is clipped (:meth:`PipelineRuntime.clip_grad_norm`);
3. a non-finite loss or norm skips the step on every rank (they all see the same numbers);
4. the optimizer steps (parameters without a gradient, the stages other devices hold,
   are skipped by AdamW) and the auxiliary-loss-free bias update uses the loads of all
   stages and micro-batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dsv3.errors import ConfigError
from dsv3.parallel.pipeline.executor import PipelineRuntime, PipelineStepResult, TraceEvent, check_layout, write_chrome_trace


def pipeline_microbatches(global_batch: int, micro_batch: int, dp: int = 1) -> int:
    """Micro-batches per pipeline and step: ``global_batch / (micro_batch * dp)``.

    Raises:
        ConfigError: the global batch does not divide.
    """
    if global_batch % (micro_batch * dp):
        raise ConfigError(f"global batch {global_batch} is not a multiple of micro-batch {micro_batch} x dp {dp}; "
                          f"use a global batch of {max(1, round(global_batch / (micro_batch * dp))) * micro_batch * dp}.")
    return global_batch // (micro_batch * dp)


def check_pipeline_layout(num_layers: int, *, pp: int, schedule: str, global_batch: int, micro_batch: int,
                          world_size: int) -> int:
    """Check ``--pp``/``--schedule`` against the model and the world before anything is written.

    Returns the micro-batches per step. Raises :class:`ConfigError` (one sentence) for fewer layers
    than stages, too few micro-batches, an odd pp for DualPipe(V) or ranks that do not factor.
    """
    from dsv3.parallel.pipeline.executor import devices_of

    ndev = devices_of(schedule, pp)
    if world_size % ndev:
        raise ConfigError(f"{world_size} processes do not factor into pipelines of {ndev} devices "
                          f"({schedule} with pp={pp}); launch a multiple of {ndev} processes.")
    m = pipeline_microbatches(global_batch, micro_batch, world_size // ndev)
    check_layout(num_layers, schedule, pp, m, world_size)
    return m


@dataclass
class PipelineStepStats:
    """One optimizer step of a pipeline run (every rank holds the same numbers)."""

    loss: float
    lm_loss: float
    mtp_loss: float
    balance_loss: float
    grad_norm: float
    skipped: bool
    result: PipelineStepResult


def pipeline_train_step(runtime: PipelineRuntime, batches: list[tuple[torch.Tensor, torch.Tensor]],
                        optimizer: torch.optim.Optimizer, *, grad_clip: float | None, gamma: float | None = None,
                        ema=None) -> PipelineStepStats:
    """Run one training step through the pipeline (see the module docstring)."""
    res = runtime.step(batches)
    if getattr(runtime, "trace_path", None):
        write_step_trace(runtime.trace_path, runtime, res)
    norm = runtime.clip_grad_norm(grad_clip)
    skipped = not (math.isfinite(res.loss) and bool(torch.isfinite(norm)))
    if skipped:
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if res.load is not None:
            runtime.model.update_router_bias(res.load, gamma)
        if ema is not None:
            ema.update()
    return PipelineStepStats(res.loss, res.lm_loss, res.mtp_loss, res.balance_loss, float(norm), skipped, res)


def gather_traces(runtime: PipelineRuntime, result: PipelineStepResult) -> dict[int, list[TraceEvent]] | None:
    """Collect every pipeline device's executed-op trace on the pipeline's first rank, on one time axis
    (returns None on the other ranks)."""
    mine = (result.t0, [(e.op, e.start, e.end) for e in result.trace])
    got: list = [None] * len(runtime.ranks) if runtime.device == 0 else None
    dist.gather_object(mine, got, dst=runtime.ranks[0], group=runtime.group)
    if runtime.device != 0:
        return None
    base = min(t0 for t0, _ in got)
    return {d: [TraceEvent(op, s + t0 - base, e + t0 - base) for op, s, e in trace] for d, (t0, trace) in enumerate(got)}


def write_step_trace(path: str, runtime: PipelineRuntime, result: PipelineStepResult) -> None:
    """``--trace``: write the step's per-device timeline (Chrome trace / Perfetto JSON) from the first rank."""
    traces = gather_traces(runtime, result)
    if traces is not None:
        write_chrome_trace(path, traces)


def attach_pipeline(session, *, pp: int, schedule: str, trace_path: str | None = None) -> PipelineRuntime:
    """Make a built training session (:func:`dsv3.train.session.build_session`) step through a pipeline.

    Every process of the (torchrun-launched) world calls this with the same arguments after
    building its session; ``train_step`` then runs each step's micro-batches through the
    schedule. Call :func:`check_pipeline_layout` before ``build_session`` so that a bad layout
    fails before anything is written. ``trace_path``: write each step's timeline there (``--trace``).
    """
    if not dist.is_initialized():
        raise ConfigError("pipeline parallelism needs a process group; launch with torchrun --nproc-per-node N.")
    d = session.config.data
    check_pipeline_layout(session.mcfg.num_hidden_layers, pp=pp, schedule=schedule, global_batch=d.global_batch,
                          micro_batch=d.micro_batch, world_size=dist.get_world_size())
    runtime = PipelineRuntime(session.model, schedule, pp, seq_len=d.seq_len)
    runtime.trace_path = trace_path
    session.pipeline = runtime
    return runtime
