"""Redundant-expert placement for expert-parallel serving (report 3.4; the deepseek-ai/EPLB interface).

:func:`rebalance_experts` takes per-layer expert loads ``weight`` [L, E] and chooses R >= E physical
slots, the replicas of each logical expert and the GPU of each slot, minimising the busiest GPU's load (a
replica carries ``load / count``). Policies: hierarchical (groups packed onto nodes, then replicas onto
GPUs) when the groups divide over the nodes, else global. ``policy="published"`` re-implements
deepseek-ai/EPLB's greedy packing; the default ``"refined"`` adds a swap search and is never less balanced.
Outputs: ``phy2log`` [L, R], ``log2phy`` [L, E, max count] (-1 padded), ``logcnt`` [L, E].
The algorithm step by step: docs/inference.md.
"""

from __future__ import annotations

import json
import os
from typing import Literal

import torch

from dsv3.errors import ConfigError, DataError
from dsv3.utils.io import json_lines

Policy = Literal["refined", "published"]


# --------------------------------------------------------------------------- the published steps
def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy equal-count packing (published): items in decreasing weight, each to the lightest pack
    that still has room. ``weight`` [X, n] -> ``pack_index``, ``rank_in_pack`` [X, n] (int64)."""
    rows, n = weight.shape
    per_pack = n // num_packs
    if per_pack == 1:
        return (torch.arange(n, dtype=torch.int64).expand(rows, n).clone(), torch.zeros(rows, n, dtype=torch.int64))
    order = weight.float().sort(-1, descending=True).indices
    pack_index = torch.full((rows, n), -1, dtype=torch.int64)
    rank_in_pack = torch.full((rows, n), -1, dtype=torch.int64)
    for r in range(rows):
        loads = [0.0] * num_packs
        counts = [0] * num_packs
        for item in order[r].tolist():
            pack = min((p for p in range(num_packs) if counts[p] < per_pack), key=loads.__getitem__)
            pack_index[r, item] = pack
            rank_in_pack[r, item] = counts[pack]
            loads[pack] += float(weight[r, item])
            counts[pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight: torch.Tensor, num_phy: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give ``num_phy`` slots to the ``n`` experts of each row of ``weight`` [X, n]: one each, then every
    extra slot to the expert with the largest ``weight / count`` (this minimises the largest replica load).
    Returns ``phy2log`` [X, num_phy], ``rank`` [X, num_phy] (replica number), ``logcnt`` [X, n]."""
    rows, n = weight.shape
    phy2log = torch.arange(num_phy, dtype=torch.int64).repeat(rows, 1)
    rank = torch.zeros(rows, num_phy, dtype=torch.int64)
    logcnt = torch.ones(rows, n, dtype=torch.int64)
    every = torch.arange(rows)
    for slot in range(n, num_phy):
        heaviest = (weight / logcnt).max(dim=-1).indices
        phy2log[:, slot] = heaviest
        rank[:, slot] = logcnt[every, heaviest]
        logcnt[every, heaviest] += 1
    return phy2log, rank, logcnt


