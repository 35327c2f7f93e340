"""AdamW as the DeepSeek-V3 report trains with it (section 4.2), with optional BF16 moments (section 3.3.2).

beta = (0.9, 0.95), decoupled weight decay 0.1 on matrices only (not norms, biases, embeddings), clipping
at norm 1.0. One step for p with gradient g at step t::

    p <- p * (1 - eta * lambda);  m <- beta_1 m + (1 - beta_1) g;  v <- beta_2 v + (1 - beta_2) g^2
    p <- p - eta / (1 - beta_1^t) * m / (sqrt(v) / sqrt(1 - beta_2^t) + eps)

With ``moments_dtype=torch.bfloat16`` m and v are stored in BF16, updated in FP32 and rounded back once a
step. Details: docs/model.md.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from dsv3.errors import ConfigError

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

# --optim-states spellings -> dtype of the stored moments.
_MOMENT_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def resolve_moments_dtype(value: str | torch.dtype) -> torch.dtype:
    """Map ``"fp32"``/``"bf16"`` (or a torch dtype) to the dtype AdamW stores its moments in."""
    if isinstance(value, torch.dtype):
        if value in (torch.float32, torch.bfloat16):
            return value
        raise ConfigError(f"optimizer moments can be stored as float32 or bfloat16, not {value}; pick one of those")
    key = str(value).lower()
    if key not in _MOMENT_DTYPES:
        raise ConfigError(f"unknown optimizer state precision {value!r}; use fp32 or bf16")
    return _MOMENT_DTYPES[key]


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """Whether the parameter called ``name`` is excluded from weight decay.

    Excluded: normalisation weights (a ``*norm*.weight`` name, e.g.
    ``model.layers.3.input_layernorm.weight``, ``mtp.0.enorm.weight``), biases
    (``*.bias`` or any parameter with fewer than two dimensions) and token
    embeddings (``*embed_tokens*``). Everything else -- attention and MLP
    matrices, the stacked expert weights ``[E, 2I, D]``, the router
    ``mlp.gate.weight``, ``lm_head.weight`` -- is decayed.
    """
    leaf = name.rsplit(".", 2)
    module_name = leaf[-2] if len(leaf) >= 2 else ""
    if "embed_tokens" in name:
        return True
    if name.endswith(".bias") or name == "bias":
        return True
    if "norm" in module_name.lower() and name.endswith(".weight"):
        return True
    return param.ndim < 2


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split the trainable parameters of ``model`` into a decayed and a non-decayed group.

    Args:
        model: the model; parameters with ``requires_grad=False`` are skipped
            (buffers such as the router bias ``e_score_correction_bias`` are
            not parameters and never reach the optimizer).
        weight_decay: lambda of the decayed group.

    Returns:
        Two groups (empty groups are left out) in the form torch optimizers
        accept: ``{"params": [(name, tensor), ...], "weight_decay": lambda}`` and
        ``{"params": [...], "weight_decay": 0.0}``; the optimizer records the
        names as ``param_names``. See :func:`is_no_decay` for the rule.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if is_no_decay(name, param) else decay).append((name, param))
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": float(weight_decay)})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class AdamW(torch.optim.Optimizer):
    """AdamW with decoupled weight decay, bias correction and FP32 or BF16 moment storage.

    Args:
        params: tensors, ``(name, tensor)`` pairs or parameter groups (dicts).
        lr: learning rate eta (the training loop sets ``group["lr"]`` each step
            from the schedule, see :func:`set_lr`).
        betas: (beta_1, beta_2); the report uses (0.9, 0.95).
        eps: added to ``sqrt(v_hat)``.
        weight_decay: lambda; decoupled (``p <- p * (1 - lr * lambda)``).
        moments_dtype: dtype the moments m, v are *stored* in: ``torch.float32``
            (default) or ``torch.bfloat16``. The update math is FP32 either way.

    Parameters of another floating dtype than FP32 are updated in FP32 and
    rounded back; FP32 master weights are what the recipe intends.

    State per parameter: ``step`` (a Python int), ``exp_avg`` (m) and
    ``exp_avg_sq`` (v), tensors of ``moments_dtype`` shaped like the parameter.
    :meth:`state_dict` / :meth:`load_state_dict` round-trip exactly; loading
    casts the moments to this optimizer's ``moments_dtype`` (a no-op when the
    saved run used the same precision).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 2.2e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        *,
        moments_dtype: str | torch.dtype = torch.float32,
    ) -> None:
        _check_hparams(lr, betas, eps, weight_decay)
        self.moments_dtype = resolve_moments_dtype(moments_dtype)
        defaults = {
            "lr": float(lr),
            "betas": (float(betas[0]), float(betas[1])),
            "eps": float(eps),
            "weight_decay": float(weight_decay),
        }
        super().__init__(params, defaults)
        self._compiled_ok = True

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """Take one optimizer step on every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict[str, Any]) -> None:
        """One AdamW step of ``group``: torch's fused kernel (FP32), a compiled kernel per tensor (BF16 moments),
        else multi-tensor FP32 arithmetic on working copies."""
        tensors = self._group_state(group)
        if not tensors[0]:
            return
        hyper = (group["lr"], *group["betas"], group["eps"], group["weight_decay"])
        if self._fusable(*tensors[:4]):
            self._step_fused(*tensors, *hyper)
        elif not self._step_compiled(*tensors, *hyper):
            self._step_foreach(*tensors, *hyper)

    def _group_state(self, group: dict[str, Any]) -> tuple[list, list, list, list, list[int]]:
        """``(params, grads, m, v, steps)`` of the parameters of ``group`` that have a gradient (state created
        on first use, steps counted)."""
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("dsv3 AdamW does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, dtype=self.moments_dtype, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moments_dtype, memory_format=torch.preserve_format)
            state["step"] += 1
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        return params, grads, exp_avgs, exp_avg_sqs, steps

    @staticmethod
    def _step_fused(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, wd) -> None:
        """FP32 everywhere: torch's fused multi-tensor AdamW kernel (one pass over memory), the same update as
        :meth:`_step_foreach`: decoupled decay, m <- lerp, v <- beta_2 v + (1-beta_2) g^2, bias corrections."""
        state_steps = [torch.tensor(float(t), device=params[0].device) for t in steps]
        torch._fused_adamw_(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            state_steps,
            amsgrad=False,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=wd,
            eps=eps,
            maximize=False,
            grad_scale=None,
            found_inf=None,
        )

    def _step_compiled(self, params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, wd) -> bool:
        """BF16 moments with FP32 parameters: a compiled kernel per tensor; False where it does not apply."""
        if (
            self._compiled_ok
            and self.moments_dtype != torch.float32
            and all(p.dtype == torch.float32 and g.dtype == torch.float32 for p, g in zip(params, grads))
        ):
            # Low-precision moments: one fused elementwise kernel per tensor (torch.compile), reading
            # the BF16 moments, updating in FP32 and writing them back rounded, in a single pass.
            kernel = _compiled_adamw_update()
            try:
                for p, g, m, v, t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
                    kernel(
                        p.view(-1),
                        g.reshape(-1),
                        m.view(-1),
                        v.view(-1),
                        lr,
                        beta1,
                        beta2,
                        wd,
                        eps,
                        1.0 - beta1**t,
                        math.sqrt(1.0 - beta2**t),
                    )
                return True
            except Exception:  # no compiler on this machine: the multi-tensor path, from now on
                if p is not params[0]:
                    raise  # a failure after some tensors were updated must not be retried
                self._compiled_ok = False
        return False

    @staticmethod
    def _step_foreach(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, wd) -> None:
        """Multi-tensor FP32 arithmetic on working copies, rounded back into the stored tensors."""
        # FP32 working copies where the stored tensor is not FP32 (BF16 moments, low-precision params).
        fp32 = torch.float32
        p32 = [p if p.dtype == fp32 else p.float() for p in params]
        g32 = [g if g.dtype == fp32 else g.float() for g in grads]
        m32 = [m if m.dtype == fp32 else m.float() for m in exp_avgs]
        v32 = [v if v.dtype == fp32 else v.float() for v in exp_avg_sqs]

        if wd != 0.0:
            torch._foreach_mul_(p32, 1.0 - lr * wd)
        torch._foreach_lerp_(m32, g32, 1.0 - beta1)  # m <- m + (1 - beta_1)(g - m)
        torch._foreach_mul_(v32, beta2)
        torch._foreach_addcmul_(v32, g32, g32, value=1.0 - beta2)

        step_sizes = [-lr / (1.0 - beta1**t) for t in steps]
        bc2_sqrt = [math.sqrt(1.0 - beta2**t) for t in steps]
        denom = torch._foreach_sqrt(v32)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(p32, m32, denom, step_sizes)

        # Round the FP32 working values back into the stored tensors (round to nearest even).
        for stored, work in ((params, p32), (exp_avgs, m32), (exp_avg_sqs, v32)):
            pairs = [(s, w) for s, w in zip(stored, work) if s is not w]
            if pairs:
                torch._foreach_copy_([s for s, _ in pairs], [w for _, w in pairs])

    @staticmethod
    def _fusable(*tensor_lists: list[torch.Tensor]) -> bool:
        if not hasattr(torch, "_fused_adamw_"):
            return False
        first = tensor_lists[0][0]
        return all(
            t.dtype == torch.float32 and t.device == first.device and t.device.type in ("cpu", "cuda")
            for tensors in tensor_lists
            for t in tensors
        )

    def state_dict(self) -> dict[str, Any]:
        """The torch optimizer state dict plus ``moments_dtype`` (a string) for the record."""
        sd = super().state_dict()
        sd["moments_dtype"] = str(self.moments_dtype).removeprefix("torch.")
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict`; moments end up in this optimizer's ``moments_dtype``."""
        state_dict = dict(state_dict)
        state_dict.pop("moments_dtype", None)
        super().load_state_dict(state_dict)
        # torch casts floating state to the parameter dtype on load; put the moments back.
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state and state[key].dtype != self.moments_dtype:
                    state[key] = state[key].to(self.moments_dtype)
            if "step" in state and isinstance(state["step"], torch.Tensor):
                state["step"] = int(state["step"].item())


