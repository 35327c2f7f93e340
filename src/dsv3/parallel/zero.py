"""ZeRO-1 over plain tensors: AdamW state sharded over the data-parallel ranks (report 3.2; docs/parallel.md).

Each parameter is seen as ``[numel / last_dim, last_dim]`` (:func:`rows_shape`) and cut along its rows into
nearly equal chunks, one per rank of its group (dense parameters: ``dp``; routed experts: ``edp``); a rank
keeps only its chunks' moments (FP32 or BF16) and FP32 master copy, so the state is balanced by element
count. One :meth:`ZeroAdamW.step`: gradients summed over the group in bounded flat buckets and divided by
``dp``; one global gradient norm (identical on every rank, so clip and NaN-skip agree); the chunks updated by
:class:`dsv3.optim.AdamW` (the unsharded math, so the result is the same); the chunks all-gathered back.
Under pipeline parallelism the optimizer covers the parameters its device holds (``names``) and the norm
counts each parameter once over the pipeline (``norm_names``, ``norm_group``). The gradients are freed
before the all-gather, and a bucket of one large FP32 gradient is all-reduced in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from dsv3.errors import ConfigError
from dsv3.model.moe import Experts
from dsv3.optim.adamw import AdamW, param_groups


def row_bounds(rows: int, n: int) -> list[tuple[int, int]]:
    """Balanced dim-0 chunks ``[start, end)`` of ``rows`` rows over ``n`` ranks (sizes differ by at most 1)."""
    return [(i * rows // n, (i + 1) * rows // n) for i in range(n)]


def rows_shape(shape) -> tuple[int, int]:
    """``(rows, width)`` of the 2-D view ZeRO-1 cuts: ``[prod(shape[:-1]), shape[-1]]``; 1-d ``[n, 1]``, 0-d ``[1, 1]``."""
    shape = tuple(shape)
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], 1
    width = shape[-1]
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return rows, width


def sum_of_squares(t: torch.Tensor, width: int = 1024) -> torch.Tensor:
    """``sum(t**2)`` as a float64 0-d tensor on ``t``'s device, in one FP32 pass: FP32 norms of rows of
    ``width`` elements (short sums, relative error ~1e-7), their squares summed in float64. Within ~1e-7 of
    the float64 sum (an FP32 sum over a whole large tensor drifts by ~1e-4) at the cost of an FP32 norm,
    about 15x cheaper on a CPU than converting the tensor to float64."""
    flat = t.detach().reshape(-1)
    n = flat.numel() // width * width
    total = flat[n:].double().pow(2).sum()
    if n:
        rows = torch.linalg.vector_norm(
            flat[:n].view(-1, width), dim=1, dtype=torch.promote_types(t.dtype, torch.float32)
        )
        total = total + rows.double().pow(2).sum()
    return total


#: Parameter elements per all-reduce of :meth:`ZeroAdamW.reduce_gradients` and per all-gather of
#: :meth:`ZeroAdamW.gather_parameters` (16 MiB of FP32): their flat buffers stay this small instead of a copy of
#: all gradients or parameters of a group (a larger single parameter goes alone).
REDUCE_BUCKET_ELEMS = 1 << 22


def _buckets(shards: list, limit: int):
    """Consecutive groups of ``shards`` of at most ``limit`` parameter elements (at least one shard each)."""
    bucket, n = [], 0
    for s in shards:
        size = s.param.numel()
        if bucket and n + size > limit:
            yield bucket
            bucket, n = [], 0
        bucket.append(s)
        n += size
    if bucket:
        yield bucket


@dataclass
class _Shard:
    name: str
    param: nn.Parameter
    expert: bool
    bounds: list[tuple[int, int]]  # rows of rows_shape(param.shape) per rank of its group
    master: torch.Tensor | None  # FP32 [end-start, width] of this rank, None when the chunk is empty
    counted: bool = True  # counted in the gradient norm by this rank (pipeline: its lowest holder)
    own_master: bool = False  # FP32 parameter: ``master`` is a view of the parameter's own rows (no copy)

    def rows_view(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (shaped like the parameter) as its 2-D ``[rows, width]`` view (:func:`rows_shape`)."""
        return t.view(rows_shape(t.shape))


