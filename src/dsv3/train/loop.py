"""The training loop: from the data to the loss, one optimizer step at a time.

Read :func:`train` top to bottom: it sets up the run (tokenizer, data, model,
optimizer, schedules), optionally restores a checkpoint, then for each step

1. sets the learning rate, the MTP weight lambda and the bias speed gamma of the step;
2. runs ``global_batch / micro_batch`` micro-batches (the batch-size ramp may change
   that number), backpropagating ``loss / n_micro`` and summing the expert loads;
3. skips the step if the loss or gradient norm is not finite (NaN/inf);
4. clips the gradient norm, steps AdamW, applies the auxiliary-loss-free bias update
   with the loads of all of the step's micro-batches, updates the CPU EMA;
5. logs metrics, validates, checkpoints.

Ctrl-C finishes the current step, writes a checkpoint and stops; a second
Ctrl-C stops at once. A checkpoint is a complete, atomically renamed directory,
so ``dsv3 train --resume RUN_DIR`` always continues from a consistent state and
(on CPU) reproduces the per-step losses of an uninterrupted run bit for bit.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from dsv3.checkpoint.state import load_checkpoint_state, save_checkpoint
from dsv3.config import ModelConfig, resolve_model_config
from dsv3.errors import ConfigError, DataError, RunDirError, TrainingError
from dsv3.train.config import TrainConfig, load_train_config, save_effective_config

CONFIG_FILE = "config.yaml"


@dataclass
class TrainResult:
    """What a finished (or stopped) run reports."""

    run_dir: str
    step: int
    checkpoint: str | None
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    sample: str | None = None
    interrupted: bool = False
    wall_time: float = 0.0


# ----------------------------------------------------------------------------- set-up helpers
def _device(config: TrainConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but no CUDA device is available; use --device cpu")
    return torch.device(config.device)


def prepare_run_dir(config: TrainConfig, resume: str | None) -> tuple[TrainConfig, str]:
    """Pick and check the run directory; on resume, return the run's saved config (with overrides)."""
    if resume is not None:
        path = os.path.join(resume, CONFIG_FILE)
        if not os.path.isfile(path):
            raise RunDirError(f"{resume} is not a dsv3 run directory (no {CONFIG_FILE}); check --resume")
        return config, resume
    run_dir = config.run_dir or config.default_run_dir()
    if os.path.exists(run_dir):
        if not os.path.isdir(run_dir):
            raise RunDirError(f"run directory {run_dir} exists and is not a directory; choose another --run-dir")
        if os.listdir(run_dir):
            if os.path.isfile(os.path.join(run_dir, CONFIG_FILE)):
                raise RunDirError(f"run directory {run_dir} already holds a run; continue it with --resume {run_dir} "
                                  f"or choose another --run-dir")
            raise RunDirError(f"run directory {run_dir} is not empty and holds no dsv3 run; choose another --run-dir")
    return config, run_dir


def resume_config(run_dir: str, overrides: dict[str, Any]) -> TrainConfig:
    """The saved config of ``run_dir`` with ``overrides`` (e.g. a larger ``steps``) applied."""
    config = load_train_config(os.path.join(run_dir, CONFIG_FILE), overrides)
    config.run_dir = run_dir
    return config


def model_config_for(config: TrainConfig) -> ModelConfig:
    """The model configuration of the run, with the recipe knobs of the train config applied."""
    source = config.init_from or config.model
    mcfg = resolve_model_config(source)
    changes = {k: getattr(config, k) for k in ("bias_update_speed", "seq_aux_alpha", "mtp_loss_weight")
               if getattr(config, k) is not None}
    return mcfg.replace(**changes) if changes else mcfg


def build_model(config: TrainConfig, mcfg: ModelConfig, device: torch.device):
    """Build (or load) the model and apply the configured transformations (FP8, recomputation)."""
    from dsv3.model import DeepseekV3ForCausalLM

    torch.manual_seed(config.seed)
    if config.init_from:
        from dsv3.checkpoint.hf import from_pretrained

        model = from_pretrained(config.init_from, device=device)
        model.config = mcfg
    else:
        with torch.device(device):
            model = DeepseekV3ForCausalLM(mcfg)
    model.to(getattr(torch, config.dtype))
    if config.fp8:
        from dsv3.fp8 import FP8Recipe, convert

        convert(model, FP8Recipe(backend=config.fp8_backend, scale_format=config.fp8_scale_format,
                                 fp8_gemm=config.fp8_gemm))
    if config.recompute != "none":
        from dsv3.memory.recompute import apply_recompute

        apply_recompute(model, config.recompute)
    return model


