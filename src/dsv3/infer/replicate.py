"""Applying an EPLB placement to a model: physical experts with replicas (report 3.4).

:func:`apply_placement` turns each MoE layer's N_r logical experts into R physical
slots, ``phy2log[s]`` holding a copy of logical expert ``phy2log[s]``'s weights, and
wraps its router in a :class:`ReplicatedRouter`: the router still selects logical
experts (same scores, same gates), then each (token, expert) pair is sent to one of
that expert's replicas, round robin in token order, so a replicated expert's tokens
split evenly among its replicas. Every replica computes the same function, so the
model's output is unchanged. With expert parallelism the placement also decides which
rank holds which slots (slot s on GPU ``s // (R / num_gpus)``).

The model's :class:`~dsv3.model.moe.MoE` code is untouched: it sees R experts and a
router that returns physical indices.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from dsv3.errors import ConfigError, DataError
from dsv3.model import DeepseekV3ForCausalLM


class ReplicatedRouter(nn.Module):
    """The logical router followed by the replica choice.

    Args:
        router: the layer's :class:`~dsv3.model.moe.Router` (kept as ``self.router``).
        log2phy: [N_r, C] physical slots of each logical expert (-1 padded).
        logcnt: [N_r] replicas per logical expert.
    ``forward(x)`` returns (gates [N, K_r], physical slots [N, K_r], logical scores [N, N_r]).
    """

    def __init__(self, router: nn.Module, log2phy: torch.Tensor, logcnt: torch.Tensor) -> None:
        super().__init__()
        self.router = router
        self.register_buffer("log2phy", log2phy.clone(), persistent=False)
        self.register_buffer("logcnt", logcnt.clone(), persistent=False)
        self.n_experts = int((log2phy >= 0).sum())  # physical slots (R): what the MoE layer dispatches to
        self.top_k = router.top_k

    @property
    def e_score_correction_bias(self) -> torch.Tensor | None:
        """The logical router's bias b_i [N_r] (routing still ranks logical experts)."""
        return self.router.e_score_correction_bias

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        weights, indices, scores = self.router(x)
        with torch.no_grad():
            flat = indices.reshape(-1)
            n_log = self.logcnt.shape[0]
            order = flat.argsort(stable=True)  # pairs grouped by expert, token order within
            counts = torch.bincount(flat, minlength=n_log)
            first = counts.cumsum(0) - counts
            rank = torch.empty_like(flat)
            rank[order] = torch.arange(flat.numel(), device=flat.device) - first[flat[order]]
            replica = rank % self.logcnt[flat]  # the k-th token of expert e goes to replica k mod count
            physical = self.log2phy[flat, replica].view_as(indices)
        return weights, physical, scores


@torch.no_grad()
def apply_placement(
    model: DeepseekV3ForCausalLM, phy2log: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor
) -> DeepseekV3ForCausalLM:
    """Give every MoE layer of ``model`` (in :meth:`~dsv3.model.DeepseekV3ForCausalLM.moe_layers` order)
    its physical experts, in place. ``phy2log`` [L, R], ``log2phy`` [L, N_r, C], ``logcnt`` [L, N_r] as
    returned by :func:`dsv3.infer.eplb.rebalance_experts`. A placement that also covers the MTP modules'
    layers applies to a model without them (its first rows). Returns ``model``."""
    moes = model.moe_layers()
    phy2log, log2phy, logcnt = (torch.as_tensor(t, dtype=torch.long) for t in (phy2log, log2phy, logcnt))
    cfg = model.config
    mtp_moes = sum(cfg.is_moe_layer(cfg.num_hidden_layers + k) for k in range(cfg.num_nextn_predict_layers))
    if len(model.mtp) == 0 and phy2log.dim() == 2 and phy2log.shape[0] == len(moes) + mtp_moes:
        # a placement computed with the MTP modules' layers (speculative serving) for a model without them
        phy2log, log2phy, logcnt = phy2log[: len(moes)], log2phy[: len(moes)], logcnt[: len(moes)]
    if phy2log.dim() != 2 or phy2log.shape[0] != len(moes):
        raise ConfigError(
            f"the placement has {phy2log.shape[0] if phy2log.dim() == 2 else '?'} layers, "
            f"the model {len(moes)} MoE layers"
        )
    n_log = model.config.n_routed_experts
    if logcnt.shape != (len(moes), n_log) or log2phy.shape[:2] != (len(moes), n_log):
        raise ConfigError(f"the placement is for a different number of experts than the model's {n_log}")
    if bool((phy2log < 0).any() | (phy2log >= n_log).any()) or bool((logcnt < 1).any()):
        raise ConfigError("the placement is malformed: a slot holds no expert or an expert has no replica")
    for moe, p2l, l2p, cnt in zip(moes, phy2log, log2phy, logcnt):
        if isinstance(moe.gate, ReplicatedRouter):
            raise ConfigError("the model already has a placement applied")
        experts = moe.experts
        device = experts.gate_up_proj.device
        p2l = p2l.to(device)
        experts.gate_up_proj = nn.Parameter(experts.gate_up_proj.detach()[p2l].clone(), requires_grad=False)
        experts.down_proj = nn.Parameter(experts.down_proj.detach()[p2l].clone(), requires_grad=False)
        moe.gate = ReplicatedRouter(moe.gate, l2p.to(device), cnt.to(device))
        moe.n_experts = p2l.numel()
        dispatcher = getattr(moe, "dispatcher", None)  # a token dispatcher seam, where the MoE layer has one
        if dispatcher is not None and hasattr(dispatcher, "n_experts"):
            dispatcher.n_experts = p2l.numel()
    return model


def read_placement(path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(phy2log, log2phy, logcnt) from a ``dsv3 eplb --json`` file."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        return tuple(torch.tensor(data[k], dtype=torch.long) for k in ("phy2log", "log2phy", "logcnt"))
    except FileNotFoundError:
        raise DataError(f"no placement file at {path}; write one with dsv3 eplb --json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, RuntimeError):
        raise DataError(f"{path} is not a placement written by dsv3 eplb --json") from None
