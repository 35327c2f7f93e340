"""A training session: :func:`build_session` assembles a run from a :class:`~dsv3.train.config.TrainConfig`.

The set-up is phases, each a short function (docs/architecture.md): 1. check the configuration
(:func:`~dsv3.train.preflight.check_configuration`); 2. join the world (:func:`_join_world`); 3. build the data
(:func:`_build_data`); 4. build the model on the ``meta`` device (:func:`build_meta`);
5. :func:`~dsv3.parallel.parallelize.parallelize` (FP8, recomputation, expert sharding, stage selection,
materialisation of the held tensors, the ZeRO-1 optimizer); 6. write the run directory (:func:`_write_run_dir`,
rank 0, once all input is known good); 7. restore (:func:`_restore`: a checkpoint of any layout).
One optimizer step is :func:`dsv3.train.step.train_step`; the loop around it, :func:`dsv3.train.loop.train`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from dsv3.checkpoint.state import remove_stale_temporaries, resolve_pretrained
from dsv3.config import ModelConfig
from dsv3.data.chat import save_template
from dsv3.data.pretrain import build_data
from dsv3.data.sources import CorpusSpec
from dsv3.data.tokenizer import get_tokenizer, tokenizer_for_data
from dsv3.errors import ConfigError, DataError, RunDirError
from dsv3.memory.ema import CPUEMA
from dsv3.parallel.checkpointer import Checkpointer
from dsv3.parallel.parallelize import build_meta_model, parallelize
from dsv3.parallel.pipeline.train import check_pipeline_layout
from dsv3.parallel.world import ParallelContext, init_parallel
from dsv3.train.config import TrainConfig, save_effective_config
from dsv3.train.optim import set_lr
from dsv3.train.prefetch import Batch, BatchPrefetcher
from dsv3.train.preflight import check_configuration
from dsv3.train.rundir import CONFIG_FILE, LOCK_FILE, MODEL_CONFIG_FILE, RunLock, prepare_run_dir
from dsv3.train.schedule import BatchRamp, LRSchedule, MoESchedule
from dsv3.train.sft import build_sft_training_data, sft_tokenizer_spec
from dsv3.utils.io import atomic_path
from dsv3.utils.malloc import fix_mmap_threshold


# ----------------------------------------------------------------------------- building blocks
def build_meta(config: TrainConfig, mcfg: ModelConfig, *, mtp: bool = True):
    """The model of the run on the ``meta`` device (phase 4: shapes, no storage) and the resolved
    ``--init-from`` checkpoint directory (None without one). Without MTP weights in the checkpoint
    the model is built without MTP modules (``model.config`` becomes ``mcfg`` when initialised);
    ``mtp=False`` builds none at all (GRPO and the reward model train the main model only)."""
    init_from = None
    build_cfg = mcfg
    if config.model.init_from:
        init_from, ckpt_cfg, _ = resolve_pretrained(config.model.init_from)  # checked here, before anything is written
        build_cfg = mcfg.replace(num_nextn_predict_layers=ckpt_cfg.num_nextn_predict_layers)
    if not mtp:
        build_cfg = build_cfg.replace(num_nextn_predict_layers=0)
    return build_meta_model(build_cfg, config.run.seed), init_from


def build_tokenizer(config: TrainConfig, vocab_size: int, run_dir: str):
    """The run's tokenizer: the run directory's copy on resume, the user's, or a BPE trained on the corpus."""
    saved = os.path.join(run_dir, "tokenizer.json")
    if run_dir and os.path.isfile(saved):
        return get_tokenizer(saved, vocab_size=vocab_size)
    if config.data.task == "sft":  # the checkpoint's own tokenizer (dsv3.train.sft)
        spec = sft_tokenizer_spec(config)
        return get_tokenizer(spec, vocab_size=vocab_size) if spec is not None else None
    # the user's tokenizer, else a byte-level BPE trained (and cached) on the data, whatever its kind
    d = config.data
    return tokenizer_for_data(CorpusSpec.of(d), tokenizer=d.tokenizer, vocab_size=vocab_size)


