"""Setting up, checkpointing and running a GRPO run (``dsv3 train --task grpo``); the step is :mod:`dsv3.train.grpo`.

:func:`build_grpo` checks everything before it writes anything (the rewards import and their
columns exist, every prompt fits the context with ``max_completion_tokens``, the layout divides),
then, through the training session's phases (docs/architecture.md): the world
(:func:`~dsv3.train.session._join_world`), the policy built on meta without MTP modules (GRPO trains the
main model) and :func:`~dsv3.parallel.parallelize.parallelize`d (expert sharding, only the held tensors
read from ``--init-from``: a dsv3 run's latest checkpoint or a Hugging Face directory; ZeroAdamW in every
layout), the frozen reference as a CPU copy of those initial weights (only when beta > 0) and the
learning-rate schedule; the run directory (:func:`~dsv3.train.session._write_run_dir`); on ``--resume``
the latest checkpoint through the :class:`~dsv3.parallel.checkpointer.Checkpointer`. A checkpoint holds the
weights (router biases included), the optimizer and the step: the prompts and the samples of a
step are functions of (seed, step), so a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable

from dsv3.checkpoint.state import list_checkpoints, resolve_checkpoint
from dsv3.data.rl_prompts import read_prompts
from dsv3.data.tokenizer import eos_token_id, get_tokenizer
from dsv3.errors import CheckpointError, ConfigError, DataError, TrainingError, TrainingPreempted
from dsv3.memory.ema import CPUEMA
from dsv3.parallel.checkpoint import list_checkpoints as list_sharded
from dsv3.parallel.checkpointer import Checkpointer
from dsv3.parallel.parallelize import parallelize
from dsv3.train.config import TrainConfig
from dsv3.train.grpo import GRPORun, grpo_step
from dsv3.train.loop import TrainResult, _NullMetrics, _quiet, _StopFlag
from dsv3.train.metrics import MetricsLogger
from dsv3.train.preflight import model_config_for, refuse_frozen_overrides, resolve_device
from dsv3.train.rewards import RewardSet
from dsv3.train.rollout import RoutingRecorder
from dsv3.train.rundir import LOCK_FILE, RunLock, check_run_dir_usable, prepare_run_dir, resume_config
from dsv3.train.schedule import LRSchedule
from dsv3.train.session import _join_world, _write_run_dir, build_meta
from dsv3.train.sft import run_template


# ----------------------------------------------------------------------------- set-up pieces
def _split(text: str | None) -> list[str]:
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def build_rewards(config: TrainConfig):
    """The run's :class:`~dsv3.train.rewards.RewardSet` from ``--reward``, ``--reward-weights``, ``--reward-model``."""
    specs, rl = _split(config.rl.reward), config.rl
    weights = None
    if rl.reward_weights is not None:
        try:
            weights = [float(w) for w in _split(rl.reward_weights)]
        except ValueError:
            raise ConfigError(f"--reward-weights must be comma-separated numbers, got {rl.reward_weights!r}") from None
    return RewardSet.from_specs(specs, weights, reward_model=rl.reward_model)


def resolve_init(config: TrainConfig) -> None:
    """Pin ``--init-from`` to a checkpoint directory (a dsv3 run: its latest checkpoint), so that the reference
    model of a resumed run is the same checkpoint even if the source run goes on."""
    init = config.model.init_from
    if init is not None and os.path.isdir(init) and not os.path.isfile(os.path.join(init, "config.json")):
        config.model.init_from = resolve_checkpoint(init)


def grpo_tokenizer(config: TrainConfig, run_dir: str, vocab_size: int):
    """The tokenizer: the run directory's copy (resume), ``--tokenizer``, or the checkpoint's tokenizer.json."""
    init = config.model.init_from or ""
    candidates = [
        os.path.join(run_dir, "tokenizer.json") if run_dir else "",
        config.data.tokenizer or "",
        os.path.join(init, "tokenizer.json"),
        os.path.join(os.path.dirname(os.path.dirname(init)), "tokenizer.json"),
    ]
    for spec in candidates:
        if spec and os.path.exists(spec):
            return get_tokenizer(spec, vocab_size=vocab_size)
    raise DataError(
        "GRPO needs the checkpoint's tokenizer; pass --tokenizer or --init-from a checkpoint with a tokenizer.json"
    )


def _template(config: TrainConfig, run_dir: str):
    """The chat template for ``messages`` prompts, or None when there is none (``prompt`` text needs none)."""
    try:
        return run_template(config, run_dir)
    except DataError:
        return None


def check_prompt_split(config: TrainConfig, dp: int) -> None:
    """A step's P = global_batch / G prompts must split evenly over the ``dp`` ranks (:func:`_join_world`'s check)."""
    prompts = config.data.global_batch // config.rl.group_size
    if prompts % dp:
        raise ConfigError(
            f"global_batch / group_size = {prompts} prompts per step cannot be split over dp {dp} ranks; "
            f"make global_batch a multiple of group_size * dp"
        )


