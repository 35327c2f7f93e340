"""The training loop: from the data to the loss, one optimizer step at a time.

Read :func:`train` top to bottom: :func:`~dsv3.train.session.build_session` sets up (or restores) the
run; then each step (:func:`_run_steps`) sets its learning rate (:meth:`Session.begin_step`, which also
gives the step's gamma), takes its micro-batches (:meth:`Session.next_batches`), runs
:func:`~dsv3.train.step.train_step` (lambda and alpha as loss arguments, clipping, the NaN skip, AdamW,
the bias update, the EMA) and reports (:func:`_report`: metrics, MFU, validation, progress) and checkpoints.

Ctrl-C or SIGTERM finishes the current step, writes a checkpoint and stops: :func:`train` then raises
:class:`~dsv3.errors.TrainingPreempted` with the checkpoint's path (``dsv3 train`` exits 143 for SIGTERM,
130 for Ctrl-C); a second signal stops at once (``KeyboardInterrupt``). A checkpoint is a complete,
atomically renamed directory, so ``dsv3 train --resume RUN_DIR`` continues from a consistent state and
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

from dsv3.data.loader import batch_to, split_batch
from dsv3.data.tokenizer import eos_token_id
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
from dsv3.train.step import train_step


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


@dataclass
class _Outputs:
    """Where a run reports (rank 0; the other ranks get :func:`_quiet` and :class:`_NullMetrics`): the console
    ``log``, the metrics file, the progress bar, and the MFU constants (model FLOPs per token from the planner's
    formula, checked against torch's FLOP counter, over the device's peak for the parameter dtype)."""

    log: Callable[[str], None]
    metrics: Any
    progress: Any
    flops_per_token: float
    peak_flops: float

    @classmethod
    def open(cls, s: Session, log: Callable[[str], None]) -> _Outputs:
        main = s.parallel.is_main
        return cls(
            log=log if main else _quiet,
            metrics=MetricsLogger(s.run_dir, tensorboard=s.config.logging.tensorboard, start_step=s.step)
            if main
            else _NullMetrics(),
            progress=ProgressBar(
                s.config.schedule.steps, initial=s.step, mode="auto" if s.config.logging.progress and main else "off"
            ),
            flops_per_token=training_flops_per_token(s.mcfg, s.config.data.seq_len),
            peak_flops=device_peak_flops(s.device, getattr(torch, s.config.precision.dtype))[0],
        )

    def close(self) -> None:
        self.progress.close()
        self.metrics.close()


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
    out = _Outputs.open(s, log)
    _announce(s, resume, out.log)
    last_ckpt, stopped_by = s.checkpoint, None
    try:
        with _StopFlag() as stop:
            last_ckpt, interrupted = _run_steps(s, out, stop, step_hook, last_ckpt)
            stopped_by = (stop.signal_name or "SIGTERM") if interrupted else None
    finally:
        out.close()
        s.close()
        if s.parallel.distributed:
            s.parallel.destroy()
    result = TrainResult(
        run_dir=s.run_dir,
        step=s.step,
        checkpoint=last_ckpt,
        val_losses=s.val_losses,
        sample=_closing_sample(s) if stopped_by is None else None,
        interrupted=stopped_by is not None,
        wall_time=time.time() - started,
    )
    if stopped_by is not None:  # the checkpoint is complete: now the caller learns that the process was told to stop
        raise TrainingPreempted(stopped_by, last_ckpt, s.run_dir, s.step, result)
    return result


def _announce(s: Session, resume: str | None, log: Callable[[str], None]) -> None:
    """The run's first console lines: what was resumed, the model, the data, the layout."""
    if s.checkpoint is not None:
        log(f"resumed {s.run_dir} from {os.path.basename(s.checkpoint)} (step {s.step})")
    elif resume is not None:
        log(f"{s.run_dir} has no checkpoint yet; starting it from step 0")
    log(
        f"run {s.run_dir}: {s.mcfg.model_type} with {s.model.num_parameters():,} parameters on {s.device}; "
        f"{s.data.summary()}"
    )
    if s.parallel.distributed:
        log(f"parallel: {s.parallel.describe()}; sharded (DCP) checkpoints")


def _checkpoint(s: Session, step: int) -> str | None:
    """Save step ``step`` in the run's format (see :mod:`dsv3.parallel.checkpointer`)."""
    extra = {"nonfinite": s.nonfinite, "val_losses": s.val_losses}
    return s.checkpointer.save(step, s.model, s.optimizer, s.ema, s.prefetcher.state_after, extra)


