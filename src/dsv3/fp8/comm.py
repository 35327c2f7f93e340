"""Low-precision communication for expert parallelism (report section 3.3.3).

The activations dispatched to the experts and the activation gradients sent back before the MoE
down-projections are quantised to FP8 (1x128 tiles, UE8M0 power-of-two scales) *before* the all-to-all;
combine stays BF16. A payload is ``(data, scales)``: E4M3 bytes [N, D_p] and one UE8M0 byte per 128
channels [N, D_p / 128], about 50.4 % of the BF16 bytes. :func:`fp8_dispatch` and
:func:`fp8_grad_dispatch` apply the same rounding on one device, so a single-device run has exactly the
numerics of an expert-parallel one. Narrative: docs/fp8.md.
"""

from __future__ import annotations

import dataclasses

import torch

from dsv3.fp8.formats import scale_to_ue8m0, ue8m0_to_scale
from dsv3.fp8.quant import ACT_TILE, QTensor, quantize


@dataclasses.dataclass
class FP8Payload:
    """What crosses the wire: E4M3 data and UE8M0 scale bytes of tokens in 1x128 tiles.

    Attributes:
        data: [N, D_p] ``torch.float8_e4m3fn`` (D_p = D rounded up to a multiple of 128).
        scale: [N, D_p / 128] ``uint8`` biased exponents (scale = 2^(scale - 127)).
        dim: the logical hidden size D.
    """

    data: torch.Tensor
    scale: torch.Tensor
    dim: int

    def to_qtensor(self) -> QTensor:
        """The received tokens as a :class:`QTensor` ready for an FP8 GEMM (no requantisation)."""
        return QTensor(self.data, ue8m0_to_scale(self.scale), (self.data.shape[0], self.dim), ACT_TILE)

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The received tokens [N, D] in high precision."""
        return self.to_qtensor().dequantize(dtype)

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()


def quantize_for_dispatch(x: torch.Tensor) -> FP8Payload:
    """Quantise tokens [N, D] for the MoE dispatch all-to-all (1x128 tiles, power-of-two scales)."""
    q = quantize(x.reshape(-1, x.shape[-1]), ACT_TILE, pow2=True)
    return FP8Payload(q.data, scale_to_ue8m0(q.scale), x.shape[-1])


def quantize_grad_for_dispatch(dy: torch.Tensor) -> FP8Payload:
    """Quantise the activation gradients [N, D] sent before the MoE down-projection in backward.

    Same layout and scales as :func:`quantize_for_dispatch`; a separate name because it is a
    separate hook point (the backward of combine).
    """
    return quantize_for_dispatch(dy)


class _FP8Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return quantize_for_dispatch(x).dequantize(x.dtype).reshape(x.shape)

    @staticmethod
    def backward(ctx, dy):
        return dy  # the backward of dispatch is a combine of gradients: BF16, unquantised


class _FP8GradDispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        return quantize_grad_for_dispatch(dy).dequantize(dy.dtype).reshape(dy.shape)


def fp8_dispatch(x: torch.Tensor) -> torch.Tensor:
    """Single-device stand-in for an FP8 dispatch: forward rounds ``x`` as the wire would, backward is identity."""
    return _FP8Dispatch.apply(x)


def fp8_grad_dispatch(y: torch.Tensor) -> torch.Tensor:
    """Single-device stand-in for the FP8 gradient all-to-all: identity forward, backward rounds the gradient."""
    return _FP8GradDispatch.apply(y)
