"""The training-run configuration: typed dataclasses in sections, read from YAML/TOML, every field a flag.

:class:`TrainConfig` groups the options in sections as torchtitan does (model, data, optimizer, schedule,
moe, precision, memory, parallel, checkpoint, logging, run, rl); code reads ``config.optimizer.lr``.
Every field also has a flat name (``lr``, ``data_format`` for ``data.format``, ``model`` for
``model.name``): the command-line flag (``--lr``) and the key of flat run files. Run files may be
sectioned or flat (the format of run directories written before the sections existed); both give the
same configuration, and :func:`save_effective_config` writes the sectioned form. Choices are
``Literal`` types, each spelled once: the parallel layout's and the FP8 recipe's in :mod:`dsv3.layout`,
the rest here; the CLI's allowed values and the validation read them from these. Defaults train the
``tiny`` preset on the Python standard library in a few minutes on 2 CPU cores; report (arXiv
2412.19437, section 4.2) values are noted where they differ. Retired option: ``log_every`` (flat files
that still carry it load, and the value is ignored). The field index, the flat conversion and the file
reading live in :mod:`dsv3.train.run_file`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any, Literal

from dsv3.errors import ConfigError
from dsv3.layout import Dispatcher, FP8Backend, FP8ScaleFormat, PipelineSchedule, RecomputeMode
from dsv3.train.run_file import RETIRED_OPTIONS, Option, coerce, field_index, flatten, read_run_file, suggest
from dsv3.utils.io import atomic_write_text

__all__ = [
    "TrainConfig",
    "ModelOptions",
    "DataOptions",
    "OptimizerOptions",
    "ScheduleOptions",
    "MoEOptions",
    "PrecisionOptions",
    "MemoryOptions",
    "ParallelOptions",
    "CheckpointOptions",
    "LoggingOptions",
    "RunOptions",
    "OptimStates",
    "ParamDtype",
    "DeviceName",
    "DataFormat",
    "TokenDtype",
    "DataTask",
    "GRPOLossType",
    "RewardScaling",
    "RLOptions",
    "OnLong",
    "RopeScaling",
    "Option",
    "options",
    "flat_options",
    "load_train_config",
    "read_run_file",
    "save_effective_config",
    "config_yaml",
    "suggest",
    "RETIRED_OPTIONS",
]

# ----------------------------------------------------------------------------- the choices, spelled once
# (the parallel layout's and the FP8 recipe's are in dsv3.layout)
OptimStates = Literal["fp32", "bf16"]
"""Precision of the AdamW moments."""
ParamDtype = Literal["float32", "bfloat16"]
"""Parameter dtype."""
DeviceName = Literal["auto", "cpu", "cuda"]
"""Where to train; auto = CUDA when available."""
DataFormat = Literal["text", "jsonl", "parquet", "bin"]
"""Forced corpus format (default: from the file suffix)."""
TokenDtype = Literal["uint16", "uint32"]
"""Token-id width of a pre-tokenised .bin corpus."""
DataTask = Literal["pretrain", "sft", "grpo", "reward"]
"""Pre-training on raw text, supervised fine-tuning on chat data, GRPO on prompts (:mod:`dsv3.train.grpo`),
or a reward model on preference pairs (:mod:`dsv3.train.reward_model`)."""
GRPOLossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
"""How GRPO aggregates its per-token losses (each as defined by TRL; see docs/rl.md)."""
RewardScaling = Literal["group", "batch", "none"]
"""What GRPO divides the group-centred rewards by: the group's std, the batch's std, or nothing."""
OnLong = Literal["skip", "truncate", "error"]
"""What to do with an SFT example longer than seq_len."""
RopeScaling = Literal["none", "yarn"]
"""RoPE context extension."""


def _opt(default: Any, help: str, *, flag: str | None = None) -> Any:
    """A config field: its default, a one-line description, and its flat name when it differs from the field's."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag})


# ----------------------------------------------------------------------------- the sections
@dataclass
class ModelOptions:
    """What to train."""

    name: str = _opt("tiny", "preset name, config.json path, or model directory", flag="model")
    init_from: str | None = _opt(None, "Hugging Face checkpoint directory to start from (weights and config)")
    rope_scaling: RopeScaling = _opt("none", "RoPE context extension for this run (yarn: YaRN, with rope_factor)")
    rope_factor: float = _opt(1.0, "context-extension factor s of YaRN (target length / original length)")