def build_training_data(config: TrainConfig, tokenizer, mcfg: ModelConfig, run_dir: str | None = None):
    """The packed training and validation sequences of the run (checked: at least one micro-batch)."""
    if config.data.task == "sft":  # chat data, assistant-only loss, document-masked packing
        return build_sft_training_data(config, tokenizer, mcfg, run_dir)

    d = config.data
    data = build_data(
        CorpusSpec.of(d),
        tokenizer=tokenizer,
        seq_len=d.seq_len,
        vocab_size=mcfg.vocab_size,
        eos_token=d.eos_token,
        val_fraction=d.val_fraction,
        split_seed=config.run.seed,
    )
    if len(data.train) < d.micro_batch:
        raise DataError(
            f"the corpus gives {len(data.train)} training sequences of {d.seq_len} tokens, fewer "
            f"than one micro-batch ({config.data.micro_batch}); use more data or a smaller --seq-len"
        )
    return data


def moe_schedule(config: TrainConfig, mcfg: ModelConfig) -> MoESchedule:
    """gamma, alpha and lambda over the run: the run config's, else the model config.json's extension keys, else
    the report's (:meth:`MoESchedule.from_options`)."""
    return MoESchedule.from_options(config.moe, config.schedule.steps, mcfg.recipe())


# ----------------------------------------------------------------------------- the session
@dataclass
class Session:
    """Everything one training run steps with. Built by :func:`build_session`.

    ``parallel`` is the :class:`~dsv3.parallel.world.ParallelContext` (one process too) and ``optimizer``
    its :class:`~dsv3.parallel.zero.ZeroAdamW` (AdamW at dp = 1).
    ``moe`` gives each step's gamma, alpha and lambda (:class:`~dsv3.train.schedule.MoESchedule`).
    ``step`` counts completed optimizer steps; ``nonfinite`` the skipped steps in a row;
    ``val_losses`` the (step, loss) evaluations so far; ``checkpoint`` the checkpoint the run
    was restored from (None for a fresh run).
    """

    config: TrainConfig
    mcfg: ModelConfig
    run_dir: str
    device: torch.device
    tokenizer: Any
    data: Any
    model: torch.nn.Module
    optimizer: Any
    schedule: Any
    ramp: Any
    ema: Any
    loader: Any
    params: list[torch.nn.Parameter]
    prefetcher: BatchPrefetcher
    parallel: Any = None  # the ParallelContext (ParallelContext.single(device) for one process)
    pipeline: Any = None  # the PipelineRuntime when pp > 1 (dsv3.parallel.pipeline.train.build_pipeline)
    checkpointer: Any = None  # the run's Checkpointer (dsv3.parallel.checkpointer): every save and restore
    step: int = 0
    nonfinite: int = 0
    val_losses: list = field(default_factory=list)
    checkpoint: str | None = None
    moe: MoESchedule | None = None
    lock: Any = None  # the run directory's RunLock, held until close()

    def n_micro(self, step: int) -> int:
        """Micro-batches of optimizer step ``step`` (0-based; the batch ramp may change it)."""
        return self.ramp.accumulation_steps(step, self.config.data.micro_batch)

    def begin_step(self) -> tuple[float, float]:
        """Set the learning rate of step ``self.step``; returns ``(lr, gamma)`` (gamma: the step's bias update
        speed; :func:`~dsv3.train.step.train_step` takes the step's alpha and lambda from ``self.moe`` itself)."""
        lr = self.schedule.lr_at(self.step)
        set_lr(self.optimizer, lr)
        return lr, self.moe.at(self.step).gamma

    def next_batches(self) -> tuple[list[Batch], dict]:
        """The micro-batches of step ``self.step`` and the loader state before them."""
        following = self.n_micro(self.step + 1) if self.step + 1 < self.config.schedule.steps else None
        return self.prefetcher.get(self.n_micro(self.step), following)

    def close(self) -> None:
        try:
            self.prefetcher.drain()
            if self.ema is not None:
                self.ema.close()
        finally:
            if self.lock is not None:
                self.lock.release()