# --------------------------------------------------------------------------- the refinement
def refine_packing(
    weight: torch.Tensor, pack_index: torch.Tensor, num_packs: int, max_swaps: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exchange local search on an equal-count packing: repeatedly swap one item of the busiest pack with
    one item of another pack when that lowers the larger of their two loads, taking the swap that lowers
    it most; stop when the busiest pack admits none. Never raises the largest pack load.

    ``weight``, ``pack_index`` [X, n]. Returns the new ``pack_index`` and ``rank_in_pack`` [X, n]."""
    rows, n = weight.shape
    w_all = weight.double()
    out = pack_index.clone()
    limit = max_swaps if max_swaps is not None else 4 * n
    for r in range(rows):
        w, pack = w_all[r], out[r]
        loads = torch.zeros(num_packs, dtype=torch.float64).index_add_(0, pack, w)
        tol = 1e-9 * max(float(w.abs().max()), 1.0)
        for _ in range(limit):
            h = int(loads.argmax())
            mine = (pack == h).nonzero().squeeze(-1)
            others = (pack != h).nonzero().squeeze(-1)
            if mine.numel() == 0 or others.numel() == 0:
                break
            delta = w[mine][:, None] - w[others][None, :]  # load moved from h to the other pack
            other_load = loads[pack[others]][None, :]
            new_max = torch.maximum(loads[h] - delta, other_load + delta)
            gain = torch.where(delta > tol, loads[h] - new_max, torch.full_like(delta, -1.0))
            best = int(gain.argmax())
            if float(gain.view(-1)[best]) <= tol:
                break
            a, b = mine[best // others.numel()], others[best % others.numel()]
            g = int(pack[b])
            d = float(w[a] - w[b])
            loads[h] -= d
            loads[g] += d
            pack[a], pack[b] = g, h
    return out, _ranks(out, num_packs)


def _ranks(pack_index: torch.Tensor, num_packs: int) -> torch.Tensor:
    """The position of each item within its pack, in item order."""
    rank = torch.empty_like(pack_index)
    for r in range(pack_index.shape[0]):
        seen = [0] * num_packs
        for i, p in enumerate(pack_index[r].tolist()):
            rank[r, i] = seen[p]
            seen[p] += 1
    return rank


# --------------------------------------------------------------------------- the policies
def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv.scatter_(1, perm, torch.arange(perm.shape[1], dtype=torch.int64).expand(perm.shape))
    return inv


def _hierarchical(
    weight: torch.Tensor,
    num_phy: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    refine_nodes: bool,
    refine_gpus: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groups -> nodes, replicas within nodes, replicas -> GPUs. Returns phy2log, phy_rank, logcnt."""
    layers, n_log = weight.shape
    group_size = n_log // num_groups
    groups_per_node = num_groups // num_nodes
    slots_per_gpu = num_phy // num_gpus
    # (1) pack groups onto nodes
    group_load = weight.unflatten(-1, (num_groups, group_size)).sum(-1)
    node_of_group, rank_of_group = balanced_packing(group_load, num_nodes)
    if refine_nodes and groups_per_node > 1:
        node_of_group, rank_of_group = refine_packing(group_load, node_of_group, num_nodes)
    # node-major ("middle") logical order: node 0's groups first
    log2mlog = (
        ((node_of_group * groups_per_node + rank_of_group) * group_size).unsqueeze(-1) + torch.arange(group_size)
    ).flatten(-2)
    mlog2log = _inverse(log2mlog)
    # (2) replicate within each node: rows are (layer, node)
    mlog_load = weight.gather(-1, mlog2log).view(-1, n_log // num_nodes)
    phy2mlog, phy_rank, mlogcnt = replicate_experts(mlog_load, num_phy // num_nodes)
    # (3) pack each node's replicas onto its GPUs
    replica_load = (mlog_load / mlogcnt).gather(-1, phy2mlog)
    gpus_per_node = num_gpus // num_nodes
    gpu_of, rank_on_gpu = balanced_packing(replica_load, gpus_per_node)
    if refine_gpus and slots_per_gpu > 1:
        gpu_of, rank_on_gpu = refine_packing(replica_load, gpu_of, gpus_per_node)
    pphy2phy = _inverse(gpu_of * slots_per_gpu + rank_on_gpu)
    pphy2mlog = phy2mlog.gather(-1, pphy2phy)
    pphy2mlog = (
        pphy2mlog.view(layers, num_nodes, -1) + torch.arange(0, n_log, n_log // num_nodes).view(1, -1, 1)
    ).flatten(-2)
    phy2log = mlog2log.gather(-1, pphy2mlog)
    rank = phy_rank.gather(-1, pphy2phy).view(layers, -1)
    logcnt = mlogcnt.view(layers, -1).gather(-1, log2mlog)
    return phy2log, rank, logcnt


def _check_layout(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> None:
    if weight.dim() != 2 or weight.numel() == 0:
        raise ConfigError(f"expert loads must be a non-empty [layers, experts] table, got shape {tuple(weight.shape)}")
    if not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()):
        raise ConfigError("expert loads must be finite and non-negative")
    n_log = weight.shape[1]
    for name, value in (("replicas", num_replicas), ("groups", num_groups), ("nodes", num_nodes), ("gpus", num_gpus)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"the number of {name} must be a positive integer, got {value!r}")
    if num_replicas < n_log:
        raise ConfigError(f"{num_replicas} replicas cannot hold {n_log} experts; pass --replicas >= {n_log}")
    if num_gpus % num_nodes:
        raise ConfigError(f"{num_gpus} GPUs do not divide over {num_nodes} nodes")
    if num_replicas % num_gpus:
        raise ConfigError(f"{num_replicas} replicas do not divide over {num_gpus} GPUs")
    if n_log % num_groups:
        raise ConfigError(f"{n_log} experts do not divide into {num_groups} groups")


def is_hierarchical(num_groups: int, num_nodes: int) -> bool:
    """Whether :func:`rebalance_experts` uses the hierarchical policy (groups divide over nodes)."""
    return num_groups % num_nodes == 0


def rebalance_experts(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    policy: Policy = "refined",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Place ``num_replicas`` expert replicas on ``num_gpus`` GPUs of ``num_nodes`` nodes.

    Args:
        weight: [L, E] load of each logical expert (tokens), per MoE layer.
        num_replicas: R, physical expert slots per layer (a multiple of ``num_gpus``, >= E).
        num_groups: expert groups (``n_group``); hierarchical when they divide over the nodes.
        num_nodes, num_gpus: the cluster (``num_gpus`` a multiple of ``num_nodes``).
        policy: "refined" (default, never less balanced) or "published" (deepseek-ai/EPLB).
    Returns:
        ``phy2log`` [L, R], ``log2phy`` [L, E, max count] (-1 padded), ``logcnt`` [L, E] (int64, CPU).
    """
    weight = torch.as_tensor(weight).float().cpu()
    _check_layout(weight, num_replicas, num_groups, num_nodes, num_gpus)
    if policy not in ("refined", "published"):
        raise ConfigError(f"unknown EPLB policy {policy!r}; use 'refined' or 'published'")
    if not is_hierarchical(num_groups, num_nodes):
        num_groups = num_nodes = 1  # the global policy
    if (num_replicas // num_nodes) < weight.shape[1] // num_nodes:
        raise ConfigError("every node needs at least one slot per expert of its groups")
    phy2log, rank, logcnt = _hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus, False, False)
    if policy == "refined":
        best = gpu_loads(weight, phy2log, logcnt, num_gpus).amax(-1)
        for refine_nodes in (False, True):
            cand = _hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus, refine_nodes, True)
            peak = gpu_loads(weight, cand[0], cand[2], num_gpus).amax(-1)
            better = peak < best * (1 - 1e-9)
            if bool(better.any()):
                phy2log, rank, logcnt = (
                    torch.where(better[:, None], new, old) for new, old in zip(cand, (phy2log, rank, logcnt))
                )
                best = torch.where(better, peak, best)
    return phy2log, _log2phy(phy2log, rank, logcnt), logcnt


def _log2phy(phy2log: torch.Tensor, rank: torch.Tensor, logcnt: torch.Tensor) -> torch.Tensor:
    layers, n_log = logcnt.shape
    width = int(logcnt.max())
    log2phy = torch.full((layers, n_log, width), -1, dtype=torch.int64)
    log2phy.view(layers, -1).scatter_(
        -1, phy2log * width + rank, torch.arange(phy2log.shape[1], dtype=torch.int64).expand(layers, -1)
    )
    return log2phy


# --------------------------------------------------------------------------- measuring a placement
def gpu_loads(weight: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """[L, num_gpus] tokens each GPU serves when every expert's load is split evenly over its replicas."""
    weight = torch.as_tensor(weight).double()
    per_replica = (weight / logcnt).gather(-1, phy2log)
    return per_replica.view(weight.shape[0], num_gpus, -1).sum(-1)


def unreplicated_gpu_loads(weight: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """[L, num_gpus] GPU loads without redundancy: experts 0..E-1 laid out in contiguous blocks, as even
    as possible (the first E mod num_gpus GPUs hold one more): the "before" of ``dsv3 eplb``."""
    weight = torch.as_tensor(weight).double()
    return torch.stack([block.sum(-1) for block in torch.tensor_split(weight, num_gpus, dim=-1)], dim=-1)


def imbalance(loads: torch.Tensor) -> torch.Tensor:
    """max / mean GPU load per layer ([L]); 1.0 is perfect balance (and the value for an idle layer)."""
    mean = loads.mean(-1)
    return torch.where(mean > 0, loads.amax(-1) / mean.clamp_min(1e-30), torch.ones_like(mean))


def check_placement(
    phy2log: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    *,
    num_experts: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
) -> None:
    """Raise AssertionError unless the placement is valid: every slot holds a logical expert, every expert
    has >= 1 replica, the three tables agree, and (hierarchical) all replicas of a group share one node."""
    layers, num_phy = phy2log.shape
    assert logcnt.shape == (layers, num_experts)
    assert bool(((phy2log >= 0) & (phy2log < num_experts)).all()), "a slot holds no valid expert"
    assert bool((logcnt >= 1).all()), "an expert has no replica"
    assert int(logcnt.sum(-1).unique().numel()) == 1 and int(logcnt.sum(-1)[0]) == num_phy, "slots are not all used"
    counts = torch.zeros_like(logcnt).scatter_add_(1, phy2log, torch.ones_like(phy2log))
    assert torch.equal(counts, logcnt), "logcnt disagrees with phy2log"
    for layer in range(layers):
        for e in range(num_experts):
            slots = log2phy[layer, e]
            real = slots[slots >= 0]
            assert real.numel() == int(logcnt[layer, e]) and bool((phy2log[layer, real] == e).all())
            assert bool((slots[int(logcnt[layer, e]) :] == -1).all())
    if is_hierarchical(num_groups, num_nodes):
        node = torch.arange(num_phy) // (num_phy // num_nodes)
        group_of = phy2log // (num_experts // num_groups)
        for layer in range(layers):
            for g in range(num_groups):
                nodes = node[group_of[layer] == g].unique()
                assert nodes.numel() == 1, f"layer {layer}: group {g} spans nodes {nodes.tolist()}"


# --------------------------------------------------------------------------- reading loads
def read_expert_loads(path) -> torch.Tensor:
    """Per-layer expert loads [L, E] (float64) from a file:

    * a training run's ``metrics.jsonl`` (or its run directory): the sum of its ``expert_load`` records;
    * a ``dsv3 generate --stats`` JSON file (its ``expert_load``);
    * a plain JSON array [layers][experts].
    Raises DataError for anything else.
    """
    path = os.fspath(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "metrics.jsonl")):
        path = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(path):
        raise DataError(f"no expert-load file at {path}; pass a metrics.jsonl, a --stats JSON file or a JSON array")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    tables = []
    try:
        data = json.loads(text)
        tables.append(data.get("expert_load") if isinstance(data, dict) else data)
    except json.JSONDecodeError:  # JSON lines
        bad = lambda n, _msg: f"{path} line {n} is not JSON; expected metrics.jsonl records"  # noqa: E731
        for _, record in json_lines(text.splitlines(), bad):
            if isinstance(record, dict) and record.get("expert_load") is not None:
                tables.append(record["expert_load"])
    tables = [t for t in tables if t is not None]
    if not tables:
        raise DataError(f"{path} holds no expert loads (train with MoE layers, or generate with --stats)")
    try:
        loads = [torch.tensor(t, dtype=torch.float64) for t in tables]
        total = torch.stack(loads).sum(0)
    except (TypeError, ValueError, RuntimeError):
        raise DataError(
            f"{path} holds malformed expert loads; expected [layers][experts] numbers of one shape"
        ) from None
    if total.dim() != 2 or total.numel() == 0 or not bool(torch.isfinite(total).all()) or bool((total < 0).any()):
        raise DataError(f"{path} holds malformed expert loads; expected a non-negative [layers][experts] table")
    return total