@dataclass
class DataOptions:
    """The corpus, its tokenizer and how it is cut into batches."""

    path: str | None = _opt(
        None, "text file/dir, .jsonl, .parquet or .bin; none: the Python standard library", flag="data"
    )
    format: DataFormat | None = _opt(None, "force the corpus format (none: from the file suffix)", flag="data_format")
    field: str = _opt("text", "the .jsonl field / .parquet column holding the text", flag="data_field")
    glob: str | None = _opt(None, "file pattern inside a data directory", flag="data_glob")
    dtype: TokenDtype | None = _opt(
        None, "token-id width of a .bin corpus (none: from the vocabulary size)", flag="data_dtype"
    )
    eos_token: str | None = _opt(None, "the document separator's text (none: found in the tokenizer)")
    tokenizer: str | None = _opt(None, "a tokenizer.json; none: a byte-level BPE trained on the corpus (cached)")
    val_fraction: float = _opt(0.01, "fraction of the documents held out for validation")
    seq_len: int = _opt(256, "tokens per training sequence")
    micro_batch: int = _opt(8, "sequences per forward/backward pass")
    global_batch: int = _opt(8, "sequences per optimizer step (gradient accumulation = global / micro)")
    task: DataTask = _opt(
        "pretrain",
        "pretrain on raw text, sft on chat examples, grpo on prompts with rewards, "
        "or reward: a reward model on prompt/chosen/rejected pairs",
    )
    on_long: OnLong = _opt("skip", "SFT examples longer than seq_len: skip, truncate, or error")
    epochs: int | None = _opt(None, "passes over the data (none: as many as the steps need)")
    packing: bool = _opt(True, "pack several documents into one sequence")
    chat_template: str | None = _opt(
        None, "SFT chat template (.jinja or tokenizer_config.json; none: the checkpoint's own)"
    )


@dataclass
class OptimizerOptions:
    """AdamW (report: betas (0.9, 0.95), weight decay 0.1, clipping 1.0, peak lr 2.2e-4)."""

    lr: float = _opt(2e-3, "peak learning rate")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.95, "AdamW beta2")
    eps: float = _opt(1e-8, "AdamW epsilon")
    weight_decay: float = _opt(0.1, "decoupled weight decay")
    grad_clip: float = _opt(1.0, "gradient-norm clipping threshold (0: no clipping)")


@dataclass
class ScheduleOptions:
    """Run length, the learning-rate schedule and the batch-size ramp (report: 2K warm-up steps)."""

    steps: int = _opt(300, "optimizer steps of the run")
    warmup_steps: int = _opt(30, "linear warm-up steps to the peak lr")
    min_lr: float = _opt(2e-4, "learning rate at the end of the cosine decay")
    decay_start: float = _opt(0.5, "fraction of the run at which cosine decay starts")
    decay_end: float = _opt(0.95, "fraction at which it reaches min_lr (constant tail after)")
    final_lr: float | None = _opt(None, "learning rate of the last final_steps steps (report: 7.3e-6)")
    final_steps: int = _opt(0, "steps at final_lr at the end of the run")
    batch_ramp_start: int | None = _opt(
        None, "global batch at step 0, ramped to global_batch (report: 3072 -> 15360 over 469B tokens)"
    )
    batch_ramp_steps: int = _opt(0, "steps over which the global batch ramps up")


@dataclass
class MoEOptions:
    """The report's training hyperparameters gamma, alpha, lambda: the trainer owns them (the model's forward takes
    alpha and lambda as arguments, :class:`~dsv3.train.schedule.MoESchedule` gives each step's values). None: the
    model config.json's dsv3 extension key when it has one, else the report's value (``dsv3.config.RECIPE_DEFAULTS``).
    """

    bias_update_speed: float | None = _opt(
        None, "gamma, aux-loss-free bias update speed (report 0.001; Megatron --moe-router-bias-update-rate)"
    )
    bias_update_stop: float = _opt(1.0, "fraction of the run after which gamma is 0 (report: last 500B tokens)")
    seq_aux_alpha: float | None = _opt(
        None,
        "alpha, sequence-wise balance loss weight (report 0.0001; Megatron --moe-aux-loss-coeff with "
        "--moe-router-load-balancing-type seq_aux_loss)",
    )
    mtp_loss_weight: float | None = _opt(
        None, "lambda, MTP loss weight (report 0.3; Megatron --mtp-loss-scaling-factor)"
    )
    mtp_loss_weight_late: float | None = _opt(None, "lambda after mtp_switch (report 0.1; none: unchanged)")
    mtp_switch: float = _opt(0.68, "fraction of the run after which lambda = mtp_loss_weight_late")


