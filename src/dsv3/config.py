"""Model configuration: the Hugging Face DeepSeek-V3 ``config.json`` as a dataclass.

Field names are the Hugging Face ones (what the official DeepSeek-V3 repository
ships), so that a ``config.json`` reads and writes losslessly: keys this class
does not know are kept in :attr:`ModelConfig.extra` and written back. The module
imports no torch, so the planner can use it anywhere.

Symbols of the report (arXiv 2412.19437) and where they live here:

====================  =========================================
d (hidden dim)        ``hidden_size``
n_h (heads)           ``num_attention_heads``
d_h (head dim)        ``qk_nope_head_dim`` (+ ``v_head_dim`` for values)
d_h^R (RoPE dim)      ``qk_rope_head_dim``
d_c (KV latent)       ``kv_lora_rank``
d_c' (Q latent)       ``q_lora_rank`` (``None``: plain query projection)
N_s, N_r              ``n_shared_experts``, ``n_routed_experts``
K_r                   ``num_experts_per_tok``
M (node/group limit)  ``topk_group`` of ``n_group`` groups
gamma                 ``bias_update_speed`` (dsv3 extension key)
alpha                 ``seq_aux_alpha`` (dsv3 extension key)
D                     ``num_nextn_predict_layers``
lambda                ``mtp_loss_weight`` (dsv3 extension key)
====================  =========================================
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from dsv3.errors import ConfigError

TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
SCORING_FUNCS = ("sigmoid", "softmax")
ROPE_TYPES = ("default", "yarn")

# Keys that dsv3 adds to config.json (transformers ignores them).
DSV3_KEYS = ("bias_update_speed", "seq_aux_alpha", "mtp_loss_weight")


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
    # dsv3 extensions: the balancing and MTP hyper-parameters of the report.
    bias_update_speed: float = 0.001  # gamma
    seq_aux_alpha: float = 0.0001  # alpha
    mtp_loss_weight: float = 0.3  # lambda
    # Unknown config.json keys, kept for a lossless round trip.
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
        return (
            self.n_routed_experts > 0
            and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0
        )

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first violated constraint."""

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
        for name in DSV3_KEYS:
            need(getattr(self, name) >= 0, f"{name} must be non-negative, got {getattr(self, name)}")

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
            params = dict(data.pop("rope_parameters"))
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
            extra["eos_token_id_list"] = kwargs["eos_token_id"]
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        try:
            return cls(**kwargs, extra=extra, rope_form=rope_form)
        except TypeError as exc:  # pragma: no cover - defensive
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
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``config.json`` atomically (``path`` is a file or a directory)."""
        from dsv3.utils.io import atomic_write_text

        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def replace(self, **changes: Any) -> "ModelConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


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
