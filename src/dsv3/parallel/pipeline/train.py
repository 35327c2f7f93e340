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
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dsv3.errors import ConfigError
from dsv3.parallel.pipeline.executor import PipelineRuntime, PipelineStepResult, TraceEvent, check_layout, write_chrome_trace


TRACE_FILE = "pipeline_trace.json"  # --trace: the last step's timeline, in the run directory


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
    from dsv3.parallel.pipeline.schedules import build_schedule

    if isinstance(pp, int) and not isinstance(pp, bool) and 1 <= pp <= num_layers:
        build_schedule(schedule, pp, 2 * pp + 2)  # the schedule's own rules on pp (e.g. even for DualPipe)
    else:
        check_layout(num_layers, schedule, pp, 1, world_size)  # raises the layer-count error
    ndev = devices_of(schedule, pp)
    if world_size % ndev:
        raise ConfigError(f"{world_size} processes do not factor into pipelines of {ndev} devices "
                          f"({schedule} with pp={pp}); launch a multiple of {ndev} with torchrun --nproc-per-node.")
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
                        ema=None, sync: bool = False) -> PipelineStepStats:
    """Run one training step through the pipeline (see the module docstring); with ``sync``, afterwards
    every device receives the whole model and optimizer state (:meth:`PipelineRuntime.sync_parameters`)."""
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
    if sync:
        runtime.sync_parameters(optimizer)
    if not skipped and ema is not None:
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
    if trace_path is None and session.config.parallel.trace:
        trace_path = os.path.join(session.run_dir or ".", TRACE_FILE)
    d = session.config.data
    check_pipeline_layout(session.mcfg.num_hidden_layers, pp=pp, schedule=schedule, global_batch=d.global_batch,
                          micro_batch=d.micro_batch, world_size=dist.get_world_size())
    runtime = PipelineRuntime(session.model, schedule, pp, seq_len=d.seq_len)
    runtime.trace_path = trace_path
    session.pipeline = runtime
    return runtime


def sync_due(config, step: int) -> bool:
    """Whether the loop evaluates, checkpoints or finishes after optimizer step ``step`` (1-based), so that
    the whole model must be on every device (the same decision on every rank)."""
    c = config
    return step % c.logging.eval_every == 0 or step % c.checkpoint.save_every == 0 or step >= c.schedule.steps


def init_from_env():
    """Join the torchrun process group (gloo on CPU, NCCL on CUDA) unless already joined; returns (rank, world)."""
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ConfigError("--pp > 1 needs one process per pipeline device; launch with torchrun --nproc-per-node N.")
        from datetime import timedelta

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=10))
    return dist.get_rank(), dist.get_world_size()


def check_pipeline_config(config, mcfg) -> int:
    """The ``dsv3 train --pp`` layout check, before anything is written (micro-batches per step on success)."""
    from dsv3.parallel.pipeline.executor import devices_of

    p, d = config.parallel, config.data
    world = int(os.environ.get("WORLD_SIZE", "1")) if not dist.is_initialized() else dist.get_world_size()
    m = check_pipeline_layout(mcfg.num_hidden_layers, pp=p.pp, schedule=p.pipeline, global_batch=d.global_batch,
                              micro_batch=d.micro_batch, world_size=world)
    ndev = devices_of(p.pipeline, p.pp)
    if world != ndev or p.ep != 1 or (p.dp or 1) != 1:
        raise ConfigError(f"--pp {p.pp} runs one pipeline of {ndev} processes without expert or data parallelism "
                          f"for now; launch exactly {ndev} processes with --ep 1.")
    return m


def start_pipeline(session) -> PipelineRuntime:
    """Rank 0's hook in ``train()``: after its session is built (and the run directory written), let the
    other ranks build theirs (:func:`follow`), then attach the pipeline on every rank together."""
    dist.barrier()
    return attach_pipeline(session, pp=session.config.parallel.pp, schedule=session.config.parallel.pipeline)


def follow(config) -> int:
    """What ranks > 0 run for ``dsv3 train --pp``: the same steps as rank 0's ``train()`` (the pipeline's
    collectives), writing nothing. Returns the number of steps taken."""
    from dsv3.train.session import build_session, train_step

    dist.barrier()  # rank 0 has built its session (tokenizer and token caches written once)
    s = build_session(config, write=False, prefetch=False)
    attach_pipeline(s, pp=config.parallel.pp, schedule=config.parallel.pipeline)
    try:
        while s.step < config.schedule.steps:
            _, gamma = s.begin_step()
            batches, _ = s.next_batches()
            stats = train_step(s, batches, gamma=gamma)
            s.step += 1
            s.nonfinite = s.nonfinite + 1 if stats.skipped else 0
            if s.nonfinite >= config.run.max_nonfinite:  # rank 0 raises TrainingError here
                break
    finally:
        s.close()
    return s.step


def launch_pipeline(config) -> bool:
    """``dsv3 train --pp P``: check the layout (one-sentence ConfigError before anything is written), join
    the torchrun process group, and on ranks > 0 run :func:`follow`. Returns True on rank 0, which then
    runs ``train()`` (whose hook :func:`start_pipeline` attaches the pipeline), False on the other ranks."""
    from dsv3.train.session import model_config_for

    check_pipeline_config(config, model_config_for(config))
    rank, _ = init_from_env()
    if rank == 0:
        return True
    follow(config)
    return False