def _adamw_update_1d(
    p, g, m, v, lr: float, beta1: float, beta2: float, wd: float, eps: float, bc1: float, bc2_sqrt: float
) -> None:
    """In place on flat tensors: the AdamW step of :class:`AdamW` with moments stored in ``m.dtype``."""
    m32 = m.float().lerp(g, 1.0 - beta1)
    v32 = v.float() * beta2 + (1.0 - beta2) * g * g
    p.copy_(p * (1.0 - lr * wd) - (lr / bc1) * m32 / (v32.sqrt() / bc2_sqrt + eps))
    m.copy_(m32)
    v.copy_(v32)


@functools.lru_cache(maxsize=1)
def _compiled_adamw_update():
    """:func:`_adamw_update_1d` compiled once for every tensor length (dynamic shapes, float scalars)."""
    return torch.compile(_adamw_update_1d, fullgraph=True, dynamic=True)


def _check_hparams(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise ConfigError(f"learning rate must be a finite number >= 0, got {lr!r}")
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"AdamW betas must be two numbers in [0, 1), got {betas!r}")
    if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
        raise ConfigError(f"AdamW eps must be a finite number > 0, got {eps!r}")
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise ConfigError(f"weight decay must be a finite number >= 0, got {weight_decay!r}")


def build_optimizer(
    model: nn.Module,
    lr: float = 2.2e-4,
    betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.1,
    eps: float = 1e-8,
    moments_dtype: str | torch.dtype = torch.float32,
) -> AdamW:
    """The report's optimizer for ``model``: :class:`AdamW` over :func:`param_groups`.

    ``moments_dtype`` accepts ``"fp32"``/``"bf16"`` (the ``--optim-states`` values) or a dtype.
    """
    groups = param_groups(model, weight_decay)
    if not groups:
        raise ConfigError("the model has no trainable parameters; unfreeze some before building the optimizer")
    return AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, moments_dtype=moments_dtype)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group (called each step with the schedule's value)."""
    for group in optimizer.param_groups:
        group["lr"] = float(lr)


@torch.no_grad()
def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Clip the global L2 norm of the gradients to ``max_norm`` and return the norm *before* clipping.

    Args:
        params: parameters (those without a gradient are ignored).
        max_norm: the clip threshold (the report: 1.0); ``None`` or ``<= 0`` only measures.

    Returns:
        A 0-dim FP32 tensor on the gradients' device (no host sync here). When it
        is not finite (``not torch.isfinite(norm)``) the gradients are left
        untouched so the caller can skip the step (the NaN-skip logic) rather than
        spread NaN into the weights.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, error_if_nonfinite=False, foreach=None).float()
    if max_norm is not None and max_norm > 0:
        # scale = min(1, max_norm / (norm + 1e-6)); a non-finite norm gives scale 1 (nothing changes).
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        scale = torch.where(torch.isfinite(total), scale, torch.ones_like(scale))
        by_device: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for g in grads:
            by_device.setdefault((g.device, g.dtype), []).append(g)
        for (device, dtype), gs in by_device.items():
            torch._foreach_mul_(gs, scale.to(device=device, dtype=dtype))
    return total


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (moments; the memory report uses it)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total