def build_tokenizer(config: TrainConfig, vocab_size: int, run_dir: str):
    """The run's tokenizer: the run directory's copy on resume, the user's, or a BPE trained on the corpus."""
    from dsv3.train.tokenizer import get_tokenizer, tokenizer_for_data

    saved = os.path.join(run_dir, "tokenizer.json")
    if os.path.isfile(saved):
        return get_tokenizer(saved, vocab_size=vocab_size)
    # the user's tokenizer, else a byte-level BPE trained (cached) on the data, whatever its kind
    return tokenizer_for_data(config.data, tokenizer=config.tokenizer, vocab_size=vocab_size,
                              format=config.data_format, field=config.data_field, glob=config.data_glob)


@torch.no_grad()
def evaluate(model, data, *, micro_batch: int, max_batches: int, device: torch.device) -> float:
    """Token-weighted mean main-model loss over the held-out sequences."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for ids, labels in data.val_batches(micro_batch, max_batches):
            ids, labels = ids.to(device), labels.to(device)
            out = model(ids, labels)
            n = int((labels != -100).sum())
            total += float(out.lm_loss) * n
            count += n
    finally:
        model.train(was_training)
    return total / max(count, 1)


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


def _switch(value_early: float, value_late: float | None, at: float, step: int, steps: int) -> float:
    """``value_early`` before fraction ``at`` of the run, ``value_late`` (if set) after."""
    return value_early if value_late is None or step < at * steps else value_late


# ----------------------------------------------------------------------------- the loop
def train(config: TrainConfig, *, resume: str | None = None, overrides: dict[str, Any] | None = None,
          log: Callable[[str], None] = print, step_hook: Callable[[int], None] | None = None) -> TrainResult:
    """See :func:`_train`; the run directory's lock is released however it ends."""
    with contextlib.ExitStack() as cleanup:
        return _train(config, resume=resume, overrides=overrides, log=log, step_hook=step_hook, cleanup=cleanup)


