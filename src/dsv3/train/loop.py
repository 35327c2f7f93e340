"""The training loop: from the data to the loss, one optimizer step at a time.

Read :func:`train` top to bottom: :func:`~dsv3.train.session.build_session` sets up the
run (tokenizer, data, model, optimizer, schedules) and restores a checkpoint when
resuming; then for each step

1. :meth:`Session.begin_step` sets the learning rate, the MTP weight lambda and the bias
   speed gamma of the step, and :meth:`Session.next_batches` hands out its
   ``global_batch / micro_batch`` micro-batches (the batch-size ramp may change that number);
2. :func:`~dsv3.train.step.train_step` backpropagates ``loss / n_micro`` per
   micro-batch, clips, skips the step if the loss or gradient norm is not finite, steps
   AdamW, applies the auxiliary-loss-free bias update with the loads of all of the step's
   micro-batches and updates the CPU EMA;
3. the loop logs metrics (losses, throughput, MFU, peak memory, tokens seen), validates
   and checkpoints.

Ctrl-C or SIGTERM (a scheduler's preemption notice) finishes the current step, writes a
checkpoint and stops: :func:`train` then raises :class:`~dsv3.errors.TrainingPreempted`, which carries
the checkpoint's path (``dsv3 train`` exits 143 for SIGTERM, 130 for Ctrl-C); a second signal stops at once
(``KeyboardInterrupt``). A checkpoint is a complete, atomically renamed directory,
so ``dsv3 train --resume RUN_DIR`` always continues from a consistent state and
(on CPU) reproduces the per-step losses of an uninterrupted run bit for bit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

from dsv3.errors import TrainingError, TrainingPreempted
from dsv3.infer.generate import generate_text
from dsv3.parallel.dispatch import comm_stats
from dsv3.parallel.pipeline.train import validation_loss
from dsv3.plan.flops import training_flops_per_token
from dsv3.train.config import TrainConfig
from dsv3.train.metrics import MetricsLogger, ProgressBar, device_peak_flops, maxvio, peak_memory

# The set-up pieces live in dsv3.train.session; build_tokenizer stays importable from here.
from dsv3.train.session import (
    Session,
    build_session,
    build_tokenizer,  # noqa: F401
)
from dsv3.train.sft import batch_to, split_batch
from dsv3.train.step import train_step
from dsv3.train.tokenizer import eos_token_id


@dataclass
class TrainResult:
    """What a finished (or stopped) run reports."""

    run_dir: str
    step: int
    checkpoint: str | None
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    sample: str | None = None
    interrupted: bool = False  # True only in TrainingPreempted.result: a stopped run raises
    wall_time: float = 0.0


@torch.no_grad()
def evaluate(model, data, *, micro_batch: int, max_batches: int, device: torch.device) -> float:
    """Token-weighted mean main-model loss over the held-out sequences."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in data.val_batches(micro_batch, max_batches):
            ids, labels, extra = split_batch(batch_to(batch, device))  # extra: SFT document-mask ids
            out = model(ids, labels, **extra)
            n = int((labels != -100).sum())
            total += float(out.lm_loss) * n
            count += n
    finally:
        model.train(was_training)
    return total / max(count, 1)


def validate(s: Session) -> float:
    """The held-out loss of session ``s`` (with ``--use-ema`` of its EMA weights, swapped in and back):
    :func:`evaluate`, or under pipeline parallelism the forward-only pipelined pass over each device's
    stages (:func:`dsv3.parallel.pipeline.train.validation_loss`)."""
    micro_batch, max_batches = s.config.data.micro_batch, s.config.logging.eval_batches
    use_ema = s.ema is not None and s.config.memory.use_ema
    with s.ema.applied(s.model) if use_ema else contextlib.nullcontext():
        if s.pipeline is not None:
            return validation_loss(s.pipeline, s.parallel, list(s.data.val_batches(micro_batch, max_batches)))
        return evaluate(s.model, s.data, micro_batch=micro_batch, max_batches=max_batches, device=s.device)


