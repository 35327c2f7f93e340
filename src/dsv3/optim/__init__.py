"""Optimizer math shared by the trainer and ZeRO-1 (below both: it imports neither)."""

from dsv3.optim.adamw import (
    AdamW,
    build_optimizer,
    clip_grad_norm,
    is_no_decay,
    optimizer_state_bytes,
    param_groups,
    resolve_moments_dtype,
    set_lr,
)

__all__ = [
    "AdamW",
    "param_groups",
    "build_optimizer",
    "clip_grad_norm",
    "set_lr",
    "optimizer_state_bytes",
    "resolve_moments_dtype",
    "is_no_decay",
]
