"""Number formats of everything the planner counts, and byte-size parsing.

The default :class:`Precision` is the DeepSeek-V3 training recipe (arXiv 2412.19437, section 3.3): BF16
weights used by the GEMMs, FP32 gradients, FP32 master weights and BF16 AdamW moments (3.3.2), the router
kept and computed in FP32 (3.3.1), BF16 activations, FP32 statistics (RMSNorm rstd, attention
logsumexp), and with ``--fp8`` the activations the FP8 recipe caches as 1-byte E4M3 plus one FP32 scale
per 128 elements, the input of the Linear after attention in 12-bit E5M6 (3.3.3); the exact tiling,
padding included, is in :mod:`dsv3.plan.act_items`. No torch is imported: formats are names with a byte
width.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dsv3.errors import ConfigError, clip
from dsv3.utils.size import parse_size  # noqa: F401  (re-exported: plan code and tests import it from here)

#: Bytes per element of each format the planner knows. ``fp8`` is the payload
#: only; :func:`element_bytes` adds the per-tile scales of the FP8 recipe.
DTYPE_BYTES: dict[str, float] = {
    "fp64": 8,
    "fp32": 4,
    "bf16": 2,
    "fp16": 2,
    "e5m6": 1.5,
    "fp8": 1,
    "int64": 8,
    "int32": 4,
    "bool": 1,
    "none": 0,
}

_ALIASES = {
    "float32": "fp32",
    "float": "fp32",
    "float64": "fp64",
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "e4m3": "fp8",
    "float8": "fp8",
    "long": "int64",
}

#: FP8 recipe tile: one FP32 scale per 128 consecutive activation elements (1x128 tiles).
FP8_TILE = 128
FP8_SCALE_BYTES = 4


def canonical_dtype(name: str, what: str = "precision") -> str:
    """The canonical spelling of a format name (``"bfloat16"`` -> ``"bf16"``)."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DTYPE_BYTES:
        known = ", ".join(k for k in DTYPE_BYTES if k not in ("int64", "int32", "bool", "fp64"))
        raise ConfigError(f"unknown {what} {clip(name)}; use one of {known}")
    return key


def element_bytes(dtype: str) -> float:
    """Bytes one element occupies, scales of the fine-grained FP8 tiles included.

    FP8 (E4M3) and E5M6 activations carry one FP32 scale per 1x128 tile, so an
    element costs ``payload + 4/128`` bytes (report 3.3.2, "Fine-Grained
    Quantization").
    """
    dtype = canonical_dtype(dtype)
    base = DTYPE_BYTES[dtype]
    if dtype in ("fp8", "e5m6"):
        return base + FP8_SCALE_BYTES / FP8_TILE
    return base


@dataclass(frozen=True)
class Precision:
    """The format of every item the planner counts.

    Attributes:
        weights: the weights the forward/backward GEMMs read (BF16 in the recipe).
        grads: gradient accumulation buffers (FP32 in the recipe).
        master: master copy of the weights kept by the optimizer; not counted
            for a tensor whose weight format already equals it (FP32 weights
            are their own master). ``none`` disables the master copy.
        moments: each of AdamW's two moments (BF16 in the recipe).
        router: the router (gating) weight ``N_r x d``.
        router_compute: the format the gating GEMM runs in (FP32, report 3.3.1):
            the router's scores, selected affinities and routing weights are kept
            in it, and, where it differs from the activations, a copy of the
            router input (and of the router weight, where that differs too).
        activations: activations saved for backward (BF16).
        stats: per-token statistics (RMSNorm rstd, attention logsumexp, RoPE tables).
        fp8_cache: format of the activations the FP8 recipe caches with ``--fp8``
            (``fp8``: E4M3 in the recipe's tiles; another format: plain elements of it).
        attn_out_cache: format of the input of the Linear after attention with
            ``--fp8`` (``e5m6`` in the report, 1x128 tiles; ``fp8``: E4M3 token tiles
            like every other Linear input).
    """

    weights: str = "bf16"
    grads: str = "fp32"
    master: str = "fp32"
    moments: str = "bf16"
    router: str = "fp32"
    router_compute: str = "fp32"
    activations: str = "bf16"
    stats: str = "fp32"
    fp8_cache: str = "fp8"
    attn_out_cache: str = "e5m6"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, canonical_dtype(getattr(self, f.name), f"{f.name} precision"))

    def master_bytes(self, weight_dtype: str) -> float:
        """Bytes per parameter of the master copy for a tensor stored as ``weight_dtype``."""
        if self.master == "none" or self.master == weight_dtype:
            return 0.0
        return DTYPE_BYTES[self.master]

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    @classmethod
    def parse(cls, spec: str | None, base: "Precision | None" = None) -> "Precision":
        """Override items from a ``"weights=fp32,moments=fp32"`` string."""
        base = base or cls()
        if not spec:
            return base
        names = {f.name for f in dataclasses.fields(cls)}
        changes: dict[str, str] = {}
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            key, sep, value = part.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in names:
                raise ConfigError(
                    f"--precision item {clip(part)} is not ITEM=FORMAT with ITEM one of {', '.join(sorted(names))}"
                )
            changes[key] = value.strip()
        return dataclasses.replace(base, **changes)


#: Precision presets: the V3 recipe, and plain FP32 training (what a CPU run does).
PRECISION_PRESETS: dict[str, Precision] = {
    "v3": Precision(),
    "fp32": Precision(weights="fp32", grads="fp32", master="none", moments="fp32", router="fp32", activations="fp32"),
    "bf16": Precision(weights="bf16", grads="fp32", master="fp32", moments="fp32", router="fp32"),
}


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units, three significant digits (``"73.2 GiB"``)."""
    n = float(n)
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{n:.0f} B"


def format_count(n: float) -> str:
    """A parameter or FLOP count with an SI suffix (``"671.0B"``, ``"37.5B"``, ``"1.2M"``)."""
    n = float(n)
    for unit, scale in (("P", 1e15), ("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"