@dataclass
class PrecisionOptions:
    """Parameter dtype and the FP8 recipe."""

    dtype: ParamDtype = _opt("float32", "parameter dtype")
    fp8: bool = _opt(False, "train with the DeepSeek-V3 FP8 recipe (1x128 / 128x128 tiles, E4M3)")
    fp8_backend: FP8Backend = _opt("auto", "FP8 GEMMs: auto (real on Hopper, emulated elsewhere), emulated, cuda")
    fp8_scale_format: FP8ScaleFormat = _opt("fp32", "FP8 scales: fp32, or ue8m0 (powers of two for every operand)")
    fp8_gemm: bool = _opt(True, "false: FP8 activation storage only, GEMMs in the parameter precision")


@dataclass
class MemoryOptions:
    """Memory savings: recomputation, EMA, optimizer-state precision."""

    recompute: RecomputeMode = _opt("none", "recompute activations in backward: none, selective ops, or full blocks")
    optim_states: OptimStates = _opt("fp32", "precision of the AdamW moments")
    ema_decay: float | None = _opt(None, "keep an EMA of the weights in host memory with this decay (none: off)")
    use_ema: bool = _opt(False, "validate with the EMA weights (needs ema_decay)")


@dataclass
class ParallelOptions:
    """Device and distributed layout (launch with torchrun for more than one process)."""

    device: DeviceName = _opt("auto", "device to train on (auto: CUDA when available)")
    pp: int = _opt(1, "pipeline-parallel stages (DualPipeV puts two on each device)")
    dp: int | None = _opt(None, "data-parallel size (none: world size / pipeline devices; --ep divides it)")
    ep: int = _opt(1, "expert-parallel size")
    pipeline: PipelineSchedule = _opt("1f1b", "pipeline schedule")
    dispatcher: Dispatcher = _opt("auto", "MoE token dispatcher")
    trace: bool = _opt(False, "record a timeline trace of the parallel runtime")


@dataclass
class CheckpointOptions:
    """When checkpoints are written and how many are kept."""

    save_every: int = _opt(100, "write a checkpoint every N steps (and at the end)")
    keep_last: int = _opt(2, "checkpoints to keep (older ones are deleted)")


@dataclass
class LoggingOptions:
    """Evaluation, metrics and progress output."""

    eval_every: int = _opt(50, "validate every N steps (and at the end)")
    eval_batches: int = _opt(8, "micro-batches per validation")
    load_every: int = _opt(10, "log per-expert loads every N steps")
    sample_prompt: str = _opt("def ", "prompt of the text sample printed at the end")
    sample_tokens: int = _opt(80, "tokens of that sample (0: no sample)")
    tensorboard: bool = _opt(True, "also write TensorBoard event files")
    progress: bool = _opt(True, "show a progress bar")


@dataclass
class RunOptions:
    """Where the run lives and what makes it reproducible."""

    dir: str | None = _opt(
        None,
        "run directory, new or empty (none: runs/<model>-<time>); nothing in it is "
        "replaced: continue a run with --resume",
        flag="run_dir",
    )
    seed: int = _opt(0, "seed of initialisation, data order and sampling")
    max_nonfinite: int = _opt(5, "stop after this many non-finite losses in a row")


@dataclass
class RLOptions:
    """GRPO (--task grpo): rewards, sampling and the objective (DeepSeekMath defaults). With task grpo,
    global_batch and micro_batch count completions (a multiple of group_size)."""

    reward: str | None = _opt(
        None,
        "reward functions, comma-separated or a repeated flag: math, code, format, module:function or path.py:function",
    )
    reward_weights: str | None = _opt(None, "weights of the reward functions, comma-separated (none: 1 each)")
    reward_model: str | None = _opt(None, "a reward-model run directory (dsv3 train --task reward) scoring too")
    group_size: int = _opt(4, "G, completions sampled per prompt (>= 2; the baseline is their mean)")
    temperature: float = _opt(1.0, "sampling temperature of the rollouts")
    top_p: float = _opt(1.0, "nucleus sampling threshold of the rollouts")
    max_completion_tokens: int = _opt(64, "completion length limit (longer ones are cut and count as cut)")
    grpo_iterations: int = _opt(1, "mu, policy updates per rollout batch (old log-probs when > 1)")
    beta: float = _opt(0.04, "weight of the k3 KL to the frozen reference model (0: no reference is built)")
    epsilon_low: float = _opt(0.2, "the ratio is clipped below at 1 - epsilon_low")
    epsilon_high: float = _opt(0.2, "the ratio is clipped above at 1 + epsilon_high (DAPO: 0.28)")
    loss_type: GRPOLossType = _opt("grpo", "loss aggregation: grpo (DeepSeekMath), bnpo, dr_grpo, dapo")
    scale_rewards: RewardScaling = _opt("group", "divide centred rewards by the group std, the batch std, or not")
    routing_replay: bool = _opt(False, "train with the experts the rollout chose (MoE routing replay)")
    rl_bias_update: bool = _opt(
        False,
        "apply the aux-loss-free bias update during GRPO (off: routing stays "
        "the rollout's between steps; see docs/rl.md)",
    )


