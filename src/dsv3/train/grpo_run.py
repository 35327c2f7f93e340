"""Setting up, checkpointing and running a GRPO run (``dsv3 train --task grpo``); the step is :mod:`dsv3.train.grpo`.

:func:`build_grpo` checks everything before it writes anything (the rewards import and their
columns exist, every prompt fits the context with ``max_completion_tokens``, the layout divides),
then: the policy from ``--init-from`` (a dsv3 run's latest checkpoint or a Hugging Face directory;
its MTP modules are dropped: GRPO trains the main model), expert-sharded under torchrun, the frozen
reference as a CPU copy of those initial weights (only when beta > 0), AdamW (ZeRO-1 under torchrun)
and the learning-rate schedule; on ``--resume`` the latest checkpoint. A checkpoint holds the
weights (router biases included), the optimizer and the step: the prompts and the samples of a
step are functions of (seed, step), so a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable

from dsv3.errors import CheckpointError, ConfigError, DataError, TrainingError
from dsv3.train.config import TrainConfig
from dsv3.train.grpo import GRPORun, grpo_step
from dsv3.train.rl_prompts import read_prompts
from dsv3.train.rollout import RoutingRecorder


# ----------------------------------------------------------------------------- set-up pieces
def _split(text: str | None) -> list[str]:
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def build_rewards(config: TrainConfig):
    """The run's :class:`~dsv3.train.rewards.RewardSet` from ``--reward``, ``--reward-weights``, ``--reward-model``."""
    from dsv3.train.rewards import RewardSet

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
    from dsv3.checkpoint.state import resolve_checkpoint

    init = config.model.init_from
    if init is not None and os.path.isdir(init) and not os.path.isfile(os.path.join(init, "config.json")):
        config.model.init_from = resolve_checkpoint(init)


def grpo_tokenizer(config: TrainConfig, run_dir: str, vocab_size: int):
    """The tokenizer: the run directory's copy (resume), ``--tokenizer``, or the checkpoint's tokenizer.json."""
    from dsv3.train.tokenizer import get_tokenizer

    init = config.model.init_from or ""
    candidates = [os.path.join(run_dir, "tokenizer.json") if run_dir else "", config.data.tokenizer or "",
                  os.path.join(init, "tokenizer.json"), os.path.join(os.path.dirname(os.path.dirname(init)),
                                                                     "tokenizer.json")]
    for spec in candidates:
        if spec and os.path.exists(spec):
            return get_tokenizer(spec, vocab_size=vocab_size)
    raise DataError("GRPO needs the checkpoint's tokenizer; pass --tokenizer or --init-from a checkpoint with a "
                    "tokenizer.json")


def _template(config: TrainConfig, run_dir: str):
    """The chat template for ``messages`` prompts, or None when there is none (``prompt`` text needs none)."""
    from dsv3.train.sft import run_template

    try:
        return run_template(config, run_dir)
    except DataError:
        return None


def _optimizer(config: TrainConfig, model, parallel):
    opt = config.optimizer
    kwargs = dict(lr=opt.lr, betas=(opt.beta1, opt.beta2), weight_decay=opt.weight_decay, eps=opt.eps,
                  moments_dtype=config.memory.optim_states)
    if parallel is not None and parallel.distributed:
        from dsv3.parallel.zero import ZeroAdamW

        return ZeroAdamW(model, parallel, **kwargs)
    from dsv3.train.optim import build_optimizer

    return build_optimizer(model, **kwargs)


def _check_layout(config: TrainConfig, parallel) -> None:
    dp = parallel.dp if parallel is not None and parallel.distributed else 1
    prompts = config.data.global_batch // config.rl.group_size
    if prompts % dp:
        raise ConfigError(f"global_batch / group_size = {prompts} prompts per step cannot be split over dp {dp} ranks; "
                          f"make global_batch a multiple of group_size * dp")


def _policy(config: TrainConfig, mcfg, device, parallel):
    """The policy model (MTP dropped), expert-sharded under torchrun."""
    from dsv3.train.session import build_model

    model = build_model(config, mcfg, device)
    model.drop_mtp()
    model.train()
    if parallel is not None and parallel.distributed:
        from dsv3.parallel.dispatch import shard_experts

        shard_experts(model, parallel, dispatcher=config.parallel.dispatcher, fp8=config.precision.fp8)
    return model


