"""Models built on the ``meta`` device: give their tensors storage without breaking ties."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Give every ``meta`` parameter and buffer of ``model`` uninitialised storage on ``device`` (in place).

    Unlike ``nn.Module.to_empty`` it keeps tied parameters tied (a tied ``lm_head`` and embedding,
    a module shared by two parents) and every Parameter's ``requires_grad``; tensors already on a real
    device are left alone. The caller initialises the values and rebuilds non-persistent buffers
    (the rotary tables). Returns ``model``.
    """
    made: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is None or not t.is_meta:
                    continue
                if id(t) not in made:
                    new = torch.empty(t.shape, dtype=t.dtype, device=device)
                    made[id(t)] = (
                        nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
                    )
                table[name] = made[id(t)]
    return model
