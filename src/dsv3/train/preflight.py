"""Checks a training run passes before it writes or allocates anything.

Each function raises one :class:`~dsv3.errors.DsV3Error` sentence (the CLI prints it and exits with
code 2). They are cheap: arithmetic over the configs, a ``statvfs``, a planner estimate.

- :func:`check_configuration`: phase 1 of the set-up (and ``dsv3 train --print-config``): the config, the
  run directory, the device (:func:`resolve_device`), the model config (:func:`model_config_for`), then
  ``--trace``, DeepEP and the checks below;
- :func:`refuse_frozen_overrides`: ``--resume`` with a flag that would change the model or its data
  (``--model``, ``--init-from``, ``--seq-len``, ...), which a resumed run cannot honour;
- :func:`check_context_length`: ``seq_len`` beyond ``max_position_embeddings`` without a RoPE extension;
- :func:`estimate_training_bytes` / :func:`check_memory`: the planner's estimate of the busiest rank's
  training state and activations for the run's layout (``dsv3 plan``'s per-rank numbers) against the
  device's memory, or on CPU the host's memory against the node's ranks together.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from dsv3.config import ModelConfig, resolve_model_config
from dsv3.errors import ConfigError
from dsv3.layout import SCHEDULES, pipeline_devices
from dsv3.model.rope import extend_context
from dsv3.parallel.deepep import check_deepep
from dsv3.plan.layout import Layout
from dsv3.plan.planner import make_plan
from dsv3.plan.precision import Precision, canonical_dtype
from dsv3.train.config import TrainConfig, options
from dsv3.train.rundir import MODEL_CONFIG_FILE, check_run_dir_usable, prepare_run_dir, resume_config
from dsv3.train.schedule import MoESchedule

# Options of a run that fix the model, its weights or the token stream; a resume cannot change them.
FROZEN_ON_RESUME = (
    "model",
    "init_from",
    "tokenizer",
    "data",
    "data_format",
    "data_field",
    "data_glob",
    "data_dtype",
    "eos_token",
    "seq_len",
    "val_fraction",
    "seed",
    "dtype",
    "rope_scaling",
    "rope_factor",
    "task",
    "packing",
    "fp8",
    "recompute",
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def refuse_frozen_overrides(saved: Any, resumed: Any, overrides: dict[str, Any]) -> None:
    """Refuse ``--resume`` flags that change the model or the data of the saved run.

    Args:
        saved: the run's saved TrainConfig (as written at its start).
        resumed: the same config with ``overrides`` applied.
        overrides: the options given on the command line (name -> value).

    A flag that repeats the saved value is accepted; ``--run-dir`` is always refused
    (the run directory is the one given to ``--resume``).
    """
    overrides = {_flat_name(k): v for k, v in overrides.items() if v is not None}
    if "run_dir" in overrides and os.path.abspath(str(overrides["run_dir"])) != os.path.abspath(
        str(config_value(saved, "run_dir") or "")
    ):
        raise ConfigError("--run-dir cannot be combined with --resume (the run directory is the one being resumed)")
    changed = [
        name
        for name in FROZEN_ON_RESUME
        if name in overrides and config_value(resumed, name) != config_value(saved, name)
    ]
    if changed:
        flags = ", ".join(_flag(n) for n in changed)
        raise ConfigError(
            f"{flags} cannot change on --resume: a resumed run keeps the model, weights and data it "
            f"started with; start a new run (--init-from a checkpoint of this one) to change "
            f"{'it' if len(changed) == 1 else 'them'}"
        )


def _flat_name(key: str) -> str:
    """``optimizer.lr`` -> ``lr`` (the flag name); a flat name as it is."""
    if "." not in key:
        return key

    return next((opt.flat for opt in options() if f"{opt.section}.{opt.name}" == key), key)


def config_value(config: Any, name: str) -> Any:
    """The option ``name`` (its flag name, e.g. ``seq_len``, ``run_dir``) of a TrainConfig, flat or sectioned."""
    if hasattr(config, "to_flat_dict"):
        flat = config.to_flat_dict()
        if name in flat:
            return flat[name]
    return getattr(config, name, None)


def check_context_length(seq_len: int, mcfg, rope_scaling: str | None = None) -> None:
    """Refuse ``seq_len`` > ``max_position_embeddings`` unless a RoPE extension (YaRN) is asked for.

    Args:
        seq_len: T of the run.
        mcfg: the ModelConfig.
        rope_scaling: the run's ``rope_scaling`` option ("none" or "yarn"; None = "none").
    """
    if seq_len > mcfg.max_position_embeddings and (rope_scaling or "none") == "none":
        raise ConfigError(
            f"seq_len {seq_len} exceeds the model's max_position_embeddings "
            f"({mcfg.max_position_embeddings}); use --seq-len {mcfg.max_position_embeddings} or less, "
            f"or extend the context with --rope-scaling yarn"
        )


def estimate_training_bytes(
    mcfg,
    *,
    seq_len: int,
    micro_batch: int,
    dtype: str = "float32",
    optim_states: str = "fp32",
    recompute: str = "none",
    fp8: bool = False,
    ema: bool = False,
    pp: int = 1,
    dp: int = 1,
    ep: int = 1,
    schedule: str = SCHEDULES[0],
    global_batch: int | None = None,
    balance_loss: bool = True,
) -> float:
    """The planner's peak-memory estimate (bytes) of the busiest rank of a ``pp x dp`` (``ep`` inside dp) layout.

    Weights and gradients of the rank's stages and expert block in ``dtype``, its ZeRO-1 chunks of the AdamW
    state (moments in ``optim_states``, FP32 masters for non-FP32 weights), the activations its schedule keeps
    in flight (micro-batches of ``micro_batch`` x ``seq_len``; ``global_batch`` sets the micro-batches per step
    under a pipeline), plus the FP32 EMA copy of its parameters when ``ema`` (host memory). See
    :mod:`dsv3.plan.memory` for the model; one process is ``pp = dp = ep = 1``.
    """
    width = canonical_dtype(dtype)  # float32 -> fp32, bfloat16 -> bf16
    precision = Precision(
        weights=width,
        grads=width,
        master="none" if width == "fp32" else "fp32",
        moments="bf16" if optim_states == "bf16" else "fp32",
        activations=width,
    )
    layout = Layout(
        pp=pp,
        dp=dp,
        ep=ep,
        schedule=schedule if pp > 1 else SCHEDULES[0],
        seq_len=seq_len,
        micro_batch=micro_batch,
        global_batch=global_batch if pp > 1 and global_batch else micro_batch * dp,
        recompute=recompute,
        fp8=fp8,
        mtp=mcfg.num_nextn_predict_layers > 0,
        balance_loss=balance_loss,
    )
    plan = make_plan(mcfg, layout, precision, simulate=False)
    if not ema:
        return float(plan.peak_device_bytes)
    # the CPU EMA keeps an FP32 copy of the parameters a rank holds (host memory)
    return float(max(d.total + 4.0 * d.params for d in plan.devices))


def run_layout(config, world_size: int | None = None) -> dict:
    """The layout keywords of :func:`estimate_training_bytes` for a TrainConfig launched on ``world_size``
    processes (default: torchrun's ``WORLD_SIZE``, 1 without it); ``dp`` defaults to what the world leaves."""
    p = config.parallel
    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return {}
    devices = pipeline_devices(p.pp, p.pipeline) if p.pp > 1 else p.pp
    dp = p.dp if p.dp is not None else max(1, world // max(1, devices))
    return dict(pp=p.pp, dp=dp, ep=p.ep, schedule=p.pipeline, global_batch=config.data.global_batch)


def host_memory_bytes() -> int | None:
    """Physical memory of this machine (bytes), or None where it cannot be read."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.0f} MiB"


def check_memory(
    mcfg,
    config=None,
    *,
    device: str,
    seq_len: int | None = None,
    micro_batch: int | None = None,
    dtype: str = "float32",
    optim_states: str = "fp32",
    recompute: str = "none",
    fp8: bool = False,
    ema: bool = False,
    available: int | None = None,
    layout: dict | None = None,
    ranks_per_node: int | None = None,
    balance_loss: bool = True,
) -> float:
    """Refuse a run whose busiest rank needs more memory than its device (or, on CPU, its share of the host) has.

    Args:
        config: a TrainConfig, whose data, precision, memory and parallel options (and torchrun's world:
            :func:`run_layout`) give every other argument; or None and the keywords.
        device: "cpu" or "cuda" (or "cuda:N").
        available: the memory to compare with (bytes); default: physical host memory on
            CPU, the device's total memory on CUDA.
        layout: ``pp``/``dp``/``ep``/``schedule``/``global_batch`` (default: one process).
        ranks_per_node: processes sharing one host's memory on CPU (default: torchrun's
            ``LOCAL_WORLD_SIZE``, else 1); on CUDA each rank has its own device.

    Returns:
        The estimate in bytes (per rank; on CPU times the ranks of the node).
    """
    if config is not None:
        d, m, prec = config.data, config.memory, config.precision
        seq_len, micro_batch, dtype, fp8 = d.seq_len, d.micro_batch, prec.dtype, prec.fp8
        optim_states, recompute, ema = m.optim_states, m.recompute, bool(m.ema_decay)
        layout = run_layout(config) if layout is None else layout
        balance_loss = MoESchedule.from_options(config.moe, 1, mcfg.recipe()).seq_aux_alpha > 0
    layout = layout or {}
    kw = dict(
        balance_loss=balance_loss,
        seq_len=seq_len,
        micro_batch=micro_batch,
        dtype=dtype,
        optim_states=optim_states,
        recompute=recompute,
        fp8=fp8,
        ema=ema,
    )
    try:
        per_rank = estimate_training_bytes(mcfg, **kw, **layout)
    except ConfigError:  # a layout the planner does not model (the runtime checks its own rules): the whole model
        per_rank = estimate_training_bytes(mcfg, **kw)
    cuda = str(device).startswith("cuda")
    if ranks_per_node is None:
        ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1) if layout else 1
    ranks = 1 if cuda else max(1, ranks_per_node)
    need = per_rank * ranks
    where = "host memory"
    if available is None:
        if cuda:
            index = torch.device(device).index or 0
            available = torch.cuda.get_device_properties(index).total_memory
            where = f"{torch.cuda.get_device_name(index)} memory"
        else:
            available = host_memory_bytes()
    if available is not None and need > available:
        share = f"{ranks} ranks x {_gib(per_rank)} of the busiest rank" if ranks > 1 else _gib(need)
        raise ConfigError(
            f"training this model needs about {share} (planner estimate: weights, gradients, "
            f"AdamW moments and {micro_batch} x {seq_len} activations per micro-batch) but the "
            f"{where} is {_gib(available)}; use a smaller model, --micro-batch or --seq-len, or plan a "
            f"parallel layout with dsv3 plan"
        )
    return need


def check_trace(config: Any, overrides: dict[str, Any], resume: str | None) -> None:
    """Refuse ``--trace`` on a run without a pipeline (it would record nothing and say nothing).

    On ``--resume`` only a ``--trace`` given now is refused: a pipeline run's saved ``trace`` stays quiet when
    it is continued in a layout without a pipeline."""
    asked = bool(overrides.get("trace")) if resume is not None else config.parallel.trace
    if asked and config.parallel.pp < 2:
        raise ConfigError(
            "--trace records the pipeline runtime's timeline and needs a pipeline (--pp 2 or more "
            "under torchrun); drop --trace"
        )


def resolve_device(config: TrainConfig) -> torch.device:
    """The run's device: ``auto`` is CUDA when available, else CPU."""
    if config.parallel.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config.parallel.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but no CUDA device is available; use --device cpu")
    return torch.device(config.parallel.device)


def model_config_for(config: TrainConfig) -> ModelConfig:
    """The model configuration of the run (YaRN context extension applied when the run asks for it)."""
    mcfg = resolve_model_config(config.model.init_from or config.model.name)
    if config.model.rope_scaling == "yarn":  # context extension (report 4.3): the official rope_scaling form
        mcfg = extend_context(mcfg, config.model.rope_factor, config.data.seq_len)
    return mcfg


def check_configuration(
    config: TrainConfig | None, resume: str | None, overrides: dict[str, Any], *, write: bool = True
) -> tuple[TrainConfig, str, ModelConfig, torch.device]:
    """Phase 1 of the set-up: every check a run makes before it reads data or builds the model, writing nothing.

    Returns the effective TrainConfig (on resume the saved one with ``overrides``; model-changing ones are
    refused), the run directory (new or empty, not under a file, writable; on resume a dsv3 run; ``""``
    for a new run with ``write`` False), the model config (on resume the one the run started with) and the
    device. Then checks ``--trace``, DeepEP, the context length and the planner's per-rank memory estimate.
    """
    if resume is not None:
        run_dir = prepare_run_dir(config, resume)  # type: ignore[arg-type]
        config = resume_config(run_dir, overrides)
        refuse_frozen_overrides(resume_config(run_dir, {}), config, overrides)
    else:
        assert config is not None
        config.validate()
        run_dir = prepare_run_dir(config, None) if write else ""
        if write:
            check_run_dir_usable(run_dir)  # under a file, unwritable, read-only: said now, not after the set-up
    check_trace(config, overrides, resume)  # --trace without a pipeline records nothing: refused
    device = resolve_device(config)
    if config.parallel.dispatcher == "deepep":  # refused here, before anything is written, on any layout
        check_deepep(device)
    saved = os.path.join(run_dir, MODEL_CONFIG_FILE)
    if resume is not None and os.path.isfile(saved):
        mcfg = ModelConfig.from_json_file(saved)  # exactly the model the run started with
    else:
        mcfg = model_config_for(config)
    check_context_length(config.data.seq_len, mcfg, config.model.rope_scaling)
    check_memory(mcfg, config, device=device.type)  # the planner's per-rank estimate, before any allocation
    return config, run_dir, mcfg, device


def check_run_config(config: Any, *, resume: str | None, overrides: dict[str, Any]) -> Any:
    """:func:`check_configuration` for ``dsv3 train --print-config``: returns the effective TrainConfig (printed
    only when every check passes)."""
    return check_configuration(config, resume, overrides)[0]