class ZeroAdamW:
    """AdamW with ZeRO-1 sharded state (see the module docstring).

    Args:
        model: the (expert-sharded) model; routed-expert parameters are those of
            :class:`~dsv3.model.moe.Experts` modules.
        ctx: the :class:`~dsv3.parallel.world.ParallelContext`.
        lr, betas, weight_decay, eps, moments_dtype: as :func:`dsv3.optim.build_optimizer`.
        names: the parameter names this rank trains (default: every trainable parameter); under
            pipeline parallelism the parameters of the stages this pipeline device holds.
        norm_names: the parameters this rank counts in the global gradient norm (default:
            ``names``); each parameter must be counted by exactly one device of a pipeline.
        norm_group: the process group over which the per-device squared norms are summed
            (the pipeline's ranks; None: no pipeline).

    ``param_groups`` are those of the inner AdamW over this rank's chunks (``set_lr`` works).
    """

    def __init__(
        self,
        model: nn.Module,
        ctx,
        *,
        lr: float = 2.2e-4,
        betas=(0.9, 0.95),
        weight_decay: float = 0.1,
        eps: float = 1e-8,
        moments_dtype="fp32",
        names=None,
        norm_names=None,
        norm_group=None,
    ) -> None:
        self.ctx = ctx
        self.norm_group = norm_group
        keep = set(names) if names is not None else None
        self.held = keep  # the parameter names this rank holds fresh (None: all); sharded checkpoints write only these
        counted = set(norm_names) if norm_names is not None else keep
        expert_ids = {id(p) for m in model.modules() if isinstance(m, Experts) for p in m.parameters()}
        groups = param_groups(model, weight_decay)
        if not groups:
            raise ConfigError("the model has no trainable parameters; unfreeze some before building the optimizer")
        self.shards: list[_Shard] = []
        inner_groups = []
        for group in groups:
            masters = []
            for name, p in group["params"]:
                if keep is not None and name not in keep:
                    continue
                expert = id(p) in expert_ids
                n, r = (ctx.edp, ctx.edp_rank) if expert else (ctx.dp, ctx.dp_rank)
                rows, width = rows_shape(p.shape)
                bounds = row_bounds(rows, n)
                start, end = bounds[r]
                own = p.dtype == torch.float32
                master = None
                if end > start:
                    chunk = p.detach().view(rows, width)[start:end]
                    master = chunk if own else chunk.to(torch.float32, copy=True)
                    masters.append((name, master))
                self.shards.append(
                    _Shard(name, p, expert, bounds, master, counted=counted is None or name in counted, own_master=own)
                )
            if masters:
                inner_groups.append({"params": masters, "weight_decay": group["weight_decay"]})
        if not inner_groups:  # more ranks than rows everywhere: keep a valid (empty-state) optimizer
            inner_groups = [{"params": [("_empty", torch.zeros(0))], "weight_decay": 0.0}]
        self.inner = AdamW(
            inner_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, moments_dtype=moments_dtype
        )

    # --------------------------------------------------------------- torch.optim-like surface
    @property
    def param_groups(self):
        return self.inner.param_groups

    @property
    def state(self):
        return self.inner.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        for s in self.shards:
            if set_to_none:
                s.param.grad = None
            elif s.param.grad is not None:
                s.param.grad.zero_()

    def state_bytes(self) -> int:
        """Bytes of this rank's optimizer state: FP32 master chunks (of non-FP32 parameters) and moments."""
        total = sum(s.master.numel() * 4 for s in self.shards if s.master is not None and not s.own_master)
        for st in self.inner.state.values():
            total += sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, torch.Tensor))
        return total

    # ----------------------------------------------------------------------- the step
    def _group_of(self, expert: bool):
        return self.ctx.edp_group if expert else self.ctx.dp_group

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Sum the gradients over each parameter's group and divide by ``dp`` (the last micro-batch's job).
        With ``dp = 1`` (one process, or a pipeline without data parallelism) there is nothing to do."""
        if self.ctx.dp == 1:
            return
        for expert in (False, True):
            shards = [s for s in self.shards if s.expert == expert and s.param.grad is not None]
            if not shards:
                continue
            if not (self.ctx.distributed and (self.ctx.edp if expert else self.ctx.dp) > 1):
                torch._foreach_div_([s.param.grad for s in shards], float(self.ctx.dp))  # nothing to sum (edp = 1)
                continue
            for bucket in _buckets(shards, REDUCE_BUCKET_ELEMS):  # a bounded flat buffer per all-reduce
                grad = bucket[0].param.grad
                if len(bucket) == 1 and grad.dtype == torch.float32 and grad.is_contiguous():
                    dist.all_reduce(grad, group=self._group_of(expert))  # a large gradient alone: in place, no copy
                    grad.div_(self.ctx.dp)
                    continue
                flat = torch.cat([s.param.grad.reshape(-1).to(torch.float32) for s in bucket])
                dist.all_reduce(flat, group=self._group_of(expert))
                flat.div_(self.ctx.dp)
                offset = 0
                for s in bucket:
                    n = s.param.grad.numel()
                    s.param.grad.copy_(flat[offset : offset + n].view_as(s.param.grad))
                    offset += n

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """The global L2 gradient norm (after :meth:`reduce_gradients`), identical on every rank.

        Dense parameters count once, experts are summed over the expert-parallel group and, under
        pipeline parallelism, the per-device sums over the pipeline (``norm_group``)."""
        parts: list[list[torch.Tensor]] = [[], []]  # dense, expert sums of squares (on the device: no host sync)
        for s in self.shards:
            if s.param.grad is not None and s.counted:
                parts[int(s.expert)].append(sum_of_squares(s.param.grad))
        device = self.ctx.device if self.ctx.distributed else (parts[0] or parts[1] or [torch.zeros(())])[0].device
        sq = torch.stack(
            [
                torch.stack(p).sum().to(device) if p else torch.zeros((), dtype=torch.float64, device=device)
                for p in parts
            ]
        )
        if self.ctx.distributed and self.ctx.ep > 1:
            expert_sq = sq[1:].clone()
            dist.all_reduce(expert_sq, group=self.ctx.ep_group)
            sq[1] = expert_sq[0]
        total = sq.sum().reshape(1)
        if self.norm_group is not None:
            dist.all_reduce(total, group=self.norm_group)
        norm = total.sqrt().to(torch.float32)
        if self.ctx.distributed:
            dist.all_reduce(norm, op=dist.ReduceOp.MAX)  # the same number (and decisions) everywhere
        return norm[0]

    @torch.no_grad()
    def step(
        self, max_norm: float | None = None, *, reduce: bool = True, norm: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Reduce gradients, clip to ``max_norm``, update this rank's chunks, all-gather the parameters.

        Returns the gradient norm before clipping. When it is not finite nothing is updated (the
        caller skips the step: every rank sees the same norm). After an update the gradients are
        consumed: every ``.grad`` is None before the all-gather (whose buffers then reuse their memory). ``reduce=False``: the caller already
        called :meth:`reduce_gradients`; ``norm``: its :meth:`grad_norm`, when already computed.
        """
        if reduce:
            self.reduce_gradients()
        if norm is None or reduce:
            norm = self.grad_norm()
        if not torch.isfinite(norm):
            return norm
        scale = 1.0
        if max_norm is not None and max_norm > 0:
            scale = min(1.0, max_norm / (float(norm) + 1e-6))
        for s in self.shards:
            if s.master is None or s.param.grad is None:
                if s.master is not None:
                    s.master.grad = None
                continue
            start, end = s.bounds[self.ctx.edp_rank if s.expert else self.ctx.dp_rank]
            g = s.rows_view(s.param.grad)[start:end].to(torch.float32).view_as(s.master)
            s.master.grad = g.mul_(scale) if scale != 1.0 else g  # in place: the gradients are dropped after the step
        self.inner.step()
        for s in self.shards:  # the gradients are consumed: freed before the all-gather needs its buffers
            s.param.grad = None
            if s.master is not None:
                s.master.grad = None
        self.gather_parameters()
        return norm

    @torch.no_grad()
    def gather_parameters(self) -> None:
        """Write each rank's updated chunks into the full parameters of every rank of its group."""

        for expert in (False, True):
            shards = [s for s in self.shards if s.expert == expert]
            if not shards:
                continue
            n, me = (self.ctx.edp, self.ctx.edp_rank) if expert else (self.ctx.dp, self.ctx.dp_rank)
            for s in shards:  # own chunk first (exact, whatever happens below); FP32: already in place
                if s.master is not None and not s.own_master:
                    start, end = s.bounds[me]
                    s.rows_view(s.param.data)[start:end].copy_(s.master.reshape(end - start, -1))
            if n == 1 or not self.ctx.distributed:
                continue
            for bucket in _buckets(shards, REDUCE_BUCKET_ELEMS):  # bounded gather buffers, not a copy of the group
                self._gather_bucket(bucket, n, me, self._group_of(expert))

    @staticmethod
    def _gather_bucket(shards: list[_Shard], n: int, me: int, group) -> None:
        """All-gather the ``n`` ranks' chunks of ``shards`` (rank ``me``'s included) into their parameters."""
        dtype = shards[0].param.dtype
        sizes = [
            sum((s.bounds[r][1] - s.bounds[r][0]) * rows_shape(s.param.shape)[1] for s in shards) for r in range(n)
        ]
        width = max(sizes)
        mine = torch.zeros(width, dtype=dtype, device=shards[0].param.device)
        offset = 0
        for s in shards:
            start, end = s.bounds[me]
            chunk = s.rows_view(s.param.data)[start:end].reshape(-1)
            mine[offset : offset + chunk.numel()] = chunk
            offset += chunk.numel()
        gathered = mine.new_empty(n * width)
        dist.all_gather_into_tensor(gathered, mine, group=group)
        gathered = gathered.view(n, width)
        for r in range(n):
            if r == me:
                continue
            offset = 0
            for s in shards:
                start, end = s.bounds[r]
                view = s.rows_view(s.param.data)[start:end]
                view.copy_(gathered[r, offset : offset + view.numel()].view_as(view))
                offset += view.numel()

    # ------------------------------------------------------------------ checkpoints
    def _whole_shards(self) -> list[_Shard]:
        """The shards in the inner optimizer's index order; refused unless each holds its whole parameter."""
        if self.ctx.dp != 1 or self.held is not None:
            raise ConfigError(
                "a ZeRO-1 optimizer over part of the model has no whole-model state dict; "
                "save it with dsv3.parallel.checkpoint.save_sharded"
            )
        return [s for s in self.shards if s.master is not None]

    def state_dict(self) -> dict:
        """With dp = 1 (one process): :class:`~dsv3.optim.AdamW`'s state dict, moments shaped like the
        parameters, so a one-process checkpoint reads the same whichever of the two wrote it; the FP32
        master copies of non-FP32 parameters ride along as ``state[i]["master"]``."""
        shards = self._whole_shards()
        sd = self.inner.state_dict()
        state = {}
        for i, st in sd["state"].items():
            shard = shards[i]
            st = {k: (v.view(shard.param.shape) if k in ("exp_avg", "exp_avg_sq") else v) for k, v in st.items()}
            if not shard.own_master:
                st["master"] = shard.master.view(shard.param.shape)
            state[i] = st
        return {**sd, "state": state}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Load :meth:`state_dict` (or a one-process :class:`~dsv3.optim.AdamW` state dict): dp = 1 only.
        Without saved masters, the master copies are the (already loaded) parameters."""
        shards = self._whole_shards()
        state = {}
        for i, st in state_dict["state"].items():
            shard = shards[int(i)]
            st = dict(st)
            master = st.pop("master", None)
            if master is not None and not shard.own_master:
                shard.master.copy_(master.reshape(shard.master.shape))
            state[i] = {
                k: (v.reshape(shard.master.shape) if k in ("exp_avg", "exp_avg_sq") else v) for k, v in st.items()
            }
        self.inner.load_state_dict({**state_dict, "state": state})

    @torch.no_grad()
    def import_unsharded(self, read, step: int, expert_offsets: dict[str, int]) -> None:
        """Take this rank's chunks of an unsharded AdamW state (a one-process checkpoint), reading only them.

        Args:
            read: ``read(name, kind, rows) -> tensor | None``: dim-0 ``rows`` (a slice; None: all) of
                the whole-parameter state ``kind`` (``"exp_avg"``, ``"exp_avg_sq"`` or ``"master"``) of
                parameter ``name`` (routed experts: ``[N_r, ...]`` over all experts); None when absent.
            step: the AdamW step count of the checkpoint (0: no moments yet, nothing is read).
            expert_offsets: ``{parameter name: first global expert}`` of this rank's expert blocks.
        Master weights are the saved FP32 masters of non-FP32 parameters (:meth:`state_dict`), else
        this optimizer's own (taken from the already loaded parameters).
        """
        self.inner.state.clear()
        for s in self.shards:
            if s.master is None or step == 0:
                continue
            start, end = s.bounds[self.ctx.edp_rank if s.expert else self.ctx.dp_rank]
            parts = {}
            for kind in ("exp_avg", "exp_avg_sq", "master"):
                if s.expert:
                    off = expert_offsets[s.name]
                    full = read(s.name, kind, slice(off, off + s.param.shape[0]))
                    part = None if full is None else full.reshape(rows_shape(s.param.shape))[start:end]
                elif s.param.dim() in (1, 2):  # the chunk's rows are dim-0 rows of the parameter
                    part = read(s.name, kind, slice(start, end))
                else:
                    full = read(s.name, kind, None)
                    part = None if full is None else full.reshape(rows_shape(s.param.shape))[start:end]
                if part is not None:
                    parts[kind] = part.reshape(s.master.shape)
            master = parts.pop("master", None)
            if master is not None and not s.own_master:
                s.master.copy_(master)
            if len(parts) == 2:
                self.inner.state[s.master] = {
                    "step": step,
                    **{k: v.to(self.inner.moments_dtype).clone() for k, v in parts.items()},
                }

    def sharded_state(self) -> dict[str, dict[str, torch.Tensor | int]]:
        """This rank's chunks by global parameter name: ``{name: {"rows": (start, end), "master", "exp_avg",
        "exp_avg_sq", "step"}}``; ``rows`` index the parameter's 2-D view :func:`rows_shape` (``master`` is
        ``[end - start, width]``, a view of the parameter itself for FP32 parameters)."""
        out = {}
        for s in self.shards:
            if s.master is None:
                continue
            st = self.inner.state.get(s.master, {})
            start, end = s.bounds[self.ctx.edp_rank if s.expert else self.ctx.dp_rank]
            out[s.name] = {
                "rows": (start, end),
                "master": s.master,
                "step": st.get("step", 0),
                "exp_avg": st.get("exp_avg"),
                "exp_avg_sq": st.get("exp_avg_sq"),
            }
        return out


def sync_loads(load: torch.Tensor, ctx) -> torch.Tensor:
    """Expert loads [n_moe_layers, N_r] summed over every data-parallel rank (identical everywhere)."""
    if ctx.distributed and ctx.dp > 1:
        load = load.clone()
        dist.all_reduce(load, group=ctx.dp_group)
    return load


def all_mean(values: torch.Tensor, ctx) -> torch.Tensor:
    """The mean of ``values`` over the data-parallel ranks (e.g. the step's loss sums)."""
    if ctx.distributed and ctx.dp > 1:
        values = sync_loads(values, ctx)  # the sum over dp, in a copy
        values /= ctx.dp
    return values
