"""A training session and one optimizer step: :func:`build_session` and :func:`train_step`.

:func:`build_session` assembles a run from a :class:`~dsv3.train.config.TrainConfig` in phases,
each a short function (docs/architecture.md):

1. check the configuration (:func:`_check_configuration`: config, run directory, device, model
   config, context length, the per-rank memory pre-check);
2. join the world (:func:`_join_world`: the torchrun world or ``ParallelContext.single``);
3. build the data (:func:`_build_data`: tokenizer, packed sequences);
4. build the model on the ``meta`` device (:func:`build_meta`);
5. :func:`~dsv3.parallel.parallelize.parallelize`: FP8, recomputation, expert sharding, stage
   selection, materialisation of the held tensors only, the ZeRO-1 optimizer;
6. write the run directory (:func:`_write_run_dir`, rank 0, only once all input is known good);
7. restore (:func:`_restore`: a checkpoint of any layout).

:func:`train_step` runs one optimizer step over a list of micro-batches, the same for every layout:

1. forward and backward of this rank's micro-batches (``loss / n_micro``; under ``--pp`` the
   pipeline schedule), summing the losses and the expert loads on the device -- no host
   synchronisation per micro-batch;
2. the sums and loads over dp, the ZeRO-1 gradient reduction and the global norm; one host
   sync reads the losses and the norm together;
3. a non-finite loss or norm skips the step (gradients dropped);
4. AdamW with clipping, the auxiliary-loss-free bias update with the loads of all micro-batches, the EMA.

The loop around them (:func:`dsv3.train.loop.train`) does metrics, evaluation and
checkpoints; ``dsv3 memory`` (:mod:`dsv3.memory.measure`) steps the same session.
On CUDA the next step's micro-batches are prefetched into pinned memory by a background
thread (:class:`BatchPrefetcher`) while the current step computes.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from dsv3.checkpoint.checkpointer import Checkpointer
from dsv3.config import ModelConfig, resolve_model_config
from dsv3.errors import ConfigError, DataError, RunDirError
from dsv3.train.config import TrainConfig, load_train_config, save_effective_config
from dsv3.train.schedule import MoESchedule, MoEStep
from dsv3.utils.malloc import fix_mmap_threshold

CONFIG_FILE = "config.yaml"
MODEL_CONFIG_FILE = "model_config.json"

Batch = tuple[torch.Tensor, torch.Tensor]  # (input_ids [b, T], labels [b, T])


# ----------------------------------------------------------------------------- building blocks
def resolve_device(config: TrainConfig) -> torch.device:
    """The run's device: ``auto`` is CUDA when available, else CPU."""
    if config.parallel.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config.parallel.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but no CUDA device is available; use --device cpu")
    return torch.device(config.parallel.device)


def prepare_run_dir(config: TrainConfig, resume: str | None) -> str:
    """Pick and check the run directory (``resume``, or a new or empty ``config.run.dir``)."""
    if resume is not None:
        if not os.path.isfile(os.path.join(resume, CONFIG_FILE)):
            raise RunDirError(f"{resume} is not a dsv3 run directory (no {CONFIG_FILE}); check --resume")
        return resume
    run_dir = config.run.dir or config.default_run_dir()
    if os.path.exists(run_dir):
        if not os.path.isdir(run_dir):
            raise RunDirError(f"run directory {run_dir} exists and is not a directory; choose another --run-dir")
        if os.listdir(run_dir):
            if os.path.isfile(os.path.join(run_dir, CONFIG_FILE)):
                raise RunDirError(
                    f"run directory {run_dir} already holds a run; continue it with --resume {run_dir} "
                    f"or choose another --run-dir"
                )
            raise RunDirError(f"run directory {run_dir} is not empty and holds no dsv3 run; choose another --run-dir")
    return run_dir


def resume_config(run_dir: str, overrides: dict[str, Any]) -> TrainConfig:
    """The saved config of ``run_dir`` with ``overrides`` (e.g. a larger ``steps``) applied."""
    config = load_train_config(os.path.join(run_dir, CONFIG_FILE), overrides)
    config.run.dir = run_dir
    return config