# ----------------------------------------------------------------------------- build
def build_grpo(config: TrainConfig | None, *, resume: str | None = None, overrides: dict[str, Any] | None = None,
               parallel: Any = None) -> GRPORun:
    """Build (or restore) a GRPO run; nothing is written before every input has been checked."""
    from dsv3.train.rundir import LOCK_FILE, RunLock
    from dsv3.train.session import prepare_run_dir

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
    from dsv3.train.preflight import refuse_frozen_overrides
    from dsv3.train.rundir import check_run_dir_usable
    from dsv3.train.session import prepare_run_dir, resume_config

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
    from dsv3.train.session import _join_parallel, model_config_for, resolve_device

    config, run_dir = _configure(config, resume, overrides)
    device = resolve_device(config)
    mcfg = model_config_for(config).replace(num_nextn_predict_layers=0)
    rewards = build_rewards(config)
    tokenizer = grpo_tokenizer(config, run_dir if resume else "", mcfg.vocab_size)
    eos_id = _eos_id(config, tokenizer)
    if config.data.path is None:
        raise DataError("--task grpo needs prompts; pass --data prompts.jsonl ({\"prompt\": ...} or {\"messages\": ...} "
                        "per line, plus the columns the rewards read)")
    prompts = read_prompts(config.data.path, tokenizer=tokenizer, template=_template(config, run_dir),
                           context=mcfg.max_position_embeddings, max_completion_tokens=config.rl.max_completion_tokens)
    rewards.check_columns(list(prompts.columns), source=config.data.path)
    parallel, run_dir = _join_parallel(config, mcfg, parallel, run_dir)
    _check_layout(config, parallel)
    if resume is not None:
        check_resume_layout(run_dir, parallel is not None and parallel.distributed)
    model = _policy(config, mcfg, device, parallel)
    reference = None
    if config.rl.beta > 0:  # the frozen reference: a CPU copy of the initial weights, swapped in when needed
        from dsv3.memory.ema import CPUEMA

        reference = CPUEMA(model, 0.0)
    from dsv3.train.schedule import LRSchedule

    run = GRPORun(config=config, mcfg=mcfg, run_dir=run_dir, device=device, tokenizer=tokenizer, prompts=prompts,
                  rewards=rewards, model=model, optimizer=_optimizer(config, model, parallel),
                  schedule=LRSchedule.from_options(config.schedule, config.optimizer.lr),
                  params=[p for p in model.parameters() if p.requires_grad], eos_id=eos_id, reference=reference,
                  parallel=parallel, recorder=RoutingRecorder(model) if model.moe_layers() else None)
    _write_run_dir(run, resume, lock)
    if resume is not None:
        restore_grpo(run)
    return run


def _eos_id(config: TrainConfig, tokenizer) -> int:
    from dsv3.train.tokenizer import eos_token_id

    return eos_token_id(tokenizer, config.data.eos_token)


def _write_run_dir(run: GRPORun, resume: str | None, lock) -> None:
    """Rank 0 creates and locks the run directory and writes its config, model config and tokenizer."""
    from dsv3.errors import RunDirError
    from dsv3.train.config import save_effective_config
    from dsv3.train.rundir import LOCK_FILE
    from dsv3.train.session import CONFIG_FILE, MODEL_CONFIG_FILE
    from dsv3.utils.io import atomic_path

    if run.parallel is not None and run.parallel.distributed and not run.parallel.is_main:
        return
    if resume is None:
        try:
            os.makedirs(run.run_dir, exist_ok=True)
        except OSError as exc:
            raise RunDirError(f"cannot create run directory {run.run_dir} ({exc.strerror or exc}); "
                              f"choose another --run-dir") from None
        lock.run_dir, lock.path = run.run_dir, os.path.join(run.run_dir, LOCK_FILE)
        lock.acquire()
        run.mcfg.save(os.path.join(run.run_dir, MODEL_CONFIG_FILE))
        with atomic_path(os.path.join(run.run_dir, "tokenizer.json")) as tmp:
            run.tokenizer.save(tmp)
    save_effective_config(run.config, os.path.join(run.run_dir, CONFIG_FILE))
    run.lock = lock if lock.held else None


# ----------------------------------------------------------------------------- checkpoints
def save_grpo(run: GRPORun) -> str:
    """Write the run's state after ``run.step`` steps (sharded DCP under torchrun); returns its directory."""
    c = run.config
    if run.distributed:
        from dsv3.parallel.checkpoint import save_sharded

        return save_sharded(run.run_dir, run.step, model=run.model, optimizer=run.optimizer, ctx=run.parallel,
                            extra={"loader": {"grpo_step": run.step}, "nonfinite": run.nonfinite},
                            keep_last=c.checkpoint.keep_last)
    from dsv3.checkpoint.state import save_checkpoint

    return save_checkpoint(run.run_dir, run.step, model=run.model, optimizer=run.optimizer,
                           loader_state={"grpo_step": run.step}, tokenizer=run.tokenizer,
                           keep_last=c.checkpoint.keep_last, extra={"nonfinite": run.nonfinite})


