"""Model configuration: the Hugging Face DeepSeek-V3 ``config.json`` as a dataclass.

Field names are the Hugging Face ones, so a ``config.json`` reads and writes losslessly: unknown keys are
kept in :attr:`ModelConfig.extra` and written back. The module imports no torch (the planner uses it).
The report's symbols and their fields (d = ``hidden_size``, d_c = ``kv_lora_rank``, N_r =
``n_routed_experts``, K_r = ``num_experts_per_tok``, ...) are tabled in docs/model.md. gamma, alpha and
lambda are the trainer's (``dsv3.train.config.MoEOptions``): a config.json's dsv3 extension keys
:data:`DSV3_KEYS` are kept in ``extra`` (checked, written back).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from dsv3.errors import ConfigError
from dsv3.utils.io import atomic_write_text

TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
SCORING_FUNCS = ("sigmoid", "softmax")
ROPE_TYPES = ("default", "yarn")

# The report's balancing and MTP hyper-parameters (section 4.2): gamma, alpha, lambda. The trainer owns
# them (dsv3.train.config.MoEOptions; unset there: a config.json's extension key, else this value); the
# model's forward takes alpha and lambda as arguments, with these values as the defaults of a bare call.
RECIPE_DEFAULTS = {"bias_update_speed": 0.001, "seq_aux_alpha": 0.0001, "mtp_loss_weight": 0.3}
# Keys that dsv3 adds to config.json (transformers ignores them); read into ModelConfig.extra.
DSV3_KEYS = tuple(RECIPE_DEFAULTS)


@dataclass
class ModelConfig:
    """DeepSeek-V3-family model configuration (defaults: the official DeepSeek-V3)."""

    model_type: str = "deepseek_v3"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = 128
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    num_nextn_predict_layers: int = 1
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(
        default_factory=lambda: {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        }
    )
    rope_interleave: bool = True
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 163840
    hidden_act: str = "silu"
    attention_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    quantization_config: dict[str, Any] | None = None
    # Unknown config.json keys (and the DSV3_KEYS), kept for a lossless round trip.
    extra: dict[str, Any] = field(default_factory=dict)
    # Which key the rope settings were read from ("rope_scaling" or "rope_parameters").
    rope_form: str = "rope_scaling"

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def qk_head_dim(self) -> int:
        """d_h + d_h^R: the query/key head dimension."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def group_limited(self) -> bool:
        """Whether routing first restricts tokens to ``topk_group`` of ``n_group`` groups."""
        return self.topk_method in ("noaux_tc", "group_limited_greedy") and self.n_group > 1

    def is_moe_layer(self, layer: int) -> bool:
        """Whether main-model layer ``layer`` (0-based) has a DeepSeekMoE feed-forward."""
        return self.n_routed_experts > 0 and layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first violated constraint.

        Every field's type and range is checked first (:func:`check_field_types`), so
        nothing below (and nothing downstream, such as ``tokenizers`` or the planner)
        ever sees a string where a number belongs or an absurd size.
        """
        check_field_types(self)

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "max_position_embeddings",
            "moe_layer_freq",
        ):
            value = getattr(self, name)
            need(
                isinstance(value, int) and not isinstance(value, bool) and value > 0,
                f"config field {name} must be a positive integer, got {value!r}",
            )
        for name in ("n_shared_experts", "n_routed_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
            value = getattr(self, name)
            need(
                isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                f"config field {name} must be a non-negative integer, got {value!r}",
            )
        need(
            self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
            f"config field q_lora_rank must be null or a positive integer, got {self.q_lora_rank!r}",
        )
        need(
            self.num_key_value_heads == self.num_attention_heads,
            f"Multi-head Latent Attention needs num_key_value_heads == num_attention_heads "
            f"({self.num_key_value_heads} != {self.num_attention_heads})",
        )
        need(
            self.qk_rope_head_dim % 2 == 0,
            f"qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}",
        )
        need(self.hidden_act == "silu", f"hidden_act must be 'silu' (SwiGLU), got {self.hidden_act!r}")
        need(self.rms_norm_eps > 0, f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        need(
            self.scoring_func in SCORING_FUNCS,
            f"scoring_func must be one of {', '.join(SCORING_FUNCS)}, got {self.scoring_func!r}",
        )
        need(
            self.topk_method in TOPK_METHODS,
            f"topk_method must be one of {', '.join(TOPK_METHODS)}, got {self.topk_method!r}",
        )
        need(
            self.first_k_dense_replace <= self.num_hidden_layers,
            f"first_k_dense_replace ({self.first_k_dense_replace}) exceeds num_hidden_layers "
            f"({self.num_hidden_layers})",
        )
        need(
            self.rope_type in ROPE_TYPES,
            f"rope scaling type must be one of {', '.join(ROPE_TYPES)}, got {self.rope_type!r}",
        )
        if self.rope_type == "yarn":
            need(
                "factor" in self.rope_scaling and self.rope_scaling["factor"] > 0,
                "yarn rope scaling needs a positive 'factor'",
            )
        if self.n_routed_experts > 0:
            need(
                isinstance(self.moe_intermediate_size, int) and self.moe_intermediate_size > 0,
                f"moe_intermediate_size must be a positive integer, got {self.moe_intermediate_size!r}",
            )
            need(
                isinstance(self.num_experts_per_tok, int) and 0 < self.num_experts_per_tok <= self.n_routed_experts,
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and n_routed_experts "
                f"({self.n_routed_experts})",
            )
            if self.topk_method in ("noaux_tc", "group_limited_greedy"):
                need(
                    isinstance(self.n_group, int) and self.n_group >= 1,
                    f"n_group must be a positive integer for topk_method {self.topk_method}, got {self.n_group!r}",
                )
                need(
                    self.n_routed_experts % self.n_group == 0,
                    f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group ({self.n_group})",
                )
                need(
                    isinstance(self.topk_group, int) and 1 <= self.topk_group <= self.n_group,
                    f"topk_group ({self.topk_group}) must be between 1 and n_group ({self.n_group})",
                )
                per_group = self.n_routed_experts // self.n_group
                need(
                    self.num_experts_per_tok <= self.topk_group * per_group,
                    f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts in the allowed "
                    f"groups (topk_group {self.topk_group} x {per_group} experts per group)",
                )
                if self.topk_method == "noaux_tc" and self.n_group > 1:
                    need(
                        per_group >= 2,
                        f"noaux_tc routing scores a group by its top-2 experts, so each of the {self.n_group} "
                        f"groups needs at least 2 experts (n_routed_experts={self.n_routed_experts})",
                    )
        for name, value in self.recipe().items():
            need(
                is_number(value) and value >= 0,
                f"config field {name} must be a non-negative number, got {_kind(value)}",
            )

    def recipe(self) -> dict[str, Any]:
        """The dsv3 extension keys (:data:`DSV3_KEYS`: gamma, alpha, lambda) this config.json carries."""
        return {k: self.extra[k] for k in DSV3_KEYS if k in self.extra}

    # ---------------------------------------------------------------- json i/o
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Build from a ``config.json`` dictionary (official or transformers-5 rope form)."""
        if not isinstance(data, dict):
            raise ConfigError(f"a model config must be a JSON object, got {type(data).__name__}")
        data = copy.deepcopy(data)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "rope_form"}
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        rope_form = "rope_scaling"
        if "rope_parameters" in data and data["rope_parameters"] is not None:
            rope_form = "rope_parameters"
            params = data.pop("rope_parameters")
            if not isinstance(params, dict):
                raise ConfigError(f"config field rope_parameters must be null or an object, got {_kind(params)}")
            params = dict(params)
            theta = params.pop("rope_theta", data.pop("rope_theta", 10000.0))
            data["rope_theta"] = theta
            rope_type = params.get("rope_type", params.get("type", "default"))
            data["rope_scaling"] = None if rope_type == "default" else params
        elif "rope_scaling" not in data:
            data["rope_scaling"] = None
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            else:
                extra[key] = value
        if "num_nextn_predict_layers" not in kwargs and "num_mtp_layers" in extra:
            kwargs["num_nextn_predict_layers"] = extra.pop("num_mtp_layers")
        for name in ("num_nextn_predict_layers",):
            kwargs.setdefault(name, 0)  # absent in a config.json means "no MTP modules"
        model_type = kwargs.get("model_type", "deepseek_v3")
        if model_type == "deepseek_v2":
            # Defaults of the V2 family where the file is silent.
            kwargs.setdefault("scoring_func", "softmax")
            kwargs.setdefault("topk_method", "greedy")
            kwargs.setdefault("norm_topk_prob", False)
            kwargs.setdefault("routed_scaling_factor", 1.0)
            kwargs.setdefault("first_k_dense_replace", 0)
            kwargs.setdefault("n_group", 1)
            kwargs.setdefault("topk_group", 1)
        elif model_type != "deepseek_v3":
            raise ConfigError(f"model_type must be deepseek_v3 or deepseek_v2, got {model_type!r}")
        for key in ("n_group", "topk_group"):
            if kwargs.get(key) is None and key in kwargs:
                kwargs[key] = 1
        if isinstance(kwargs.get("eos_token_id"), list):
            if not kwargs["eos_token_id"]:
                raise ConfigError("config field eos_token_id must be an integer or a non-empty list of integers")
            extra["eos_token_id_list"] = kwargs["eos_token_id"]
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        try:
            return cls(**kwargs, extra=extra, rope_form=rope_form)
        except TypeError as exc:  # pragma: no cover - defensive
            raise ConfigError(f"malformed model config: {exc}") from None
        except (ValueError, OverflowError) as exc:  # pragma: no cover - defensive (ConfigError is a ValueError)
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"malformed model config: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` dictionary, rope settings in the form they were read."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in ("extra", "rope_form", "rope_scaling", "rope_theta"):
                continue
            out[f.name] = copy.deepcopy(getattr(self, f.name))
        extra = copy.deepcopy(self.extra)
        eos_list = extra.pop("eos_token_id_list", None)
        if eos_list is not None:
            out["eos_token_id"] = eos_list
        if self.quantization_config is None:
            out.pop("quantization_config")
        if self.rope_form == "rope_parameters":
            params = {"rope_theta": self.rope_theta}
            if self.rope_scaling:
                params.update(self.rope_scaling)
            else:
                params["rope_type"] = "default"
            out["rope_parameters"] = params
        else:
            out["rope_theta"] = self.rope_theta
            out["rope_scaling"] = copy.deepcopy(self.rope_scaling)
        arch = "DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"
        extra.setdefault("architectures", [arch])
        out.update(extra)
        return dict(sorted(out.items()))

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "ModelConfig":
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"model config {path} does not exist")
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"model config {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"model config {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8 JSON"
            ) from None
        except RecursionError:
            raise ConfigError(f"model config {path} is nested too deeply to be a model config") from None
        except OSError as exc:
            raise ConfigError(f"model config {path} cannot be read ({exc.strerror or exc})") from None
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``config.json`` atomically (``path`` is a file or a directory)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def replace(self, **changes: Any) -> "ModelConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