def model_config_for(config: TrainConfig) -> ModelConfig:
    """The model configuration of the run (YaRN context extension applied when the run asks for it)."""
    mcfg = resolve_model_config(config.model.init_from or config.model.name)
    if config.model.rope_scaling == "yarn":  # context extension (report 4.3): the official rope_scaling form
        from dsv3.model.rope import extend_context

        mcfg = extend_context(mcfg, config.model.rope_factor, config.data.seq_len)
    return mcfg


def build_meta(config: TrainConfig, mcfg: ModelConfig, *, mtp: bool = True):
    """The model of the run on the ``meta`` device (phase 4: shapes, no storage) and the resolved
    ``--init-from`` checkpoint directory (None without one). Without MTP weights in the checkpoint
    the model is built without MTP modules (``model.config`` becomes ``mcfg`` when initialised);
    ``mtp=False`` builds none at all (GRPO and the reward model train the main model only)."""
    from dsv3.parallel.parallelize import build_meta_model

    init_from = None
    build_cfg = mcfg
    if config.model.init_from:
        from dsv3.checkpoint.hf import resolve_pretrained

        init_from, ckpt_cfg, _ = resolve_pretrained(config.model.init_from)  # checked here, before anything is written
        build_cfg = mcfg.replace(num_nextn_predict_layers=ckpt_cfg.num_nextn_predict_layers)
    if not mtp:
        build_cfg = build_cfg.replace(num_nextn_predict_layers=0)
    return build_meta_model(build_cfg, config.run.seed), init_from


def build_tokenizer(config: TrainConfig, vocab_size: int, run_dir: str):
    """The run's tokenizer: the run directory's copy on resume, the user's, or a BPE trained on the corpus."""
    from dsv3.train.tokenizer import get_tokenizer, tokenizer_for_data

    saved = os.path.join(run_dir, "tokenizer.json")
    if run_dir and os.path.isfile(saved):
        return get_tokenizer(saved, vocab_size=vocab_size)
    if config.data.task == "sft":  # the checkpoint's own tokenizer (dsv3.train.sft)
        from dsv3.train.sft import sft_tokenizer_spec

        spec = sft_tokenizer_spec(config)
        return get_tokenizer(spec, vocab_size=vocab_size) if spec is not None else None
    # the user's tokenizer, else a byte-level BPE trained (and cached) on the data, whatever its kind
    d = config.data
    return tokenizer_for_data(
        d.path, tokenizer=d.tokenizer, vocab_size=vocab_size, format=d.format, field=d.field, glob=d.glob
    )