def _section(cls: type) -> Any:
    return dataclasses.field(default_factory=cls, metadata={"help": cls.__doc__})


@dataclass
class TrainConfig:
    """A training run: one dataclass per section."""

    model: ModelOptions = _section(ModelOptions)
    data: DataOptions = _section(DataOptions)
    optimizer: OptimizerOptions = _section(OptimizerOptions)
    schedule: ScheduleOptions = _section(ScheduleOptions)
    moe: MoEOptions = _section(MoEOptions)
    precision: PrecisionOptions = _section(PrecisionOptions)
    memory: MemoryOptions = _section(MemoryOptions)
    parallel: ParallelOptions = _section(ParallelOptions)
    checkpoint: CheckpointOptions = _section(CheckpointOptions)
    logging: LoggingOptions = _section(LoggingOptions)
    run: RunOptions = _section(RunOptions)
    rl: RLOptions = _section(RLOptions)

    # ------------------------------------------------------------------ validation
    def validate(self) -> "TrainConfig":
        """Check types, choices and ranges (normalising ``"1e-3"`` to ``0.001``, ``3.0`` to ``3``);
        raise :class:`ConfigError` with one sentence on the first problem."""

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for opt in options():
            section = getattr(self, opt.section)
            value = coerce(opt, getattr(section, opt.name), "config")
            need(
                opt.kind is not float or value is None or math.isfinite(value),
                f"{opt.flat} must be a finite number, got {value}",
            )
            setattr(section, opt.name, value)
        d, o, s, m, r = self.data, self.optimizer, self.schedule, self.memory, self.run
        for name, value in (
            ("seq_len", d.seq_len),
            ("micro_batch", d.micro_batch),
            ("global_batch", d.global_batch),
            ("steps", s.steps),
            ("eval_every", self.logging.eval_every),
            ("eval_batches", self.logging.eval_batches),
            ("save_every", self.checkpoint.save_every),
            ("keep_last", self.checkpoint.keep_last),
            ("load_every", self.logging.load_every),
            ("max_nonfinite", r.max_nonfinite),
            ("pp", self.parallel.pp),
            ("ep", self.parallel.ep),
        ):
            need(value > 0, f"{name} must be positive, got {value}")
        for name, value in (("dp", self.parallel.dp), ("epochs", d.epochs)):
            need(value is None or value > 0, f"{name} must be positive, got {value}")
        need(
            d.global_batch % d.micro_batch == 0,
            f"global_batch ({d.global_batch}) must be a multiple of micro_batch ({d.micro_batch})",
        )
        if s.batch_ramp_start is not None:
            need(
                0 < s.batch_ramp_start <= d.global_batch,
                f"batch_ramp_start ({s.batch_ramp_start}) must be between 1 and global_batch",
            )
        need(
            s.warmup_steps >= 0 and s.final_steps >= 0 and s.batch_ramp_steps >= 0,
            "warmup_steps, final_steps and batch_ramp_steps must be non-negative",
        )
        need(o.lr > 0 and s.min_lr >= 0, "lr must be positive and min_lr non-negative")
        need(0 <= s.decay_start <= s.decay_end <= 1, "need 0 <= decay_start <= decay_end <= 1")
        need(0 <= d.val_fraction < 1, f"val_fraction must be in [0, 1), got {d.val_fraction}")
        need(m.ema_decay is None or 0 < m.ema_decay < 1, f"ema_decay must be in (0, 1), got {m.ema_decay}")
        need(not m.use_ema or m.ema_decay is not None, "use_ema needs ema_decay")
        need(o.grad_clip >= 0 and o.weight_decay >= 0, "grad_clip and weight_decay must be non-negative")
        need(self.model.rope_factor >= 1, f"rope_factor must be at least 1, got {self.model.rope_factor}")
        need(
            self.model.rope_factor == 1 or self.model.rope_scaling != "none",
            f"--rope-factor {self.model.rope_factor:g} needs --rope-scaling yarn (without it the factor is unused)",
        )
        for name, value in (("bias_update_stop", self.moe.bias_update_stop), ("mtp_switch", self.moe.mtp_switch)):
            need(0 <= value <= 1, f"{name} must be a fraction of the run in [0, 1], got {value}")
        if d.task == "grpo":
            _validate_rl(self, need)
        return self

    def default_run_dir(self) -> str:
        name = os.path.basename(os.path.normpath(self.model.name)).replace(".json", "")
        return os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")

    # ------------------------------------------------------------------ conversions
    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The sectioned form: ``{"optimizer": {"lr": ...}, ...}``."""
        return dataclasses.asdict(self)

    def to_flat_dict(self) -> dict[str, Any]:
        """The flat form: ``{"lr": ..., "data_format": ...}`` (flat names are the flags without ``--``)."""
        return {opt.flat: getattr(getattr(self, opt.section), opt.name) for opt in options()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> "TrainConfig":
        """Build and validate a config from a sectioned or flat mapping (or a mix of both)."""
        values = flatten(data, source, options())
        config = cls()
        for flat, value in values.items():
            opt = flat_options()[flat]
            setattr(getattr(config, opt.section), opt.name, coerce(opt, value, source))
        return config.validate()


def _validate_rl(config: "TrainConfig", need) -> None:
    """The GRPO options' ranges (``task: grpo``), each refused with one sentence."""
    rl, d = config.rl, config.data
    need(
        rl.group_size >= 2,
        f"group_size must be at least 2 (GRPO's baseline is the mean of a group), got {rl.group_size}",
    )
    need(
        d.global_batch % rl.group_size == 0,
        f"global_batch ({d.global_batch}) counts completions under GRPO and must be a multiple of group_size "
        f"({rl.group_size})",
    )
    need(rl.max_completion_tokens > 0, f"max_completion_tokens must be positive, got {rl.max_completion_tokens}")
    need(rl.grpo_iterations > 0, f"grpo_iterations must be positive, got {rl.grpo_iterations}")
    need(rl.beta >= 0, f"beta must be non-negative, got {rl.beta}")
    need(
        0 <= rl.epsilon_low < 1 and rl.epsilon_high >= 0,
        f"need 0 <= epsilon_low < 1 and epsilon_high >= 0, got {rl.epsilon_low} and {rl.epsilon_high}",
    )
    need(rl.temperature > 0, f"temperature must be positive for GRPO rollouts, got {rl.temperature}")
    need(0 < rl.top_p <= 1, f"top_p must be in (0, 1], got {rl.top_p}")
    need(config.parallel.pp == 1, "--task grpo does not run under pipeline parallelism; use --pp 1 (dp and ep work)")
    need(config.memory.ema_decay is None, "--task grpo keeps no EMA of the weights; drop --ema-decay")
    need(
        bool(rl.reward) or rl.reward_model is not None,
        "--task grpo needs a reward: --reward math|code|format|module:function or --reward-model RUN_DIR",
    )
    need(
        config.model.init_from is not None,
        "--task grpo starts from a trained model; pass --init-from CKPT (a dsv3 run or a Hugging Face checkpoint)",
    )