def build_session(
    config: TrainConfig | None,
    *,
    resume: str | None = None,
    overrides: dict[str, Any] | None = None,
    parallel: Any = None,
    write: bool = True,
    prefetch: bool | None = None,
) -> Session:
    """Build (or restore) a training run.

    Args:
        config: the run configuration (on resume only ``overrides`` apply to the saved one).
        resume: a run directory to continue from its latest checkpoint.
        overrides: on resume, options that change the saved config (e.g. ``steps``).
        parallel: a :class:`dsv3.parallel.world.ParallelContext` (None: the torchrun world described in the
            environment, or :meth:`~dsv3.parallel.world.ParallelContext.single` for one process).
        write: create the run directory and write its config, model config and tokenizer.
            ``False`` builds everything in memory (``dsv3 memory``); nothing is written
            except the tokenizer/token caches.
        prefetch: fetch batches ahead in a thread (default: on CUDA).

    Everything is checked before anything is written: bad input leaves no run directory.
    A run directory is locked (:class:`~dsv3.train.rundir.RunLock`) from here until
    :meth:`Session.close`; a second process training in it gets one line and exit 2.
    """
    # rank 0 holds the run's lock for all ranks (under torchrun the context is made later: read its env)
    owner = (parallel.rank if parallel is not None else int(os.environ.get("RANK", "0") or 0)) == 0
    lock = RunLock("", enabled=owner)  # not held until a run directory is known
    if resume is not None and write:
        lock.run_dir = prepare_run_dir(config, resume)
        lock.path = os.path.join(lock.run_dir, LOCK_FILE)
        lock.acquire()  # a second process resuming this run stops here
    try:
        return _build_session(
            config, resume=resume, overrides=overrides, parallel=parallel, write=write, prefetch=prefetch, lock=lock
        )
    except BaseException:
        lock.release()
        raise


def _build_session(
    config: TrainConfig | None,
    *,
    resume: str | None,
    overrides: dict[str, Any] | None,
    parallel: Any,
    write: bool,
    prefetch: bool | None,
    lock,
) -> Session:
    """The set-up in its phases (docs/architecture.md): check the configuration, join the world, build the
    data, build the model on meta, parallelize (which materialises the held tensors), write the run
    directory, restore."""
    config, run_dir, mcfg, device = check_configuration(config, resume, overrides or {}, write=write)
    if resume is None:
        config.run.dir = run_dir or config.run.dir
    if device.type == "cpu":  # host memory: freed gradients and buckets go back to the system (utils/malloc.py)
        fix_mmap_threshold()
    ctx, run_dir = _join_world(config, mcfg, parallel, run_dir, device)
    tokenizer, data = _build_data(config, mcfg, run_dir)
    model, init_from = build_meta(config, mcfg)
    par = parallelize(model, ctx, config, mcfg=mcfg, init_from=init_from, run_dir=run_dir)
    session = _assemble(config, mcfg, run_dir, ctx, tokenizer, data, par, lock)
    checkpoint = _write_run_dir(session, resume, write, lock)
    if resume is not None:
        _restore(session, checkpoint)
    session.prefetcher = BatchPrefetcher(session.loader, config.data.micro_batch, device, background=prefetch)
    return session


