"""RMSNorm with a memory-lean backward.

``y = w * (x / sqrt(mean(x^2) + eps))``, computed in FP32 and cast back to the
input dtype before the weight is applied (as DeepSeek's and Hugging Face's
implementations do). The autograd function keeps only the input ``x`` and the
per-token ``rstd = 1/sqrt(mean(x^2)+eps)`` for backward and recomputes the
normalised activations there, instead of the three tensors plain autograd would
keep (report 3.2.3: "recomputation of RMSNorm").
"""

from __future__ import annotations

import torch
from torch import nn


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # [..., 1]
        y = weight * (xf * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xf = x.float()
        xhat = xf * rstd  # [..., d]
        dyf = dy.float()
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (dyf * xhat.to(x.dtype).float()).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            g = dyf * weight.float()  # dL/dxhat
            dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
            dx = dx.to(x.dtype)
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Functional RMSNorm over the last dimension of ``x`` [..., d] with weight [d]."""
    return _RMSNormFn.apply(x, weight, eps)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm over the last dimension (weight initialised to ones).

    Args:
        dim: size d of the normalised (last) dimension.
        eps: added to the mean square before the reciprocal square root.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