def restore_grpo(run: GRPORun) -> None:
    """Load the latest checkpoint of the run directory into the policy and optimizer (none yet: step 0).
    A run continues in the kind of layout it was written in (sharded under torchrun, whole in one process)."""
    from dsv3.checkpoint.state import load_checkpoint_state, select_resume_checkpoint
    from dsv3.parallel.checkpoint import latest_sharded, load_sharded

    if run.distributed:
        sharded = latest_sharded(run.run_dir)
        if sharded is not None:
            meta = load_sharded(sharded, model=run.model, optimizer=run.optimizer, ctx=run.parallel)
            run.step, run.nonfinite, run.checkpoint = meta["step"], meta.get("nonfinite", 0), sharded
        return
    path = select_resume_checkpoint(run.run_dir) if run.lock is not None else None
    if path is not None:
        state = load_checkpoint_state(path, model=run.model, optimizer=run.optimizer, restore_rng=False)
        run.step, run.nonfinite, run.checkpoint = state["step"], state["extra"].get("nonfinite", 0), path


def check_resume_layout(run_dir: str, distributed: bool) -> None:
    """Refuse (one line) to continue a run in the other kind of layout than it was written in: its checkpoints
    would not be found and it would silently start again from step 0."""
    from dsv3.checkpoint.state import list_checkpoints
    from dsv3.parallel.checkpoint import list_checkpoints as list_sharded

    mine, other = (list_sharded, list_checkpoints) if distributed else (list_checkpoints, list_sharded)
    if not mine(run_dir) and other(run_dir):
        written, now = ("in one process", "under torchrun") if distributed else ("under torchrun", "in one process")
        raise CheckpointError(f"{run_dir} was written {written}; a GRPO run cannot continue {now} yet; resume it "
                              f"{written}")


# ----------------------------------------------------------------------------- the loop
def _line(m: dict[str, Any], steps: int) -> str:
    agree = f", routing agreement {m['routing_agreement']:.3f}" if "routing_agreement" in m else ""
    return (f"step {m['step']}/{steps}: reward {m['reward']:.3f} (std {m['reward_std']:.3f}), loss {m['loss']:.4f}, "
            f"kl {m['kl']:.4f}, entropy {m['entropy']:.3f}, completion {m['completion_length']:.1f} tokens "
            f"({m['completion_cut']:.0%} cut){agree}")


def train_grpo(config: TrainConfig | None, *, resume: str | None = None, overrides: dict[str, Any] | None = None,
               log: Callable[[str], None] = print, step_hook: Callable[[int], None] | None = None,
               parallel: Any = None):
    """Run GRPO according to ``config`` (or continue the run directory ``resume``); returns a
    :class:`~dsv3.train.loop.TrainResult`. ``step_hook`` is called with each completed step (tests)."""
    from dsv3.train.loop import TrainResult, _NullMetrics, _quiet, _StopFlag
    from dsv3.train.metrics import MetricsLogger

    started = time.time()
    run = build_grpo(config, resume=resume, overrides=overrides, parallel=parallel)
    c, main = run.config, not run.distributed or run.parallel.is_main
    log = log if main else _quiet
    if run.checkpoint is not None:
        log(f"resumed {run.run_dir} from {os.path.basename(run.checkpoint)} (step {run.step})")
    log(f"GRPO run {run.run_dir}: {len(run.prompts)} prompts, G = {c.rl.group_size}, "
        f"{c.data.global_batch // c.rl.group_size} prompts per step, loss {c.rl.loss_type}, beta {c.rl.beta}")
    metrics = MetricsLogger(run.run_dir, tensorboard=c.logging.tensorboard, start_step=run.step) if main \
        else _NullMetrics()
    last, interrupted = run.checkpoint, False
    try:
        with _StopFlag() as stop:
            while run.step < c.schedule.steps:
                record = grpo_step(run)
                _check_finite(run, record, last)
                metrics.log(record)
                log(_line(record, c.schedule.steps))
                if run.step % c.checkpoint.save_every == 0 or run.step == c.schedule.steps or stop.requested:
                    last = save_grpo(run)
                if step_hook is not None:
                    step_hook(run.step)
                if stop.requested:
                    interrupted = True
                    log(f"interrupted by {stop.signal_name}: checkpoint written at step {run.step} ({last}); "
                        f"continue with dsv3 train --resume {run.run_dir}")
                    break
    finally:
        metrics.close()
        run.close()
        if run.distributed and parallel is None:
            run.parallel.destroy()
    return TrainResult(run_dir=run.run_dir, step=run.step, checkpoint=last, interrupted=interrupted,
                       wall_time=time.time() - started)


def _check_finite(run: GRPORun, record: dict[str, Any], last: str | None) -> None:
    """Count skipped (non-finite) updates; stop after ``max_nonfinite`` steps in a row that skipped one."""
    if not record["skipped"] and math.isfinite(record["loss"]):
        run.nonfinite = 0
        return
    run.nonfinite += 1
    if run.nonfinite >= run.config.run.max_nonfinite:
        raise TrainingError(f"{run.nonfinite} GRPO steps in a row with a non-finite loss or gradient at step "
                            f"{run.step}; stopping. The last good checkpoint is {last or 'none'}; lower --lr")