def _build_data(config: TrainConfig, mcfg: ModelConfig, run_dir: str) -> tuple[Any, Any]:
    """Phase 3: the tokenizer and the packed data (checked before anything is written, so bad input leaves no
    run behind); ``--epochs`` decides the number of steps here."""
    tokenizer = build_tokenizer(config, mcfg.vocab_size, run_dir)
    if tokenizer is not None and tokenizer.get_vocab_size() > mcfg.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model's vocab_size is "
            f"{mcfg.vocab_size}; use a matching tokenizer or model"
        )
    data = build_training_data(config, tokenizer, mcfg, run_dir)
    if config.data.epochs is not None:  # epochs decide the number of steps
        config.schedule.steps = max(1, -(-config.data.epochs * len(data.train) // config.data.global_batch))
    return tokenizer, data


def _assemble(config: TrainConfig, mcfg: ModelConfig, run_dir: str, ctx, tokenizer, data, par, lock) -> Session:
    """The :class:`Session` around the parallelized model: learning-rate schedule, batch ramp, this data-parallel
    rank's loader and the CPU EMA of the held parameters (built before anything is written: a bad value leaves
    no run behind)."""
    opt, sched, d = config.optimizer, config.schedule, config.data
    schedule = LRSchedule.from_options(sched, opt.lr)
    if sched.batch_ramp_start is not None:
        ramp = BatchRamp(
            start=sched.batch_ramp_start,
            end=d.global_batch,
            ramp_steps=sched.batch_ramp_steps,
            seq_len=d.seq_len,
            micro_batch=d.micro_batch,
        )
    else:
        ramp = BatchRamp.constant(d.global_batch, micro_batch=d.micro_batch, seq_len=d.seq_len)
    loader = data.loader(config.run.seed)
    if ctx.dp > 1:  # each dp rank reads only its micro-batches of every global batch
        loader.shard(ctx.dp, ctx.dp_rank)
    model = par.model
    ema = CPUEMA(model, config.memory.ema_decay) if config.memory.ema_decay else None
    return Session(
        config=config,
        mcfg=mcfg,
        run_dir=run_dir,
        device=ctx.device,
        tokenizer=tokenizer,
        data=data,
        model=model,
        optimizer=par.optimizer,
        schedule=schedule,
        ramp=ramp,
        ema=ema,
        loader=loader,
        params=[p for p in model.parameters() if p.requires_grad],
        prefetcher=None,  # type: ignore[arg-type]  (set last, after the loader is restored)
        parallel=ctx,
        pipeline=par.pipeline,
        moe=moe_schedule(config, mcfg),
        lock=lock,
        checkpointer=Checkpointer(run_dir, ctx, keep_last=config.checkpoint.keep_last, tokenizer=tokenizer),
    )


def _write_run_dir(session: Session, resume: str | None, write: bool, lock) -> str | None:
    """Phase 6: only now that the input is known to be good, rank 0 creates and locks the run directory, removes
    a killed run's temporaries and writes the config, model config, tokenizer (and chat template). Returns the
    checkpoint to resume from, of either format (None for a fresh run or none written)."""
    config, run_dir, checkpoint = session.config, session.run_dir, None
    if write and session.parallel.is_main:  # rank 0 alone writes the run directory
        if resume is None:
            try:
                os.makedirs(run_dir, exist_ok=True)
            except OSError as exc:
                raise RunDirError(
                    f"cannot create run directory {run_dir} ({exc.strerror or exc}); choose another --run-dir"
                ) from None
            lock.run_dir, lock.path = run_dir, os.path.join(run_dir, LOCK_FILE)
            lock.acquire()
        if lock.enabled:  # rank 0 (the lock owner) cleans up and chooses; the other ranks read
            for path in remove_stale_temporaries(run_dir):
                print(f"removed {path}, left by a killed run")
        if (
            resume is not None
        ):  # the newest intact checkpoint (either format); rank 0 says why when it is not the newest
            checkpoint = session.checkpointer.latest(select=lock.enabled)
        save_effective_config(config, os.path.join(run_dir, CONFIG_FILE))  # on resume with the overrides that apply
        if resume is None:
            _write_run_files(session)
    elif resume is not None:
        checkpoint = session.checkpointer.latest(hashes=session.parallel.distributed)
    session.lock = lock if lock.held else None
    return checkpoint


def _write_run_files(session: Session) -> None:
    """The model config, the tokenizer and (SFT) the chat template of a new run, for its resumption."""
    run_dir = session.run_dir
    session.mcfg.save(os.path.join(run_dir, MODEL_CONFIG_FILE))
    if session.tokenizer is not None:
        with atomic_path(os.path.join(run_dir, "tokenizer.json")) as tmp:
            session.tokenizer.save(tmp)
    if session.config.data.task == "sft":
        save_template(session.data.template, run_dir)  # a resumed run renders with the same template


def _restore(session: Session, checkpoint: str | None) -> None:
    """Phase 7: continue from the run's newest checkpoint, whichever layout wrote it
    (:meth:`~dsv3.parallel.checkpointer.Checkpointer.restore`: each rank reads only what it holds)."""
    restored = session.checkpointer.restore(session.model, session.optimizer, session.ema, checkpoint=checkpoint)
    if restored is not None:
        session.checkpoint, session.step, session.nonfinite = restored.checkpoint, restored.step, restored.nonfinite
        session.val_losses = restored.val_losses
        session.loader.load_state_dict(restored.loader)


def _join_world(
    config: TrainConfig, mcfg: ModelConfig, parallel: Any, run_dir: str, device: torch.device, check_split=None
) -> tuple[Any, str]:
    """Phase 2: join the torchrun world (when launched by it and no context is given; one process is
    :meth:`ParallelContext.single`) and agree on the run directory.

    The layout (pp x dp with ep inside dp; for ``pp > 1`` also the schedule's rules) is checked
    before any process group exists (a bad one fails alike on every rank);
    rank 0's run directory name is used by all (a default name carries a timestamp).
    ``check_split(config, dp)`` checks that a step's batch splits over the dp ranks (default
    :func:`_check_dp_split`; GRPO splits prompts, :func:`dsv3.train.grpo_run.check_prompt_split`).
    """
    p = config.parallel
    world = parallel.world_size if parallel is not None else int(os.environ.get("WORLD_SIZE", "1") or 1)
    if p.pp > 1:  # the pipeline's layout (layers, schedule, micro-batches, devices x dp): before any group
        _check_pipeline(config, mcfg, world)
    if parallel is None:
        parallel = (
            init_parallel(
                p.pp,
                p.dp,
                p.ep,
                n_routed_experts=mcfg.n_routed_experts,
                device=None if p.device == "auto" else p.device,
                schedule=p.pipeline,
            )
            if world > 1
            else ParallelContext.single(device)
        )
    if not parallel.distributed:
        return parallel, run_dir
    (check_split or _check_dp_split)(config, parallel.dp)
    box = [run_dir]
    dist.broadcast_object_list(box, src=0)
    config.run.dir = box[0] or config.run.dir
    return parallel, box[0]


def _check_pipeline(config: TrainConfig, mcfg: ModelConfig, world: int) -> None:
    """``--pp > 1``: the schedule's layout rules, and what the pipeline does not run yet (SFT, the batch ramp)."""
    p, d = config.parallel, config.data
    check_pipeline_layout(
        mcfg.num_hidden_layers,
        pp=p.pp,
        schedule=p.pipeline,
        global_batch=d.global_batch,
        micro_batch=d.micro_batch,
        world_size=world,
        dp=p.dp,
        ep=p.ep,
        n_routed_experts=mcfg.n_routed_experts,
    )
    if d.task == "sft":
        raise ConfigError("--pp > 1 does not run SFT (document-masked) batches yet; use --pp 1")
    if config.schedule.batch_ramp_start is not None:  # every step's micro-batches must fit the schedule
        raise ConfigError("--pp > 1 does not support the batch-size ramp yet; drop --batch-ramp-start")


def _check_dp_split(config: TrainConfig, dp: int) -> None:
    """Every step's micro-batches (the batch ramp's too) must split evenly over the ``dp`` ranks."""
    d = config.data
    n_micro = d.global_batch // d.micro_batch
    if n_micro % dp:
        raise ConfigError(
            f"global_batch / micro_batch = {n_micro} micro-batches cannot be split over dp "
            f"{dp} ranks; make global_batch a multiple of micro_batch * dp"
        )
    if config.schedule.batch_ramp_start is not None:  # every ramp step's micro-batches must split over dp too
        ramp = BatchRamp(
            start=config.schedule.batch_ramp_start,
            end=d.global_batch,
            micro_batch=d.micro_batch,
            ramp_steps=config.schedule.batch_ramp_steps,
            seq_len=d.seq_len,
        )
        bad = next((s for s in range(ramp.ramp_steps + 1) if ramp.accumulation_steps(s) % dp), None)
        if bad is not None:
            raise ConfigError(
                f"the batch ramp gives step {bad + 1} {ramp.accumulation_steps(bad)} micro-batches, "
                f"which cannot be split over dp {dp} ranks; make --batch-ramp-start and the "
                f"ramp's batches multiples of micro_batch * dp"
            )