def build_training_data(config: TrainConfig, tokenizer, mcfg: ModelConfig, run_dir: str | None = None):
    """The packed training and validation sequences of the run (checked: at least one micro-batch)."""
    from dsv3.train.data import build_data

    if config.data.task == "sft":  # chat data, assistant-only loss, document-masked packing
        from dsv3.train.sft import build_sft_training_data

        return build_sft_training_data(config, tokenizer, mcfg, run_dir)

    d = config.data
    data = build_data(
        d.path,
        tokenizer=tokenizer,
        seq_len=d.seq_len,
        vocab_size=mcfg.vocab_size,
        format=d.format,
        field=d.field,
        glob=d.glob,
        dtype=d.dtype,
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


# ----------------------------------------------------------------------------- prefetching
class BatchPrefetcher:
    """Hands out each step's micro-batches, on CUDA fetching the next step's in a background thread.

    Args:
        loader: the :class:`~dsv3.train.data.TrainLoader` (its order decides the batches).
        micro_batch: sequences per micro-batch.
        device: where the batches go; on CUDA they are pinned and copied asynchronously.
        background: fetch ahead in a thread (default: only on CUDA).

    :meth:`get` returns ``(micro-batches of one step, loader state before them)``; ``state_after``
    is the loader position right after the last step handed out (what a checkpoint records),
    whatever has been fetched ahead.
    """

    def __init__(self, loader, micro_batch: int, device: torch.device, *, background: bool | None = None) -> None:
        self.loader, self.micro_batch, self.device = loader, micro_batch, device
        self.background = device.type == "cuda" if background is None else background
        self._pending: tuple[int, queue.Queue] | None = None
        self.state_after: dict = loader.state_dict()
        self.sequences_after: int = loader.sequences_seen

    def _fetch(self, n_micro: int) -> tuple[list[Batch], dict]:
        from dsv3.train.sft import batch_to

        state = self.loader.state_dict()
        pin = self.device.type == "cuda"
        batches = []
        for batch in self.loader.next_batches(n_micro, self.micro_batch):  # this dp rank's part (all in one process)
            if not isinstance(batch, tuple):  # an SFT batch (with document-mask ids)
                batches.append(batch_to(batch, None, pin=pin))
                continue
            ids, labels = batch
            if pin:
                ids, labels = ids.pin_memory(), labels.pin_memory()
            batches.append((ids, labels))
        return batches, state

    def _start(self, n_micro: int) -> None:
        box: queue.Queue = queue.Queue(maxsize=1)

        def work() -> None:
            try:
                box.put(self._fetch(n_micro))
            except BaseException as exc:  # re-raised in the training thread
                box.put(exc)

        threading.Thread(target=work, name="dsv3-prefetch", daemon=True).start()
        self._pending = (n_micro, box)

    def get(self, n_micro: int, next_n_micro: int | None = None) -> tuple[list[Batch], dict]:
        """This step's ``n_micro`` micro-batches (on the device) and the loader state before them;
        starts fetching ``next_n_micro`` for the next step when prefetching."""
        if self._pending is not None and self._pending[0] == n_micro:
            got = self._pending[1].get()
            if isinstance(got, BaseException):
                raise got
            batches, state = got
        else:
            self.drain()
            batches, state = self._fetch(n_micro)
        self._pending = None
        self.state_after = self.loader.state_dict()
        self.sequences_after = self.loader.sequences_seen
        if self.background and next_n_micro:
            self._start(next_n_micro)
        from dsv3.train.sft import batch_to

        nb = self.device.type == "cuda"
        return [batch_to(b, self.device, non_blocking=nb) for b in batches], state

    def drain(self) -> None:
        """Wait for and drop a fetch in flight, putting the loader back where the next step starts."""
        if self._pending is not None:
            self._pending[1].get()
            self._pending = None
            self.loader.load_state_dict(self.state_after)


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
    checkpointer: Any = None  # the run's Checkpointer (dsv3.checkpoint.checkpointer): every save and restore
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
        speed; :func:`train_step` takes the step's alpha and lambda from ``self.moe`` itself)."""
        from dsv3.train.optim import set_lr

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
    from dsv3.train.rundir import LOCK_FILE, RunLock

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
    from dsv3.parallel.parallelize import parallelize

    config, run_dir, mcfg, device = _check_configuration(config, resume, overrides, write)
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


def _check_configuration(
    config: TrainConfig | None, resume: str | None, overrides: dict[str, Any] | None, write: bool
) -> tuple[TrainConfig, str, ModelConfig, torch.device]:
    """Phase 1: the configuration (the saved one on resume, with the allowed overrides), the run directory,
    the device, the model configuration, the context length and the per-rank memory pre-check; nothing is
    allocated or written."""
    from dsv3.train.preflight import check_context_length, check_memory, check_trace, refuse_frozen_overrides
    from dsv3.train.rundir import check_run_dir_usable

    if resume is not None:
        run_dir = prepare_run_dir(config, resume)  # type: ignore[arg-type]
        saved = resume_config(run_dir, {})
        config = resume_config(run_dir, overrides or {})
        refuse_frozen_overrides(saved, config, overrides or {})  # --model, --seq-len, ... cannot change
    else:
        assert config is not None
        config.validate()
        run_dir = prepare_run_dir(config, None) if write else ""
        config.run.dir = run_dir or config.run.dir
        if write:
            check_run_dir_usable(run_dir)  # under a file, unwritable, read-only: said now, not after the set-up
    check_trace(config, overrides or {}, resume)  # --trace without a pipeline records nothing: refused
    device = resolve_device(config)
    if config.parallel.dispatcher == "deepep":  # refused here, before anything is written, on any layout
        from dsv3.parallel.deepep import check_deepep

        check_deepep(device)
    saved_model_config = os.path.join(run_dir, MODEL_CONFIG_FILE)
    if resume is not None and os.path.isfile(saved_model_config):
        mcfg = ModelConfig.from_json_file(saved_model_config)  # exactly the model the run started with
    else:
        mcfg = model_config_for(config)
    check_context_length(config.data.seq_len, mcfg, config.model.rope_scaling)
    check_memory(mcfg, config, device=device.type)  # the planner's per-rank estimate, before any allocation
    return config, run_dir, mcfg, device


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
    from dsv3.memory.ema import CPUEMA
    from dsv3.train.schedule import BatchRamp, LRSchedule

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
    from dsv3.checkpoint.state import remove_stale_temporaries
    from dsv3.train.rundir import LOCK_FILE

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
        from dsv3.utils.io import atomic_path

        with atomic_path(os.path.join(run_dir, "tokenizer.json")) as tmp:
            session.tokenizer.save(tmp)
    if session.config.data.task == "sft":
        from dsv3.train.sft import save_template

        save_template(session.data.template, run_dir)  # a resumed run renders with the same template


def _restore(session: Session, checkpoint: str | None) -> None:
    """Phase 7: continue from the run's newest checkpoint, whichever layout wrote it
    (:meth:`~dsv3.checkpoint.checkpointer.Checkpointer.restore`: each rank reads only what it holds)."""
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
    from dsv3.parallel.world import ParallelContext, init_parallel

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
    import torch.distributed as dist

    box = [run_dir]
    dist.broadcast_object_list(box, src=0)
    config.run.dir = box[0] or config.run.dir
    return parallel, box[0]


def _check_pipeline(config: TrainConfig, mcfg: ModelConfig, world: int) -> None:
    """``--pp > 1``: the schedule's layout rules, and what the pipeline does not run yet (SFT, the batch ramp)."""
    from dsv3.parallel.pipeline.train import check_pipeline_layout

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
        from dsv3.train.schedule import BatchRamp

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


def _dp_slice(session: "Session", batches: list[Batch]) -> list[Batch]:
    """This data-parallel rank's micro-batches: every dp-th of the global batch's (a disjoint part);
    ``batches`` as they are when the loader already handed out only this rank's (:meth:`TrainLoader.shard`)."""
    ctx = session.parallel
    if ctx.dp == 1 or getattr(session.loader, "dp", 1) > 1:
        return batches
    return batches[ctx.dp_rank :: ctx.dp]


# ----------------------------------------------------------------------------- one step
@dataclass
class StepStats:
    """What one optimizer step reports.

    Attributes:
        loss: total loss (L_Main + lambda/D sum L_MTP + L_Bal), mean over micro-batches.
        lm_loss / mtp_loss / balance_loss: its parts.
        grad_norm: global gradient norm before clipping.
        skipped: the loss or the norm was not finite; no update was made.
        load: [n_moe_layers, N_r] tokens routed to each expert over all micro-batches (None: dense).
        tokens: input tokens of the step; loss_tokens: tokens that carried a label.
    """

    loss: float
    lm_loss: float
    mtp_loss: float
    balance_loss: float
    grad_norm: float
    skipped: bool
    load: torch.Tensor | None
    tokens: int
    loss_tokens: int


def train_step(session: Session, batches: list[Batch], *, gamma: float | None = None) -> StepStats:
    """One optimizer step of ``session`` over ``batches`` (its micro-batches, on the device).

    Backpropagates ``loss / n_micro`` per micro-batch (or, under pipeline parallelism, runs them
    through the schedule); the loss parts, label counts and expert loads are summed on the device
    and read once, with the gradient norm, after the last micro-batch. The step's lambda and alpha reach
    the loss as arguments (``session.moe.at(session.step)``); ``gamma`` is the bias update speed (default:
    the step's).
    """
    batches = _dp_slice(session, batches)
    hp = session.moe.at(session.step)
    gamma = hp.gamma if gamma is None else gamma
    if session.pipeline is not None:  # pipeline parallelism: the schedule runs the micro-batches
        sums, load, tokens = _pipeline_pass(session, batches, hp)
    else:
        sums, load, tokens = _micro_batch_pass(session, batches, hp)
    return _update(session, sums, load, tokens, gamma)


def _micro_batch_pass(
    session: Session, batches: list[Batch], hp: MoEStep
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Forward and backward of this rank's micro-batches, one after the other, with the step's lambda and alpha
    ``hp``.

    Returns ``sums`` [5] float64 on the device (loss, lm, mtp, balance: means over the micro-batches;
    labelled tokens), the summed expert ``load`` [n_moe_layers, N_r] (None: dense) and the input tokens.
    """
    from dsv3.train.sft import split_batch

    ctx, model, n_micro = session.parallel, session.model, len(batches)
    sums = torch.zeros(5, dtype=torch.float64, device=session.device)
    load = None
    split = [split_batch(b) for b in batches]
    weights = None
    if any(extra for _, _, extra in split):
        # SFT: micro-batches hold different numbers of assistant tokens; weight each by its share
        # of the step's loss tokens, so the step's loss is the mean over all of them (on the device).
        counts = torch.stack([(labels != -100).sum() for _, labels, _ in split]).double()
        weights = counts / counts.sum().clamp(min=1)
        if ctx.dp > 1:
            # shares of the whole global batch's tokens (gradients are averaged over dp)
            from dsv3.parallel.zero import all_mean

            weights = counts / all_mean(counts.sum().reshape(1), ctx)[0].clamp(min=1e-9)
    for i, (ids, labels, extra) in enumerate(split):
        out = model(ids, labels, mtp_loss_weight=hp.mtp_loss_weight, seq_aux_alpha=hp.seq_aux_alpha, **extra)
        parts = torch.stack(
            [out.loss.detach(), out.lm_loss.detach(), out.mtp_loss.detach(), out.balance_loss.detach()]
        ).double()
        if weights is None:
            (out.loss / n_micro).backward()
            sums[:4] += parts / n_micro
        else:
            (out.loss * weights[i].to(out.loss.dtype)).backward()
            sums[:4] += parts * weights[i]
        sums[4] += (labels != -100).sum()
        if out.expert_load is not None:
            load = out.expert_load if load is None else load + out.expert_load
    return sums, load, sum(ids.numel() for ids, _, _ in split)


def _pipeline_pass(
    session: Session, batches: list[Batch], hp: MoEStep
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """:func:`_micro_batch_pass` under pipeline parallelism (see :mod:`dsv3.parallel.pipeline.train`):
    the runtime runs this pipeline's micro-batches through the schedule; losses and loads come back
    reduced over the pipeline and the gradients of shared parameters all-reduced."""
    from dsv3.parallel.pipeline.train import set_loss_weights, write_step_trace

    rt = session.pipeline
    set_loss_weights(rt, hp.mtp_loss_weight, hp.seq_aux_alpha)
    res = rt.step(batches)
    if rt.trace_path:
        write_step_trace(rt.trace_path, rt, res)
    loss_tokens = sum(int((labels != -100).sum()) for _, labels in batches)
    sums = torch.tensor(
        [res.loss, res.lm_loss, res.mtp_loss, res.balance_loss, float(loss_tokens)], dtype=torch.float64
    )
    return sums, res.load, sum(ids.numel() for ids, _ in batches)


def _update(session: Session, sums: torch.Tensor, load: torch.Tensor | None, tokens: int, gamma: float) -> StepStats:
    """The rest of :func:`train_step` after the backward passes, the same for every layout: the sums and loads
    over dp and the ZeRO-1 gradient reduction and norm (the same on every rank; nothing to communicate with
    dp = 1); the one host sync; the NaN skip; AdamW with clipping, the bias update with the step's loads, and
    the EMA (under pipeline parallelism of the held stages only)."""
    import math

    from dsv3.parallel.zero import all_mean, sync_loads

    ctx, optimizer, clip = session.parallel, session.optimizer, session.config.optimizer.grad_clip
    sums = all_mean(sums, ctx)  # global sums over the dp ranks
    sums[4] *= ctx.dp
    if load is not None:
        load = sync_loads(load, ctx)
    optimizer.reduce_gradients()
    grad_norm = optimizer.grad_norm()
    host = torch.cat([sums, grad_norm.detach().double().reshape(1).to(sums.device)]).tolist()  # the one sync
    loss, lm_loss, mtp_loss, balance_loss, loss_tokens, norm = host
    skipped = not (math.isfinite(loss) and math.isfinite(norm))
    if not skipped:
        optimizer.step(clip, reduce=False, norm=grad_norm)
        if load is not None:
            session.model.update_router_bias(load, gamma)
    optimizer.zero_grad(set_to_none=True)
    if not skipped and session.ema is not None:
        session.ema.update()
    return StepStats(
        loss=loss,
        lm_loss=lm_loss,
        mtp_loss=mtp_loss,
        balance_loss=balance_loss,
        grad_norm=norm,
        skipped=skipped,
        load=load,
        tokens=tokens * ctx.dp,
        loss_tokens=int(loss_tokens),
    )