def _train(config: TrainConfig, *, resume: str | None = None, overrides: dict[str, Any] | None = None,
           log: Callable[[str], None] = print, step_hook: Callable[[int], None] | None = None,
           cleanup: contextlib.ExitStack) -> TrainResult:
    """Train according to ``config`` (or continue the run directory ``resume``).

    Args:
        config: the run configuration (ignored except for ``overrides`` when resuming).
        resume: a run directory to continue from its latest checkpoint.
        overrides: on resume, options that change the saved config (e.g. ``steps``).
        log: where human-readable lines go.
        step_hook: called with the completed step number after each step (tests use it
            to interrupt a run at a chosen step).
    """
    from dsv3.memory.ema import CPUEMA
    from dsv3.train.data import build_data
    from dsv3.train.metrics import MetricsLogger, ProgressBar, maxvio
    from dsv3.train.optim import build_optimizer, clip_grad_norm, set_lr
    from dsv3.train.schedule import BatchRamp, LRSchedule

    from dsv3.checkpoint.state import remove_stale_temporaries, select_resume_checkpoint
    from dsv3.train.preflight import check_context_length, check_memory, refuse_frozen_overrides
    from dsv3.train.rundir import RunLock, check_run_dir_usable

    started = time.time()
    if resume is not None:
        _, run_dir = prepare_run_dir(config, resume)
        cleanup.enter_context(RunLock(run_dir))  # a second process resuming this run stops here
        saved = resume_config(run_dir, {})
        config = resume_config(run_dir, overrides or {})
        refuse_frozen_overrides(saved, config, overrides or {})
    else:
        config.validate()
        config, run_dir = prepare_run_dir(config, None)
        config.run_dir = run_dir
        check_run_dir_usable(run_dir)
    device = _device(config)
    saved_model_config = os.path.join(run_dir, "model_config.json")
    if resume is not None and os.path.isfile(saved_model_config):
        mcfg = ModelConfig.from_json_file(saved_model_config)  # exactly the model the run started with
    else:
        mcfg = model_config_for(config)
    check_context_length(config.seq_len, mcfg, getattr(config, "rope_scaling", None))
    check_memory(mcfg, device=device.type, seq_len=config.seq_len, micro_batch=config.micro_batch,
                 dtype=config.dtype, optim_states=config.optim_states, recompute=config.recompute, fp8=config.fp8,
                 ema=bool(config.ema_decay))
    lambda_early, gamma_early = mcfg.mtp_loss_weight, mcfg.bias_update_speed

    # --- tokenizer and data (checked before anything is written, so bad input leaves no run behind)
    tokenizer = build_tokenizer(config, mcfg.vocab_size, run_dir)
    if tokenizer is not None and tokenizer.get_vocab_size() > mcfg.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model's vocab_size is "
                          f"{mcfg.vocab_size}; use a matching tokenizer or model")
    data = build_data(config.data, tokenizer=tokenizer, seq_len=config.seq_len, vocab_size=mcfg.vocab_size,
                      format=config.data_format, field=config.data_field, glob=config.data_glob,
                      dtype=config.data_dtype, eos_token=config.eos_token, val_fraction=config.val_fraction,
                      split_seed=config.seed)
    if len(data.train) < config.micro_batch:
        raise DataError(f"the corpus gives {len(data.train)} training sequences of {config.seq_len} tokens, fewer "
                        f"than one micro-batch ({config.micro_batch}); use more data or a smaller --seq-len")

    # --- the model (an --init-from checkpoint is checked here, before anything is written)
    model = build_model(config, mcfg, device)
    model.train()
    # --- optimizer and schedules (built before anything is written: a bad value leaves no run directory)
    optimizer = build_optimizer(model, lr=config.lr, betas=(config.beta1, config.beta2),
                                weight_decay=config.weight_decay, eps=config.eps, moments_dtype=config.optim_states)
    decay_start = int(config.decay_start * config.steps)
    decay_steps = int(config.decay_end * config.steps) - decay_start
    schedule = LRSchedule(peak_lr=config.lr, warmup_steps=min(config.warmup_steps, decay_start),
                          decay_start=decay_start, decay_steps=decay_steps, min_lr=config.min_lr,
                          final_lr=config.final_lr, final_steps=config.final_steps, total_steps=config.steps)
    if config.batch_ramp_start is not None:
        ramp = BatchRamp(start=config.batch_ramp_start, end=config.global_batch, ramp_steps=config.batch_ramp_steps,
                         seq_len=config.seq_len, micro_batch=config.micro_batch)
    else:
        ramp = BatchRamp.constant(config.global_batch, micro_batch=config.micro_batch, seq_len=config.seq_len)
    loader = data.loader(config.seed)
    # --- the run directory: lock, config, tokenizer (only now that the input is known to be good)
    if resume is None:
        try:
            os.makedirs(run_dir, exist_ok=True)
        except OSError as exc:
            raise RunDirError(f"cannot create run directory {run_dir} ({exc.strerror or exc}); "
                              f"choose another --run-dir") from None
        cleanup.enter_context(RunLock(run_dir))
    removed = remove_stale_temporaries(run_dir)
    if removed:
        log(f"removed {len(removed)} temporary file(s) left in {run_dir} by a killed run")
    checkpoint = select_resume_checkpoint(run_dir, log) if resume is not None else None
    save_effective_config(config, os.path.join(run_dir, CONFIG_FILE))  # on resume: with the overrides applied
    if resume is None:
        mcfg.save(os.path.join(run_dir, "model_config.json"))
        if tokenizer is not None:
            from dsv3.utils.io import atomic_path

            with atomic_path(os.path.join(run_dir, "tokenizer.json")) as tmp:
                tokenizer.save(tmp)

    ema = CPUEMA(model, config.ema_decay) if config.ema_decay else None

    step, nonfinite, val_losses = 0, 0, []
    if checkpoint is not None:
        state = load_checkpoint_state(checkpoint, model=model, optimizer=optimizer, ema=ema)
        step = state["step"]
        loader.load_state_dict(state["loader"])
        nonfinite = state["extra"].get("nonfinite", 0)
        val_losses = [tuple(v) for v in state["extra"].get("val_losses", [])]
        log(f"resumed {run_dir} from {os.path.basename(checkpoint)} (step {step})")
    elif resume is not None:
        log(f"{run_dir} has no checkpoint yet; starting it from step 0")

    log(f"run {run_dir}: {mcfg.model_type} with {model.num_parameters():,} parameters on {device}; "
        f"{data.summary()}")
    metrics = MetricsLogger(run_dir, tensorboard=config.tensorboard, start_step=step)
    progress = ProgressBar(config.steps, initial=step, mode="auto" if config.progress else "off")
    params = [p for p in model.parameters() if p.requires_grad]
    last_ckpt = checkpoint
    interrupted = False

    def checkpoint_now(at_step: int, loader_state: dict) -> str:
        return save_checkpoint(run_dir, at_step, model=model, optimizer=optimizer, loader_state=loader_state,
                               tokenizer=tokenizer, ema=ema, keep_last=config.keep_last,
                               extra={"nonfinite": nonfinite, "val_losses": val_losses})

    try:
        with _StopFlag() as stop:
            if step == 0 and not val_losses and data.val is not None:
                val_losses.append((0, evaluate(model, data, micro_batch=config.micro_batch,
                                               max_batches=config.eval_batches, device=device)))
                metrics.log({"step": 0, "val_loss": val_losses[-1][1]})
            while step < config.steps:
                t0 = time.perf_counter()
                loader_state = loader.state_dict()  # the position at the start of this step
                lr = schedule.lr_at(step)
                set_lr(optimizer, lr)
                model.config.mtp_loss_weight = _switch(lambda_early, config.mtp_loss_weight_late, config.mtp_switch,
                                                       step, config.steps)
                gamma = _switch(gamma_early, 0.0, config.bias_update_stop, step, config.steps)
                n_micro = ramp.accumulation_steps(step, config.micro_batch)
                sums = torch.zeros(4, dtype=torch.float64)
                load = None
                tokens = 0
                for _ in range(n_micro):
                    ids, labels = loader.next_batch(config.micro_batch)
                    ids, labels = ids.to(device), labels.to(device)
                    out = model(ids, labels)
                    (out.loss / n_micro).backward()
                    sums += torch.stack([out.loss.detach(), out.lm_loss.detach(), out.mtp_loss.detach(),
                                         out.balance_loss.detach()]).double().cpu() / n_micro
                    if out.expert_load is not None:
                        load = out.expert_load if load is None else load + out.expert_load
                    tokens += ids.numel()
                loss, lm_loss, mtp_loss, balance_loss = sums.tolist()
                grad_norm = clip_grad_norm(params, config.grad_clip)
                record: dict[str, Any] = {"step": step + 1, "lr": lr, "batch_size": n_micro * config.micro_batch}
                if not (math.isfinite(loss) and torch.isfinite(grad_norm)):
                    optimizer.zero_grad(set_to_none=True)
                    nonfinite += 1
                    record.update(loss=loss, skipped=True)
                    metrics.log(record)
                    log(f"step {step + 1}: non-finite loss or gradient ({loss}); step skipped "
                        f"({nonfinite} in a row)")
                    step += 1
                    if nonfinite >= config.max_nonfinite:
                        raise TrainingError(
                            f"{nonfinite} non-finite losses in a row at step {step}; stopping. The last good "
                            f"checkpoint is {last_ckpt or 'none (no checkpoint was written yet)'}; lower --lr or "
                            f"check the data")
                    continue
                nonfinite = 0
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if load is not None:
                    model.update_router_bias(load, gamma)
                if ema is not None:
                    ema.update()
                step += 1
                dt = time.perf_counter() - t0
                record.update(loss=loss, lm_loss=lm_loss, mtp_loss=mtp_loss, balance_loss=balance_loss,
                              grad_norm=float(grad_norm), tokens_per_s=tokens / dt, step_time=dt,
                              tokens=loader.sequences_seen * config.seq_len,
                              maxvio=maxvio(load) if load is not None else 0.0)
                if load is not None and (step % config.load_every == 0 or step == 1):
                    record["expert_load"] = load.tolist()
                if data.val is not None and (step % config.eval_every == 0 or step == config.steps):
                    if ema is not None and config.use_ema:
                        with ema.applied(model):
                            v = evaluate(model, data, micro_batch=config.micro_batch,
                                         max_batches=config.eval_batches, device=device)
                    else:
                        v = evaluate(model, data, micro_batch=config.micro_batch,
                                     max_batches=config.eval_batches, device=device)
                    val_losses.append((step, v))
                    record["val_loss"] = v
                metrics.log(record)
                progress.update(step, loss=loss, tokens_per_s=tokens / dt, lr=lr, lm_loss=lm_loss)
                if "val_loss" in record:
                    progress.write(f"step {step}: val_loss {record['val_loss']:.4f} (LM loss on held-out data; "
                                   f"compare with lm_loss)")
                if step % config.save_every == 0 or step == config.steps or stop.requested:
                    last_ckpt = checkpoint_now(step, loader.state_dict())
                if step_hook is not None:
                    step_hook(step)
                if stop.requested:
                    interrupted = True
                    log(f"interrupted ({stop.signal_name}): checkpoint written at step {step} ({last_ckpt}); "
                        f"continue with dsv3 train --resume {run_dir}")
                    break
    finally:
        progress.close()
        metrics.close()
        if ema is not None:
            ema.close()

    sample = None
    if tokenizer is not None and not interrupted and config.sample_tokens > 0:
        from dsv3.infer.generate import generate_text
        from dsv3.train.tokenizer import eos_token_id

        sample = generate_text(model, tokenizer, config.sample_prompt, max_new_tokens=config.sample_tokens,
                               temperature=0.8, top_p=0.95, seed=config.seed, eos_id=eos_token_id(tokenizer))
    return TrainResult(run_dir=run_dir, step=step, checkpoint=last_ckpt, val_losses=val_losses, sample=sample,
                       interrupted=interrupted, wall_time=time.time() - started)