class _StopFlag:
    """First Ctrl-C or SIGTERM (what Slurm and Kubernetes send before a kill): finish the step,
    checkpoint, stop. A second signal: KeyboardInterrupt at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave the default behaviour
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


# ----------------------------------------------------------------------------- the loop
def _quiet(*_args, **_kwargs) -> None:
    """The console of ranks other than 0."""


class _NullMetrics:
    """Metrics of ranks other than 0: nothing is written."""

    def log(self, record) -> None:
        pass

    def close(self) -> None:
        pass


def _parallel_metrics(s: Session, record: dict[str, Any]) -> dict[str, Any]:
    """Per-step distributed metrics, the same on every rank: all-to-all bytes sent by the busiest rank,
    mean nodes (and ranks) a token reached, and the peak memory of the busiest rank."""
    c = comm_stats(s.model)
    local = torch.tensor([float(c.bytes_sent), record.get("peak_memory_gib", 0.0)], dtype=torch.float64)
    dist.all_reduce(local, op=dist.ReduceOp.MAX)
    counts = torch.tensor([float(c.tokens), float(c.nodes_reached), float(c.ranks_reached)], dtype=torch.float64)
    dist.all_reduce(counts)
    tokens = max(counts[0].item(), 1.0)
    return {
        "a2a_bytes_per_rank": local[0].item(),
        "peak_memory_gib": local[1].item(),
        "nodes_per_token": counts[1].item() / tokens,
        "ranks_per_token": counts[2].item() / tokens,
    }


def train(
    config: TrainConfig | None,
    *,
    resume: str | None = None,
    overrides: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
    step_hook: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train according to ``config`` (or continue the run directory ``resume``).

    Args:
        config: the run configuration (ignored except for ``overrides`` when resuming).
        resume: a run directory to continue from its latest checkpoint.
        overrides: on resume, options that change the saved config (e.g. ``steps``).
        log: where human-readable lines go.
        step_hook: called with the completed step number after each step (tests use it
            to interrupt a run at a chosen step).

    Raises:
        TrainingPreempted: after SIGTERM or SIGINT, once the checkpoint of the current step is written
            (``exc.checkpoint``; continue with ``train(None, resume=exc.run_dir)``).
    """
    started = time.time()
    s = build_session(config, resume=resume, overrides=overrides)  # pp > 1: with its PipelineRuntime
    config, run_dir, model = s.config, s.run_dir, s.model
    ctx = s.parallel
    distributed = ctx.distributed
    if not ctx.is_main:  # rank 0 alone writes metrics, progress and the console
        log = _quiet
    if s.checkpoint is not None:
        log(f"resumed {run_dir} from {os.path.basename(s.checkpoint)} (step {s.step})")
    elif resume is not None:
        log(f"{run_dir} has no checkpoint yet; starting it from step 0")
    log(
        f"run {run_dir}: {s.mcfg.model_type} with {model.num_parameters():,} parameters on {s.device}; "
        f"{s.data.summary()}"
    )
    # MFU: model FLOPs per token from the planner's formula (checked against torch's FLOP counter),
    # over the device's peak for the parameter dtype.
    flops_per_token = training_flops_per_token(s.mcfg, config.data.seq_len)
    peak_flops, _ = device_peak_flops(s.device, getattr(torch, config.precision.dtype))
    main = ctx.is_main
    metrics = (
        MetricsLogger(run_dir, tensorboard=config.logging.tensorboard, start_step=s.step) if main else _NullMetrics()
    )
    progress = ProgressBar(
        config.schedule.steps, initial=s.step, mode="auto" if config.logging.progress and main else "off"
    )
    if distributed:
        log(f"parallel: {ctx.describe()}; sharded (DCP) checkpoints")
    last_ckpt = s.checkpoint
    interrupted = False

    def checkpoint_now(at_step: int) -> str | None:  # the format of the run: see dsv3.checkpoint.checkpointer
        return s.checkpointer.save(
            at_step,
            model,
            s.optimizer,
            s.ema,
            s.prefetcher.state_after,
            {"nonfinite": s.nonfinite, "val_losses": s.val_losses},
        )

    try:
        with _StopFlag() as stop:
            if s.step == 0 and not s.val_losses and s.data.val is not None:
                s.val_losses.append((0, validate(s)))
                metrics.log({"step": 0, "val_loss": s.val_losses[-1][1]})
            while s.step < config.schedule.steps:
                t0 = time.perf_counter()
                lr, gamma = s.begin_step()
                batches, _ = s.next_batches()
                stats = train_step(s, batches, gamma=gamma)
                record: dict[str, Any] = {
                    "step": s.step + 1,
                    "lr": lr,
                    "batch_size": s.n_micro(s.step) * config.data.micro_batch,
                }
                s.step += 1
                if stats.skipped:
                    s.nonfinite += 1
                    record.update(loss=stats.loss, skipped=True)
                    metrics.log(record)
                    log(
                        f"step {s.step}: non-finite loss or gradient ({stats.loss}); step skipped "
                        f"({s.nonfinite} in a row)"
                    )
                    if s.nonfinite >= config.run.max_nonfinite:
                        raise TrainingError(
                            f"{s.nonfinite} non-finite losses in a row at step {s.step}; stopping. The last good "
                            f"checkpoint is {last_ckpt or 'none (no checkpoint was written yet)'}; lower --lr or "
                            f"check the data"
                        )
                    continue
                s.nonfinite = 0
                dt = time.perf_counter() - t0
                achieved = stats.tokens * flops_per_token / dt
                record.update(
                    loss=stats.loss,
                    lm_loss=stats.lm_loss,
                    mtp_loss=stats.mtp_loss,
                    balance_loss=stats.balance_loss,
                    grad_norm=stats.grad_norm,
                    tokens_per_s=stats.tokens / dt,
                    step_time=dt,
                    tokens=s.prefetcher.sequences_after * config.data.seq_len,
                    loss_tokens=stats.loss_tokens,
                    tflops=achieved / 1e12,
                    mfu=achieved / peak_flops,
                    maxvio=maxvio(stats.load) if stats.load is not None else 0.0,
                    **peak_memory(s.device),
                )
                if distributed:
                    record.update(_parallel_metrics(s, record))
                if stats.load is not None and (s.step % config.logging.load_every == 0 or s.step == 1):
                    record["expert_load"] = stats.load.tolist()
                last = s.step == config.schedule.steps
                if s.data.val is not None and (s.step % config.logging.eval_every == 0 or last):
                    s.val_losses.append((s.step, validate(s)))
                    record["val_loss"] = s.val_losses[-1][1]
                metrics.log(record)
                progress.update(
                    s.step,
                    loss=stats.loss,
                    lm_loss=stats.lm_loss,
                    tokens_per_s=stats.tokens / dt,
                    lr=lr,
                    mfu=record["mfu"],
                    memory_gib=record["peak_memory_gib"],
                )
                if "val_loss" in record:
                    progress.write(f"step {s.step}: val_loss {record['val_loss']:.4f} (LM loss on held-out data)")
                if s.step % config.checkpoint.save_every == 0 or last or stop.requested:
                    last_ckpt = checkpoint_now(s.step)
                if step_hook is not None:
                    step_hook(s.step)
                if stop.requested:
                    interrupted = True
                    log(
                        f"interrupted by {stop.signal_name}: checkpoint written at step {s.step} ({last_ckpt}); "
                        f"continue with dsv3 train --resume {run_dir}"
                    )
                    break
    finally:
        progress.close()
        metrics.close()
        s.close()
        if distributed:
            ctx.destroy()

    sample = None
    if not distributed and s.tokenizer is not None and not interrupted and config.logging.sample_tokens > 0:
        sample = generate_text(
            model,
            s.tokenizer,
            config.logging.sample_prompt,
            max_new_tokens=config.logging.sample_tokens,
            temperature=0.8,
            top_p=0.95,
            seed=config.run.seed,
            eos_id=eos_token_id(s.tokenizer),
        )
    result = TrainResult(
        run_dir=run_dir,
        step=s.step,
        checkpoint=last_ckpt,
        val_losses=s.val_losses,
        sample=sample,
        interrupted=interrupted,
        wall_time=time.time() - started,
    )
    if interrupted:  # the checkpoint is complete: now the caller learns that the process was told to stop
        raise TrainingPreempted(stop.signal_name or "SIGTERM", last_ckpt, run_dir, s.step, result)
    return result
