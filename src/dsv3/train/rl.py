"""The GRPO math (DeepSeekMath, arXiv 2402.03300, section 4.1): group-relative advantages and the clipped objective.

For a prompt with G completions and rewards r: A_i = (r_i - mean(r)) / (std(r) + eps) (unbiased std, eps
1e-4); rho_i,t = pi_theta / pi_old (the importance ratio); D_i,t = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1
(k3 KL); l_i,t = -min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i) + beta D_i,t, aggregated over the
completion tokens by ``loss_type`` as TRL defines it (grpo, bnpo, dr_grpo, dapo: docs/rl.md, "The objective").
A fully masked row adds 0 and still counts in grpo's and dr_grpo's B; the KL term is not multiplied by rho;
``old_logps=None`` is on-policy (rho = exp(logps - logps.detach())). Rows of one group are contiguous (row b is
in group b // G). Every function computes in the wider of the input dtype and float32 and returns that dtype.
Details: docs/rl.md ("Module notes").
"""

from __future__ import annotations

from typing import get_args

import torch
import torch.nn.functional as F

from dsv3.errors import ConfigError
from dsv3.train.config import GRPOLossType, RewardScaling

__all__ = [
    "LossType",
    "RewardScale",
    "group_advantages",
    "grpo_loss",
    "grpo_stats",
    "token_logps",
    "token_entropy",
    "k3_kl",
]

# The choice lists live with the run config's other choices (one spelling each): TRL's loss names, and what the
# centred rewards are divided by.
LossType = GRPOLossType
RewardScale = RewardScaling


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    if not t.is_floating_point():
        return torch.float32
    return torch.promote_types(t.dtype, torch.float32)


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: RewardScale = "group", eps: float = 1e-4
) -> torch.Tensor:
    """Group-relative advantages A_i = (r_i - mean_group) / (std + eps).

    Args:
        rewards: [B] rewards; rows b*G .. b*G+G-1 are the G completions of one prompt.
        group_size: G >= 2 (the unbiased std of one sample is undefined).
        scale: ``group`` divides by the group's unbiased std, ``batch`` by the unbiased std of all B
            rewards (TRL's ``scale_rewards="batch"``), ``none`` only centres (Dr. GRPO).
        eps: added to the std (TRL 1e-4, verl 1e-6).
    Returns:
        [B] advantages in the compute dtype; a group whose rewards are all equal gets 0.
    """
    if scale not in get_args(RewardScale):
        raise ConfigError(f"reward scale {scale!r} is not one of {', '.join(get_args(RewardScale))}")
    if group_size < 2:
        raise ConfigError(f"the group size G is {group_size}; GRPO needs G >= 2 completions per prompt")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ConfigError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    r = rewards.to(_compute_dtype(rewards))
    grouped = r.view(-1, group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "none":
        return centred
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1)
    else:
        std = r.std() if r.numel() > 1 else r.new_zeros(())
    return centred / (std + eps)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref): exp(ref - logps) - (ref - logps) - 1 (>= 0)."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def _check_shapes(logps, old_logps, ref_logps, advantages, mask) -> None:
    if logps.dim() != 2:
        raise ConfigError(f"logps must be [B, T], got shape {tuple(logps.shape)}")
    for name, t in (("old_logps", old_logps), ("ref_logps", ref_logps), ("mask", mask)):
        if t is not None and t.shape != logps.shape:
            raise ConfigError(f"{name} has shape {tuple(t.shape)}, logps {tuple(logps.shape)}; they must match")
    if advantages.shape != logps.shape[:1]:
        raise ConfigError(f"advantages must be [B] = [{logps.shape[0]}], got shape {tuple(advantages.shape)}")