def _policy(config: TrainConfig, mcfg, ctx, run_dir: str):
    """The policy (MTP dropped) through the set-up phases: built on meta, then :func:`parallelize` (expert
    sharding, only the held tensors materialised and read from ``--init-from``, ZeroAdamW in every layout)."""
    model, init_from = build_meta(config, mcfg, mtp=False)
    return parallelize(model, ctx, config, mcfg=mcfg, init_from=init_from, run_dir=run_dir, partial=True)


# ----------------------------------------------------------------------------- build
def build_grpo(
    config: TrainConfig | None,
    *,
    resume: str | None = None,
    overrides: dict[str, Any] | None = None,
    parallel: Any = None,
) -> GRPORun:
    """Build (or restore) a GRPO run; nothing is written before every input has been checked."""
    owner = (parallel.rank if parallel is not None else int(os.environ.get("RANK", "0") or 0)) == 0
    lock = RunLock("", enabled=owner)
    if resume is not None:
        lock.run_dir = prepare_run_dir(config, resume)
        lock.path = os.path.join(lock.run_dir, LOCK_FILE)
        lock.acquire()
    try:
        return _build(config, resume=resume, overrides=overrides, parallel=parallel, lock=lock)
    except BaseException:
        lock.release()
        raise


def _configure(config: TrainConfig | None, resume: str | None, overrides) -> tuple[TrainConfig, str]:

    if resume is not None:
        run_dir = prepare_run_dir(config, resume)  # type: ignore[arg-type]
        config = resume_config(run_dir, overrides or {})
        refuse_frozen_overrides(resume_config(run_dir, {}), config, overrides or {})
        return config, run_dir
    assert config is not None
    config.validate()
    run_dir = prepare_run_dir(config, None)
    config.run.dir = run_dir
    check_run_dir_usable(run_dir)
    resolve_init(config)
    return config, run_dir


def _build(config, *, resume, overrides, parallel, lock) -> GRPORun:
    """The session's phases for GRPO: configuration, prompts and rewards (all checked first), the world, the
    policy (:func:`_policy`), the run directory (:func:`dsv3.train.session._write_run_dir`), the restore."""
    config, run_dir = _configure(config, resume, overrides)
    device = resolve_device(config)
    mcfg = model_config_for(config).replace(num_nextn_predict_layers=0)
    rewards = build_rewards(config)
    tokenizer = grpo_tokenizer(config, run_dir if resume else "", mcfg.vocab_size)
    eos_id = _eos_id(config, tokenizer)
    if config.data.path is None:
        raise DataError(
            '--task grpo needs prompts; pass --data prompts.jsonl ({"prompt": ...} or {"messages": ...} '
            "per line, plus the columns the rewards read)"
        )
    prompts = read_prompts(
        config.data.path,
        tokenizer=tokenizer,
        template=_template(config, run_dir),
        context=mcfg.max_position_embeddings,
        max_completion_tokens=config.rl.max_completion_tokens,
    )
    rewards.check_columns(list(prompts.columns), source=config.data.path)
    ctx, run_dir = _join_world(config, mcfg, parallel, run_dir, device, check_split=check_prompt_split)
    if resume is not None:
        check_resume_layout(run_dir, ctx.distributed)
    par = _policy(config, mcfg, ctx, run_dir)
    model = par.model
    reference = None
    if config.rl.beta > 0:  # the frozen reference: a CPU copy of the initial weights, swapped in when needed
        reference = CPUEMA(model, 0.0)

    run = GRPORun(
        config=config,
        mcfg=mcfg,
        run_dir=run_dir,
        device=device,
        tokenizer=tokenizer,
        prompts=prompts,
        rewards=rewards,
        model=model,
        optimizer=par.optimizer,
        schedule=LRSchedule.from_options(config.schedule, config.optimizer.lr),
        params=[p for p in model.parameters() if p.requires_grad],
        eos_id=eos_id,
        reference=reference,
        parallel=ctx,
        recorder=RoutingRecorder(model) if model.moe_layers() else None,
        checkpointer=Checkpointer(run_dir, ctx, keep_last=config.checkpoint.keep_last, tokenizer=tokenizer),
    )
    checkpoint = _write_run_dir(run, resume, True, lock)  # type: ignore[arg-type]  (the Session names it reads)
    if resume is not None:
        restore_grpo(run, checkpoint)
    return run


def _eos_id(config: TrainConfig, tokenizer) -> int:

    return eos_token_id(tokenizer, config.data.eos_token)


# ----------------------------------------------------------------------------- checkpoints
def save_grpo(run: GRPORun) -> str:
    """Write the run's state after ``run.step`` steps through the run's :class:`~dsv3.parallel.checkpointer.
    Checkpointer` (sharded DCP under torchrun, the one-process format otherwise); returns its directory."""
    return run.checkpointer.save(
        run.step, run.model, run.optimizer, loader_state={"grpo_step": run.step}, extra={"nonfinite": run.nonfinite}
    )