# ------------------------------------------------------------------ field types and ranges
# Upper bounds that no real model reaches; beyond them a value is a typo (or an attack on
# the memory of whatever reads it: tokenizers, the planner, torch.empty).
MAX_VOCAB = 1 << 24  # 16.7M tokens (the largest released vocabularies have ~256K)
MAX_DIM = 1 << 20  # hidden sizes, head dims, latent ranks, FFN widths
MAX_COUNT = 1 << 16  # layers, heads, experts, groups
MAX_POSITIONS = 1 << 27  # 134M positions

_INT_RULES: dict[str, tuple[int, int]] = {  # name -> (min, max), both inclusive
    "vocab_size": (1, MAX_VOCAB),
    "hidden_size": (1, MAX_DIM),
    "intermediate_size": (1, MAX_DIM),
    "moe_intermediate_size": (0, MAX_DIM),
    "num_hidden_layers": (1, MAX_COUNT),
    "num_attention_heads": (1, MAX_COUNT),
    "num_key_value_heads": (1, MAX_COUNT),
    "kv_lora_rank": (1, MAX_DIM),
    "qk_nope_head_dim": (1, MAX_DIM),
    "qk_rope_head_dim": (1, MAX_DIM),
    "v_head_dim": (1, MAX_DIM),
    "n_shared_experts": (0, MAX_COUNT),
    "n_routed_experts": (0, MAX_COUNT),
    "num_experts_per_tok": (0, MAX_COUNT),
    "n_group": (0, MAX_COUNT),
    "topk_group": (0, MAX_COUNT),
    "first_k_dense_replace": (0, MAX_COUNT),
    "moe_layer_freq": (1, MAX_COUNT),
    "num_nextn_predict_layers": (0, MAX_COUNT),
    "max_position_embeddings": (1, MAX_POSITIONS),
}
_OPTIONAL_INT_RULES: dict[str, tuple[int, int]] = {
    "q_lora_rank": (1, MAX_DIM),
    "bos_token_id": (0, MAX_VOCAB),
    "eos_token_id": (0, MAX_VOCAB),
}
# name -> (lower bound, whether the bound itself is allowed, upper bound or None)
_FLOAT_RULES: dict[str, tuple[float, bool, float | None]] = {
    "routed_scaling_factor": (0.0, False, None),
    "rope_theta": (0.0, False, None),
    "rms_norm_eps": (0.0, False, 1.0),
    "initializer_range": (0.0, False, None),
}
_BOOL_FIELDS = ("norm_topk_prob", "rope_interleave", "tie_word_embeddings", "attention_bias")
_STR_FIELDS = ("model_type", "topk_method", "scoring_func", "hidden_act")
# Numeric keys a rope_scaling / rope_parameters object may hold (all optional).
_ROPE_NUMBERS = ("factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor")


