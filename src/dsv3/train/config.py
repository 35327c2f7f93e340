"""The training-run configuration: one dataclass, read from YAML or TOML, every field overridable.

A run is described by :class:`TrainConfig`. ``dsv3 train --config run.yaml --lr 1e-3``
reads the file, then applies command-line overrides (every field is a flag, with
``-`` for ``_``), validates, and writes the effective configuration to
``RUN_DIR/config.yaml``. Defaults train the ``tiny`` preset on the Python standard
library in a few minutes on 2 CPU cores (the embedded default of ``dsv3 train``).
Report (arXiv 2412.19437, section 4.2) values are noted where they differ.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field, fields
from typing import Any, get_type_hints

from dsv3.errors import ConfigError


@dataclass
class TrainConfig:
    # --- model and data
    model: str = "tiny"  # preset name, config.json path, or a checkpoint directory (see init_from)
    init_from: str | None = None  # Hugging Face checkpoint directory to start from
    data: str | None = None  # text file/dir, .jsonl, .parquet, .bin; None: the Python standard library
    data_format: str | None = None  # text | jsonl | parquet | bin (default: from the suffix)
    data_field: str = "text"  # the .jsonl field / .parquet column holding the text
    data_glob: str | None = None  # file pattern inside a data directory
    data_dtype: str | None = None  # uint16 / uint32 for a .bin (inferred when None)
    eos_token: str | None = None  # the document separator's text (default: found in the tokenizer)
    tokenizer: str | None = None  # a tokenizer.json; None: a byte-level BPE trained on the corpus (cached)
    val_fraction: float = 0.01
    seq_len: int = 256
    # --- batch
    micro_batch: int = 8  # sequences per forward/backward
    global_batch: int = 8  # sequences per optimizer step (gradient accumulation = global / micro)
    batch_ramp_start: int | None = None  # report: 3072 -> 15360 sequences over the first 469B tokens
    batch_ramp_steps: int = 0
    # --- optimisation (report: AdamW (0.9, 0.95), wd 0.1, clip 1.0, peak 2.2e-4, warmup 2K steps)
    steps: int = 300
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 30
    decay_start: float = 0.5  # fraction of the run at which cosine decay starts
    decay_end: float = 0.95  # fraction at which it reaches min_lr (constant tail after)
    final_lr: float | None = None  # report: 7.3e-6 for the last tokens
    final_steps: int = 0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    optim_states: str = "fp32"  # fp32 | bf16 (AdamW moments)
    # --- DeepSeek-V3 recipe knobs (None: the model config's values)
    bias_update_speed: float | None = None  # gamma (report: 0.001, then 0 for the last 500B tokens)
    bias_update_stop: float = 1.0  # fraction of the run after which gamma is 0
    seq_aux_alpha: float | None = None  # alpha (report: 0.0001)
    mtp_loss_weight: float | None = None  # lambda (report: 0.3, then 0.1)
    mtp_loss_weight_late: float | None = None
    mtp_switch: float = 0.68  # fraction of the run after which lambda = mtp_loss_weight_late
    # --- memory savings and precision
    fp8: bool = False
    fp8_backend: str = "auto"  # auto | emulated | cuda
    fp8_scale_format: str = "fp32"  # fp32 | ue8m0 (power-of-two scales for every GEMM operand)
    fp8_gemm: bool = True  # false: FP8 activation storage only, GEMMs in the parameter precision
    recompute: str = "none"  # none | selective | full
    ema_decay: float | None = None
    use_ema: bool = False  # validate with the EMA weights
    dtype: str = "float32"  # parameter dtype: float32 | bfloat16
    device: str = "auto"  # auto | cpu | cuda
    # --- run
    seed: int = 0
    run_dir: str | None = None  # default runs/<model>-<time>
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 100
    keep_last: int = 2
    log_every: int = 1
    load_every: int = 10  # log per-expert loads every N steps
    max_nonfinite: int = 5  # stop after this many non-finite losses in a row
    sample_prompt: str = "def "
    sample_tokens: int = 80
    tensorboard: bool = True
    progress: bool = True

    def validate(self) -> "TrainConfig":
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for name in ("seq_len", "micro_batch", "global_batch", "steps", "eval_every", "eval_batches",
                     "save_every", "keep_last", "log_every", "load_every", "max_nonfinite"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(self.global_batch % self.micro_batch == 0,
             f"global_batch ({self.global_batch}) must be a multiple of micro_batch ({self.micro_batch})")
        if self.batch_ramp_start is not None:
            need(0 < self.batch_ramp_start <= self.global_batch,
                 f"batch_ramp_start ({self.batch_ramp_start}) must be between 1 and global_batch")
        need(self.lr > 0 and self.min_lr >= 0, "lr must be positive and min_lr non-negative")
        need(0 <= self.decay_start <= self.decay_end <= 1, "need 0 <= decay_start <= decay_end <= 1")
        need(0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got {self.val_fraction}")
        need(self.optim_states in ("fp32", "bf16"), f"optim_states must be fp32 or bf16, got {self.optim_states!r}")
        need(self.recompute in ("none", "selective", "full"),
             f"recompute must be none, selective or full, got {self.recompute!r}")
        need(self.dtype in ("float32", "bfloat16"), f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        need(self.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {self.device!r}")
        need(self.ema_decay is None or 0 < self.ema_decay < 1, f"ema_decay must be in (0, 1), got {self.ema_decay}")
        need(not self.use_ema or self.ema_decay is not None, "use_ema needs ema_decay")
        need(self.grad_clip >= 0 and self.weight_decay >= 0, "grad_clip and weight_decay must be non-negative")
        return self

    def default_run_dir(self) -> str:
        name = os.path.basename(os.path.normpath(self.model)).replace(".json", "")
        return os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> "TrainConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"{source} must be a mapping of training options, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source} has unknown option {unknown[0]!r}; see `dsv3 train --help`")
        hints = get_type_hints(cls)
        values = {k: _coerce(k, v, hints[k], source) for k, v in data.items()}
        return cls(**values).validate()


def _coerce(name: str, value: Any, hint: Any, source: str) -> Any:
    """Check/convert one option value to its declared type (int, float, bool, str, or None)."""
    kinds = [t for t in getattr(hint, "__args__", (hint,)) if t is not type(None)]
    kind = kinds[0]
    if value is None:
        if type(None) in getattr(hint, "__args__", ()):
            return None
        raise ConfigError(f"{source}: option {name} cannot be null")
    try:
        if kind is bool:
            if isinstance(value, str):
                low = value.lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return low in ("true", "1", "yes")
            if not isinstance(value, (bool, int)):
                raise ValueError
            return bool(value)
        if kind is int:
            from dsv3.config import as_int  # the one strict integer parser (rejects 2.5, "2.5", true)

            return as_int(value, f"{source}: option {name}")
        if kind is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: option {name} must be {kind.__name__}, got {value!r}") from None


def load_train_config(path: str | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML or TOML run file (or none), apply ``overrides`` and validate."""
    data: dict[str, Any] = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"training config {path} does not exist")
        with open(path, "rb") as fh:
            raw = fh.read()
        try:
            if path.endswith(".toml"):
                import tomllib

                data = tomllib.loads(raw.decode("utf-8"))
            else:
                import yaml

                data = yaml.safe_load(raw) or {}
        except Exception as exc:  # yaml/toml raise many types; all mean "malformed"
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"training config {path} is malformed ({msg})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"training config {path} must be a mapping of options")
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return TrainConfig.from_dict(data, source=path or "options")


def add_config_arguments(parser) -> None:
    """Add one ``--flag`` per :class:`TrainConfig` field (default None = not overridden)."""
    hints = get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kinds = [t for t in getattr(hints[f.name], "__args__", (hints[f.name],)) if t is not type(None)]
        if kinds[0] is bool:
            parser.add_argument(flag, dest=f.name, default=None, action=_BoolAction, nargs="?",
                                help=f"(default {f.default})")
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=kinds[0].__name__.upper(),
                                help=f"(default {f.default})")


class _BoolAction:
    """``--fp8`` means true; ``--fp8 false`` is accepted too."""

    def __new__(cls, *args, **kwargs):
        import argparse

        class Action(argparse.Action):
            def __call__(self, parser, namespace, values, option_string=None):
                setattr(namespace, self.dest, True if values is None else values)

        return Action(*args, **kwargs)


def overrides_from_args(args) -> dict[str, Any]:
    return {f.name: getattr(args, f.name, None) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}


def save_effective_config(config: TrainConfig, path: str) -> None:
    import yaml

    from dsv3.utils.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


_ = field  # keep the import for readers adding list-valued options