# ----------------------------------------------------------------------------- field index
@lru_cache(maxsize=None)
def options() -> tuple[Option, ...]:
    """Every field of every section of :class:`TrainConfig`, in declaration order."""
    return field_index(TrainConfig)


@lru_cache(maxsize=None)
def flat_options() -> dict[str, Option]:
    """Flat name -> option."""
    index = {opt.flat: opt for opt in options()}
    assert len(index) == len(options()), "two config fields share a flat name"
    return index


def section_names() -> tuple[str, ...]:
    return tuple(f.name for f in fields(TrainConfig))


def load_train_config(path: str | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML or TOML run file (or none), apply ``overrides`` and validate.

    ``overrides`` maps flat names (``lr``) or dotted names (``optimizer.lr``) to values;
    ``None`` values mean "not overridden".
    """
    source = path or "options"
    values = flatten(read_run_file(path), path, options()) if path is not None else {}
    values.update(flatten({k: v for k, v in (overrides or {}).items() if v is not None}, "options", options()))
    return TrainConfig.from_dict(values, source=source)


def save_effective_config(config: TrainConfig, path: str) -> None:
    """Write the sectioned YAML of ``config`` atomically."""
    atomic_write_text(path, config_yaml(config))


def config_yaml(config: TrainConfig) -> str:
    """The sectioned YAML text of ``config`` (what RUN_DIR/config.yaml and ``--print-config`` show)."""
    import yaml  # lazy: an optional dependency, needed only for YAML output

    return yaml.safe_dump(config.to_dict(), sort_keys=False)