def _kind(value: Any) -> str:
    """How a JSON value reads in an error message: ``a string ('abc')``, ``null``, ``a boolean (true)``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"a string ({shown!r})"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return repr(value)


def is_int(value: Any) -> bool:
    """A true integer: an ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool, not NaN or infinity)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def as_int(value: Any, what: str) -> int:
    """``value`` as an ``int``, strictly: ``3``, ``3.0``, ``"3"``, ``"1e3"`` pass; ``2.5``, ``"2.5"``, ``"x"``, ``True`` fail.

    The one integer parser for command-line flags and config files, so that ``--steps 2.5``
    is an error instead of a silent truncation to 2.

    Args:
        value: an int, an integral float, or a string holding an integer (``"12"``, ``"1e3"``).
        what: how the error names the value, e.g. ``"option steps"`` or ``"--steps"``.

    Raises:
        ConfigError: when ``value`` is not an integer.
    """
    if is_int(value):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            number = float(text)  # "1e3" is an integer written in scientific notation
        except ValueError:
            number = math.nan
        if math.isfinite(number) and number.is_integer():
            return int(number)
    shown = repr(value) if isinstance(value, float) else _kind(value)
    raise ConfigError(f"{what} must be an integer, got {shown}")


def check_field_types(cfg: "ModelConfig") -> None:
    """Check the type and range of every field of ``cfg``; raise :class:`ConfigError` on the first bad one.

    Integers must be JSON integers (not strings, floats or booleans) within the bounds of
    ``_INT_RULES``; floats finite numbers within ``_FLOAT_RULES``; booleans JSON booleans;
    ``rope_scaling`` null or an object with a known ``type`` and numeric parameters.
    """
    for name, (lo, hi) in _INT_RULES.items():
        value = getattr(cfg, name)
        if not is_int(value):
            raise ConfigError(f"config field {name} must be an integer, got {_kind(value)}")
        if not lo <= value <= hi:
            raise ConfigError(f"config field {name} must be between {lo} and {hi:,}, got {value:,}")
    for name, (lo, hi) in _OPTIONAL_INT_RULES.items():
        value = getattr(cfg, name)
        if value is None:
            continue
        if not is_int(value):
            raise ConfigError(f"config field {name} must be null or an integer, got {_kind(value)}")
        if not lo <= value <= hi:
            raise ConfigError(f"config field {name} must be between {lo} and {hi:,}, got {value:,}")
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(cfg, name)
        if value is not None and value >= cfg.vocab_size:
            raise ConfigError(f"config field {name} ({value}) must be below vocab_size ({cfg.vocab_size})")
    for name, (lo, inclusive, hi) in _FLOAT_RULES.items():
        value = getattr(cfg, name)
        if not is_number(value):
            raise ConfigError(f"config field {name} must be a finite number, got {_kind(value)}")
        low_ok = value >= lo if inclusive else value > lo
        if not low_ok or (hi is not None and value >= hi):
            bound = ("non-negative" if inclusive else "positive") + (f" and below {hi}" if hi is not None else "")
            raise ConfigError(f"config field {name} must be {bound}, got {value}")
    for name in _BOOL_FIELDS:
        value = getattr(cfg, name)
        if not isinstance(value, bool):
            raise ConfigError(f"config field {name} must be true or false, got {_kind(value)}")
    for name in _STR_FIELDS:
        value = getattr(cfg, name)
        if not isinstance(value, str):
            raise ConfigError(f"config field {name} must be a string, got {_kind(value)}")
    if cfg.quantization_config is not None and not isinstance(cfg.quantization_config, dict):
        raise ConfigError(
            f"config field quantization_config must be null or an object, got {_kind(cfg.quantization_config)}"
        )
    check_rope_scaling(cfg.rope_scaling)


