"""FP8 mixed-precision training with the DeepSeek-V3 fine-grained recipe (report section 3.3).

Apply it to a built model::

    from dsv3.fp8 import FP8Recipe, convert
    model = convert(model, FP8Recipe())      # backend "auto": real FP8 on Hopper, emulation elsewhere

Modules: :mod:`~dsv3.fp8.formats` (E4M3, E5M6, scales), :mod:`~dsv3.fp8.quant` (1x128 tiles,
128x128 blocks), :mod:`~dsv3.fp8.gemm` (backends, accumulation model), :mod:`~dsv3.fp8.linear`
(autograd: FP8Linear, grouped expert GEMM, SwiGLU), :mod:`~dsv3.fp8.comm` (MoE all-to-all
payloads), :mod:`~dsv3.fp8.convert`.
"""

from dsv3.fp8.convert import convert
from dsv3.fp8.linear import FP8Linear, fp8_grouped_mm, fp8_linear, fp8_swiglu
from dsv3.fp8.quant import QTensor, quantize
from dsv3.fp8.recipe import FP8Recipe

__all__ = ["convert", "FP8Recipe", "FP8Linear", "fp8_linear", "fp8_grouped_mm", "fp8_swiglu", "QTensor", "quantize"]