def restore_grpo(run: GRPORun, checkpoint: str | None) -> None:
    """Load ``checkpoint`` (the run directory's newest, chosen by :func:`dsv3.train.session._write_run_dir`;
    None: step 0) into the policy and optimizer; each rank reads only what it holds."""
    restored = run.checkpointer.restore(run.model, run.optimizer, checkpoint=checkpoint)
    if restored is not None:
        run.step, run.nonfinite, run.checkpoint = restored.step, restored.nonfinite, restored.checkpoint


def check_resume_layout(run_dir: str, distributed: bool) -> None:
    """Refuse (one line) to continue a run in the other kind of layout than it was written in: its checkpoints
    would not be found and it would silently start again from step 0."""
    mine, other = (list_sharded, list_checkpoints) if distributed else (list_checkpoints, list_sharded)
    if not mine(run_dir) and other(run_dir):
        written, now = ("in one process", "under torchrun") if distributed else ("under torchrun", "in one process")
        raise CheckpointError(
            f"{run_dir} was written {written}; a GRPO run cannot continue {now} yet; resume it {written}"
        )


# ----------------------------------------------------------------------------- the loop
def _line(m: dict[str, Any], steps: int) -> str:
    agree = f", routing agreement {m['routing_agreement']:.3f}" if "routing_agreement" in m else ""
    return (
        f"step {m['step']}/{steps}: reward {m['reward']:.3f} (std {m['reward_std']:.3f}), loss {m['loss']:.4f}, "
        f"kl {m['kl']:.4f}, entropy {m['entropy']:.3f}, completion {m['completion_length']:.1f} tokens "
        f"({m['completion_cut']:.0%} cut){agree}"
    )


def train_grpo(
    config: TrainConfig | None,
    *,
    resume: str | None = None,
    overrides: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
    step_hook: Callable[[int], None] | None = None,
    parallel: Any = None,
):
    """Run GRPO according to ``config`` (or continue the run directory ``resume``); returns a
    :class:`~dsv3.train.loop.TrainResult`. ``step_hook`` is called with each completed step (tests).

    Raises:
        TrainingPreempted: after SIGTERM or SIGINT, once the checkpoint of the current step is written
            (the preemption contract of :func:`dsv3.train.loop.train`).
    """
    started = time.time()
    run = build_grpo(config, resume=resume, overrides=overrides, parallel=parallel)
    c, main = run.config, not run.distributed or run.parallel.is_main
    log = log if main else _quiet
    if run.checkpoint is not None:
        log(f"resumed {run.run_dir} from {os.path.basename(run.checkpoint)} (step {run.step})")
    log(
        f"GRPO run {run.run_dir}: {len(run.prompts)} prompts, G = {c.rl.group_size}, "
        f"{c.data.global_batch // c.rl.group_size} prompts per step, loss {c.rl.loss_type}, beta {c.rl.beta}"
    )
    metrics = (
        MetricsLogger(run.run_dir, tensorboard=c.logging.tensorboard, start_step=run.step) if main else _NullMetrics()
    )
    last, interrupted = run.checkpoint, False
    try:
        with _StopFlag() as stop:
            while run.step < c.schedule.steps:
                record = grpo_step(run)
                _check_finite(run, record, last)
                metrics.log(record)
                log(_line(record, c.schedule.steps))
                if step_hook is not None:
                    step_hook(run.step)
                if run.step % c.checkpoint.save_every == 0 or run.step == c.schedule.steps or stop.requested:
                    last = save_grpo(run)  # a signal that came during the step (or the hook) is checkpointed here
                if stop.requested:
                    interrupted = True
                    log(
                        f"interrupted by {stop.signal_name}: checkpoint written at step {run.step} ({last}); "
                        f"continue with dsv3 train --resume {run.run_dir}"
                    )
                    break
    finally:
        metrics.close()
        run.close()
        if run.distributed and parallel is None:
            run.parallel.destroy()
    result = TrainResult(
        run_dir=run.run_dir, step=run.step, checkpoint=last, interrupted=interrupted, wall_time=time.time() - started
    )
    if interrupted:  # the checkpoint is complete: now the caller learns that the process was told to stop
        raise TrainingPreempted(stop.signal_name or "SIGTERM", last, run.run_dir, run.step, result)
    return result


def _check_finite(run: GRPORun, record: dict[str, Any], last: str | None) -> None:
    """Count skipped (non-finite) updates; stop after ``max_nonfinite`` steps in a row that skipped one."""
    if not record["skipped"] and math.isfinite(record["loss"]):
        run.nonfinite = 0
        return
    run.nonfinite += 1
    if run.nonfinite >= run.config.run.max_nonfinite:
        raise TrainingError(
            f"{run.nonfinite} GRPO steps in a row with a non-finite loss or gradient at step "
            f"{run.step}; stopping. The last good checkpoint is {last or 'none'}; lower --lr"
        )