def check_rope_scaling(rope: Any) -> None:
    """``rope_scaling`` must be null or ``{"type": "yarn" | "default", "factor": > 0, ...}`` with numeric values."""
    if rope is None:
        return
    if not isinstance(rope, dict):
        raise ConfigError(
            f"config field rope_scaling must be null or an object such as "
            f'{{"type": "yarn", "factor": 4}}, got {_kind(rope)}'
        )
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if not isinstance(rope_type, str) or rope_type not in ROPE_TYPES:
        raise ConfigError(f"rope scaling type must be one of {', '.join(ROPE_TYPES)}, got {_kind(rope_type)}")
    for key in _ROPE_NUMBERS:
        if key in rope and rope[key] is not None and not is_number(rope[key]):
            raise ConfigError(f"rope_scaling field {key} must be a finite number, got {_kind(rope[key])}")
    if rope_type == "yarn":
        factor = rope.get("factor")
        if not is_number(factor) or factor <= 0:
            raise ConfigError(f"yarn rope scaling needs a positive 'factor', got {_kind(factor)}")
    original = rope.get("original_max_position_embeddings")
    if original is not None and (not is_int(original) or not 1 <= original <= MAX_POSITIONS):
        raise ConfigError(
            f"rope_scaling field original_max_position_embeddings must be a positive integer, got {_kind(original)}"
        )


def list_presets() -> list[str]:
    """Names of the shipped presets (``tiny``, ``small``, ``deepseek-v3``, ...)."""
    root = resources.files("dsv3") / "presets"
    return sorted(p.name[: -len(".json")] for p in root.iterdir() if p.name.endswith(".json"))


def load_preset(name: str) -> ModelConfig:
    """The shipped preset ``name`` as a :class:`ModelConfig`."""
    names = list_presets()
    if name not in names:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(names)}")
    text = (resources.files("dsv3") / "presets" / f"{name}.json").read_text(encoding="utf-8")
    return ModelConfig.from_dict(json.loads(text))


def resolve_model_config(spec: str | os.PathLike | ModelConfig) -> ModelConfig:
    """A preset name, a config.json path or a model directory, as a :class:`ModelConfig`."""
    if isinstance(spec, ModelConfig):
        return spec
    spec = os.fspath(spec)
    if os.path.exists(spec):
        return ModelConfig.from_json_file(spec)
    if spec in list_presets():
        return load_preset(spec)
    raise ConfigError(f"{spec!r} is neither a preset ({', '.join(list_presets())}) nor an existing config.json")