def _ratio(logps: torch.Tensor, old_logps: torch.Tensor | None) -> torch.Tensor:
    old = logps.detach() if old_logps is None else old_logps.to(logps.dtype)
    return torch.exp(logps - old)


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
    epsilon_low: float,
    epsilon_high: float,
    loss_type: LossType,
    max_completion_length: int,
    num_items: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """The clipped GRPO objective, negated (a loss to minimise), aggregated by ``loss_type``.

    Args:
        logps: [B, T] log pi_theta of the sampled completion tokens (carries the gradient).
        old_logps: [B, T] log pi_old at sampling time, or None (on-policy: rho = 1 with gradient).
        ref_logps: [B, T] log pi_ref of the frozen reference, or None; needed when beta > 0.
        advantages: [B] A_i, one per completion (broadcast over its tokens).
        mask: [B, T] 1 for completion tokens, 0 for padding and prompt (bool or float).
        beta: weight of the k3 KL term (the paper: 0.04).
        epsilon_low / epsilon_high: the ratio is clipped to [1 - epsilon_low, 1 + epsilon_high].
        loss_type: ``grpo`` | ``bnpo`` | ``dr_grpo`` | ``dapo`` (see the module docstring).
        max_completion_length: L, dr_grpo's normaliser B * L.
        num_items: dapo's normaliser (default: this batch's mask sum, at least 1).
    Returns:
        The scalar loss in the compute dtype.
    """
    if loss_type not in get_args(LossType):
        raise ConfigError(f"loss type {loss_type!r} is not one of {', '.join(get_args(LossType))}")
    if beta != 0 and ref_logps is None:
        raise ConfigError(f"beta is {beta} but no reference log-probs were given; pass ref_logps or set beta 0")
    _check_shapes(logps, old_logps, ref_logps, advantages, mask)
    dtype = _compute_dtype(logps)
    lp = logps.to(dtype)
    m = mask.to(dtype)
    adv = advantages.to(dtype).unsqueeze(1)
    ratio = _ratio(lp, old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    if beta != 0:
        per_token = per_token + beta * k3_kl(lp, ref_logps.to(dtype))
    masked = per_token * m
    if loss_type == "grpo":
        return (masked.sum(dim=1) / m.sum(dim=1).clamp(min=1)).mean()
    if loss_type == "bnpo":
        return masked.sum() / m.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return masked.sum() / (lp.shape[0] * max_completion_length)
    norm = m.sum().clamp(min=1) if num_items is None else num_items
    return masked.sum() / norm


@torch.no_grad()
def grpo_stats(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
) -> dict[str, torch.Tensor]:
    """Diagnostics of one GRPO batch, as masked token sums (add them over micro-batches and ranks, then divide).

    A token is low-clipped when rho < 1 - epsilon_low and A < 0, high-clipped when rho > 1 + epsilon_high and
    A > 0 (the clip then removes its gradient), as TRL counts them.

    Returns:
        0-dim float32 tensors (no host sync): ``tokens`` (mask sum), ``clip_low``, ``clip_high``,
        ``clip_region`` (counts of clipped tokens), and ``kl`` (sum of the per-token k3 KL; 0 without
        ref_logps). The means are ``clip_low / tokens`` and so on.
    """
    _check_shapes(logps, old_logps, ref_logps, advantages, mask)
    lp = logps.detach().float()
    m = mask.float()
    ratio = _ratio(lp, None if old_logps is None else old_logps.detach().float())
    adv = advantages.float().unsqueeze(1)
    low = (ratio < 1 - epsilon_low) & (adv < 0)
    high = (ratio > 1 + epsilon_high) & (adv > 0)
    kl = k3_kl(lp, ref_logps.detach().float()) if ref_logps is not None else torch.zeros_like(lp)
    return {
        "tokens": m.sum(),
        "clip_low": (low * m).sum(),
        "clip_high": (high * m).sum(),
        "clip_region": ((low | high) * m).sum(),
        "kl": (kl * m).sum(),
    }


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per position, in float32 (or float64 for float64 logits).

    Args:
        logits: [B, T, V] (any float dtype).
        targets: [B, T] token ids (the token that logits[:, t] predicts).
    Returns:
        [B, T] log-probabilities. Lower-precision logits are upcast one row at a time, so the peak extra
        memory is one [T, V] float32 slice, not [B, T, V].
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ConfigError(
            f"token_logps needs logits [B, T, V] and targets [B, T], got {tuple(logits.shape)} "
            f"and {tuple(targets.shape)}"
        )
    dtype = _compute_dtype(logits)
    rows = []
    for row_logits, row_targets in zip(logits, targets):
        row = row_logits.to(dtype)
        picked = row.gather(-1, row_targets.unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(row, dim=-1))
    return torch.stack(rows)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy H = -sum_v p_v log p_v of each position's next-token distribution, [B, T, V] -> [B, T] float32.

    Computed one row at a time in float32; call it under ``torch.no_grad()`` when it is only a metric.
    """
    if logits.dim() != 3:
        raise ConfigError(f"token_entropy needs logits [B, T, V], got shape {tuple(logits.shape)}")
    dtype = _compute_dtype(logits)
    rows = []
    for row_logits in logits:
        logp = F.log_softmax(row_logits.to(dtype), dim=-1)
        rows.append(-(logp.exp() * logp).sum(dim=-1))
    return torch.stack(rows)
