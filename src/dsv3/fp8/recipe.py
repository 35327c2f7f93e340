"""The FP8 recipe: the few choices :func:`dsv3.fp8.convert` and the FP8 modules act on."""

from __future__ import annotations

import dataclasses

from dsv3.errors import ConfigError
from dsv3.layout import FP8_BACKENDS, FP8_SCALE_FORMATS

ATTN_OUT_FORMATS = ("e5m6", "e4m3")


@dataclasses.dataclass(frozen=True)
class FP8Recipe:
    """How a model is trained in FP8 (defaults: the DeepSeek-V3 report, section 3.3).

    Attributes:
        backend: ``auto`` (real FP8 GEMMs on a Hopper GPU, emulation elsewhere), ``emulated``
            (dequantise + FP32 GEMM, any device; the numerical reference) or ``cuda`` (error
            where it cannot run).
        scale_format: scales of the GEMM operands: ``fp32`` (``amax / 448``, as the report's
            Linear operands) or ``ue8m0`` (powers of two everywhere, the format later DeepSeek
            releases use). The inputs of the Linear after attention and the MoE dispatch
            payloads always use powers of two, as in the report.
        attn_out_format: how the input of ``self_attn.o_proj`` is cached for backward:
            ``e5m6`` (the report: emulated E5M6, 12 bits, power-of-two 1x128 scales, re-tiled
            along tokens in backward) or ``e4m3`` (like every other FP8 Linear).
        fp8_swiglu: cache the SwiGLU inputs of every MLP and expert in FP8 and recompute its
            output in backward.
        fp8_gemm: run the three GEMMs of every converted Linear and expert on FP8 operands (the
            recipe). ``False`` keeps only the low-precision *storage*: Fprop and Dgrad run in the
            activations' precision on exact operands, Wgrad on the dequantised FP8 cache, so the
            activation memory is the recipe's on hardware without FP8 GEMMs (CPUs, pre-Hopper GPUs).
        include: ``fnmatch`` patterns of module names whose ``nn.Linear`` children become FP8.
        exclude: patterns that stay in high precision even inside ``include`` (the output
            head, the router, the MTP shared head).
    """

    backend: str = "auto"
    scale_format: str = "fp32"
    attn_out_format: str = "e5m6"
    fp8_swiglu: bool = True
    fp8_gemm: bool = True
    include: tuple[str, ...] = ("model.layers.*", "mtp.*")
    exclude: tuple[str, ...] = ("lm_head", "*.lm_head", "*.gate", "*.shared_head", "*.shared_head.*")

    def __post_init__(self) -> None:
        if self.backend not in FP8_BACKENDS:
            raise ConfigError(f"FP8 backend {self.backend!r} is unknown; choose one of {', '.join(FP8_BACKENDS)}.")
        if self.scale_format not in FP8_SCALE_FORMATS:
            raise ConfigError(
                f"FP8 scale_format {self.scale_format!r} is unknown; choose one of {', '.join(FP8_SCALE_FORMATS)}."
            )
        if self.attn_out_format not in ATTN_OUT_FORMATS:
            raise ConfigError(
                f"FP8 attn_out_format {self.attn_out_format!r} is unknown; choose one of {', '.join(ATTN_OUT_FORMATS)}."
            )
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    @property
    def pow2(self) -> bool:
        """Whether GEMM operand scales are powers of two."""
        return self.scale_format == "ue8m0"