def _run_steps(s: Session, out: _Outputs, stop: _StopFlag, step_hook, last_ckpt: str | None) -> tuple[str | None, bool]:
    """The steps from ``s.step`` to the end of the run, or to the step during which a stop signal came; returns the
    last checkpoint and whether a signal stopped the run."""
    config = s.config
    if s.step == 0 and not s.val_losses and s.data.val is not None:
        s.val_losses.append((0, validate(s)))
        out.metrics.log({"step": 0, "val_loss": s.val_losses[-1][1]})
    while s.step < config.schedule.steps:
        t0 = time.perf_counter()
        lr, gamma = s.begin_step()
        batches, _ = s.next_batches()
        stats = train_step(s, batches, gamma=gamma)
        record = {"step": s.step + 1, "lr": lr, "batch_size": s.n_micro(s.step) * config.data.micro_batch}
        s.step += 1
        if stats.skipped:
            _skipped(s, out, record, stats, last_ckpt)
            continue
        s.nonfinite = 0
        _report(s, out, record, stats, time.perf_counter() - t0)
        if s.step % config.checkpoint.save_every == 0 or s.step == config.schedule.steps or stop.requested:
            last_ckpt = _checkpoint(s, s.step)
        if step_hook is not None:
            step_hook(s.step)
        if stop.requested:
            out.log(
                f"interrupted by {stop.signal_name}: checkpoint written at step {s.step} ({last_ckpt}); "
                f"continue with dsv3 train --resume {s.run_dir}"
            )
            return last_ckpt, True
    return last_ckpt, False


def _skipped(s: Session, out: _Outputs, record: dict[str, Any], stats, last_ckpt: str | None) -> None:
    """A step with a non-finite loss or gradient: logged; too many in a row stop the run."""
    s.nonfinite += 1
    record.update(loss=stats.loss, skipped=True)
    out.metrics.log(record)
    out.log(f"step {s.step}: non-finite loss or gradient ({stats.loss}); step skipped ({s.nonfinite} in a row)")
    if s.nonfinite >= s.config.run.max_nonfinite:
        raise TrainingError(
            f"{s.nonfinite} non-finite losses in a row at step {s.step}; stopping. The last good "
            f"checkpoint is {last_ckpt or 'none (no checkpoint was written yet)'}; lower --lr or "
            f"check the data"
        )


def _report(s: Session, out: _Outputs, record: dict[str, Any], stats, dt: float) -> None:
    """The metrics of a finished step (``dt`` seconds), validation when it is due, and the progress bar."""
    config = s.config
    achieved = stats.tokens * out.flops_per_token / dt
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
        mfu=achieved / out.peak_flops,
        maxvio=maxvio(stats.load) if stats.load is not None else 0.0,
        **peak_memory(s.device),
    )
    if s.parallel.distributed:
        record.update(_parallel_metrics(s, record))
    if stats.load is not None and (s.step % config.logging.load_every == 0 or s.step == 1):
        record["expert_load"] = stats.load.tolist()
    if s.data.val is not None and (s.step % config.logging.eval_every == 0 or s.step == config.schedule.steps):
        s.val_losses.append((s.step, validate(s)))
        record["val_loss"] = s.val_losses[-1][1]
    out.metrics.log(record)
    out.progress.update(
        s.step,
        loss=stats.loss,
        lm_loss=stats.lm_loss,
        tokens_per_s=stats.tokens / dt,
        lr=record["lr"],
        mfu=record["mfu"],
        memory_gib=record["peak_memory_gib"],
    )
    if "val_loss" in record:
        out.progress.write(f"step {s.step}: val_loss {record['val_loss']:.4f} (LM loss on held-out data)")


def _closing_sample(s: Session) -> str | None:
    """A few sampled tokens after the prompt of a finished one-process run (None: distributed, no tokenizer,
    or ``sample_tokens`` 0)."""
    logging = s.config.logging
    if s.parallel.distributed or s.tokenizer is None or logging.sample_tokens <= 0:
        return None
    return generate_text(
        s.model,
        s.tokenizer,
        logging.sample_prompt,
        max_new_tokens=logging.sample_tokens,
        temperature=0.8,
        top_p=0.95,
        seed=s.config.run.seed,
        eos_id=eos_token_id(s.tokenizer),
    )
