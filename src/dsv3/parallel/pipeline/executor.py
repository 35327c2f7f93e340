"""The pipeline runtime: an interpreter of a schedule's per-device op lists.

:class:`PipelineRuntime` executes, on each pipeline device (one process), the op list
``Schedule.ops[device]`` of :mod:`dsv3.schedules`, exactly the list :mod:`dsv3.plan.simulate` times; it
knows nothing about 1F1B, ZB1P or DualPipe. F and BW are a stage's forward and full backward, B the input
backward (weight gradients queued, :mod:`~dsv3.parallel.pipeline.wgrad`), W the oldest queued group, FB a
forward and a full backward interleaved step by step; SEND/RECV are ``isend``/``irecv`` batched per process
group, one group per link, direction and message kind (messages of one kind match first-in first-out,
which :func:`~dsv3.schedules.validate_schedule` checks before anything runs). After the last op the
gradients of parameters several devices hold, the loss terms and the expert loads are all-reduced over
the pipeline. A device holds only its stages (:func:`~dsv3.parallel.pipeline.stages.remove_stages`);
:meth:`PipelineRuntime.evaluate` is validation's forward-only pass. Details: docs/pipeline.md ("The
interpreter").
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from dsv3.errors import ConfigError
from dsv3.layout import pipeline_devices
from dsv3.model.loss import IGNORE_INDEX
from dsv3.parallel.pipeline.stages import MicroBatch, PipelineStage, StageLayout, StageRecord, module_of, remove_stages
from dsv3.parallel.pipeline.wgrad import WeightGradStore, split_weight_grads
from dsv3.schedules import (
    BW,
    FB,
    FORWARD,
    RECV,
    SEND,
    B,
    F,
    Op,
    Schedule,
    W,
    build_schedule,
    pipeline_schedule,
    validate_schedule,
)
from dsv3.utils.io import atomic_write_text


@dataclass(frozen=True)
class TraceEvent:
    """One executed op: the op and its wall-clock start/end (seconds since the step began)."""

    op: Op
    start: float
    end: float


@dataclass
class PipelineStepResult:
    """One step through the pipeline, as every device of the pipeline sees it after the reductions.

    Attributes:
        loss, lm_loss, mtp_loss, balance_loss: the step's mean loss terms (sum over
            micro-batches of term / n_micro), equal to the single-process ones.
        load: [n_moe_layers, N_r] tokens per expert summed over the step (all stages), or None.
        trace: this device's executed ops with times (seconds since ``t0``).
        t0: ``time.perf_counter()`` when the step began (a system-wide monotonic clock on Linux,
            so traces of processes on one machine share one time axis).
    """

    loss: float
    lm_loss: float
    mtp_loss: float
    balance_loss: float
    load: torch.Tensor | None
    trace: list[TraceEvent] = field(default_factory=list)
    t0: float = 0.0


_DONE = object()


class PipelineRuntime:
    """Runs a pipeline schedule for one process (one pipeline device).

    Every process of the world must construct its runtime at the same time (the
    constructor creates process groups, a collective call).

    Args:
        model: the model, whole (the stages this device does not run are removed here) or already cut
            to this device's stages by :func:`~dsv3.parallel.pipeline.stages.select_stages`.
        schedule: schedule name (one of :data:`dsv3.layout.SCHEDULES`).
        pp: pipeline stages.
        seq_len: tokens per sequence (for the balanced split).
        pipelines: global ranks of each pipeline's devices (default: one pipeline, ranks in order).
        layers: layers per stage (default: the planner's balanced split).
        split_w: route weight gradients through the store, so that W ops are real deferred
            work (without it, B computes everything and W does nothing).
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: str,
        pp: int,
        *,
        seq_len: int,
        pipelines: list[list[int]] | None = None,
        layers: tuple[int, ...] | None = None,
        split_w: bool = True,
    ) -> None:
        self.model = model
        self.name = str(schedule).lower()
        self.pp = pp
        n_layers = model.config.num_hidden_layers
        if layers is not None and (len(layers) != pp or min(layers) < 1 or sum(layers) != n_layers):
            raise ConfigError(
                f"layers per stage {tuple(layers)} must be {pp} positive counts summing to the model's "
                f"{n_layers} layers."
            )
        rank, world = dist.get_rank(), dist.get_world_size()
        ndev = pipeline_devices(pp, self.name)
        self.template = pipeline_schedule(model.config.num_hidden_layers, self.name, pp, 2 * pp, world)
        if pipelines is None:
            pipelines = [list(range(i, i + ndev)) for i in range(0, world, ndev)]
        if any(len(p) != ndev for p in pipelines):
            raise ConfigError(f"every pipeline of {self.name} with pp={pp} needs {ndev} ranks.")
        mine = [p for p in pipelines if rank in p]
        if len(mine) != 1:
            raise ConfigError(f"rank {rank} must be in exactly one pipeline, found {len(mine)}.")
        self.ranks = mine[0]
        self.device = self.ranks.index(rank)
        self.layout = StageLayout.of(model, self.name, pp, seq_len=seq_len, layers=layers)
        self.layers = self.layout.layers
        remove_stages(model, self.layout.device_modules(self.device))
        self.stages = {
            s: PipelineStage(model, s, pp, self.layout.layer_ids(s), paths=self.layout.modules(s))
            for s in self.template.device_stages[self.device]
        }
        self.store = WeightGradStore()
        if split_w:
            for stage in self.stages.values():
                for module in stage.modules():
                    split_weight_grads(module, self.store)
        self._build_groups(pipelines)
        self._schedules: dict[int, Schedule] = {}
        self.trace_path: str | None = None

    # ------------------------------------------------------------------ groups
    def _build_groups(self, pipelines: list[list[int]]) -> None:
        """P2P groups (per link, direction and message kind), holder groups of shared parameters,
        and the pipeline group; created in the same order on every rank."""
        # Which devices hold each of this device's parameters (those of the module it belongs to).
        paths = self.layout.device_modules(self.device)
        self.holders = {n: self.layout.holders(module_of(n, paths)) for n, _ in self.model.named_parameters()}
        self.owned = sorted(self.holders)
        by_set: dict[tuple[int, ...], list[str]] = {devs: [] for devs in self.layout.shared_sets()}
        for name in self.owned:
            if len(self.holders[name]) > 1:
                by_set[self.holders[name]].append(name)
        # The lowest holder counts a parameter in the gradient norm.
        self.norm_owned = sorted(n for n in self.owned if min(self.holders[n]) == self.device)
        self._p2p: dict[tuple[int, int, str], dist.ProcessGroup] = {}
        self._shared: list[tuple[dist.ProcessGroup, list[str]]] = []
        self.group = None
        # The links the schedule sends over (adjacent devices for the built-in schedules).
        links = sorted(
            {(d, op.peer, op.direction) for d, ops in enumerate(self.template.ops) for op in ops if op.kind == SEND}
        )
        self._links = set(links)
        for ranks in pipelines:
            for src, dst, kind in links:
                g = dist.new_group([ranks[src], ranks[dst]])
                if ranks is self.ranks:
                    self._p2p[(src, dst, kind)] = g
            for devs, names in by_set.items():  # every rank creates every set's group, in one order
                g = dist.new_group([ranks[d] for d in devs])
                if ranks is self.ranks and self.device in devs:
                    self._shared.append((g, names))
            g = dist.new_group(list(ranks)) if len(pipelines) > 1 else dist.group.WORLD
            if ranks is self.ranks:
                self.group = g

    def schedule_for(self, microbatches: int) -> Schedule:
        """The validated schedule for ``microbatches`` micro-batches (built once per count)."""
        if microbatches not in self._schedules:
            schedule = build_schedule(self.name, self.pp, microbatches)
            validate_schedule(schedule)
            self._schedules[microbatches] = schedule
        return self._schedules[microbatches]

    @property
    def param_device(self) -> torch.device:
        """Where this device's parameters are (read when used: the runtime may be built on the meta device,
        before the held parameters are materialised)."""
        return next(iter(self.stages.values())).device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the parameters')."""
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())

    def _micro_batches(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[MicroBatch]:
        """``batches`` [(ids [b, T], labels [b, T])] on this device with the rotary tables, each weighted 1/n."""
        device = self.param_device
        cos, sin = self.model.model.rotary_emb(torch.arange(batches[0][0].shape[1], device=device))
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
        return [MicroBatch(ids.to(device), labels.to(device), cos, sin, 1.0 / len(batches)) for ids, labels in batches]

    # ------------------------------------------------------------------ one step
    def step(
        self, batches: list[tuple[torch.Tensor, torch.Tensor]], schedule: Schedule | None = None
    ) -> PipelineStepResult:
        """Forward and backward of the step's micro-batches ``batches`` = [(ids [b, T], labels [b, T])].

        Every device of the pipeline passes the same batches. Gradients accumulate into
        ``.grad`` of the parameters this device holds (shared ones all-reduced), as
        ``(loss / n_micro).backward()`` per micro-batch does on one process.
        ``schedule`` overrides the named schedule's op lists (validated first).
        """
        n = len(batches)
        if schedule is None:
            schedule = self.schedule_for(n)
        else:
            validate_schedule(schedule)
        if schedule.microbatches != n or schedule.devices != len(self.ranks) or schedule.pp != self.pp:
            raise ConfigError(
                f"schedule {schedule.name!r} is for {schedule.microbatches} micro-batches on "
                f"{schedule.devices} devices, not {n} on {len(self.ranks)}."
            )
        missing = {
            (d, op.peer)
            for d, ops in enumerate(schedule.ops)
            for op in ops
            if op.kind == SEND and (d, op.peer, op.direction) not in self._links
        }
        if missing:
            raise ConfigError(
                f"schedule {schedule.name!r} sends over links {sorted(missing)} that the runtime "
                f"has no process groups for (it builds them from the {self.name} op lists)."
            )
        m, device, dtype = self.model, self.param_device, self.dtype
        mbs = self._micro_batches(batches)
        records: dict[tuple[int, int], StageRecord] = {}
        data: dict[tuple[str, int, int], object] = {}  # ("act"|"grad", mb, stage) -> tensor or (buffer, works)
        sends: list = []
        pending: list[tuple[Op, dist.P2POp]] = []
        trace: list[TraceEvent] = []
        t0 = time.perf_counter()

        def key(op: Op) -> tuple[str, int, int]:
            return ("act" if op.direction == FORWARD else "grad", op.microbatch, op.stage)

        def flush() -> None:
            """Issue the collected SEND/RECVs, one batch_isend_irecv per process group."""
            by_group: dict[int, list[tuple[Op, dist.P2POp]]] = defaultdict(list)
            for op, p2p in pending:
                by_group[id(p2p.group)].append((op, p2p))
            for items in by_group.values():
                works = dist.batch_isend_irecv([p for _, p in items])
                for op, p2p in items:
                    if op.kind == SEND:
                        sends.append((p2p.tensor, works))
                    else:
                        data[key(op)] = (p2p.tensor, works)
            pending.clear()
            # Release the buffers of sends that have completed (activations must not pile up over a step).
            sends[:] = [(t, works) for t, works in sends if not all(w.is_completed() for w in works)]

        def take(k: tuple[str, int, int]) -> torch.Tensor:
            value = data.pop(k)
            if isinstance(value, tuple):
                tensor, works = value
                for w in works:
                    w.wait()
                return tensor
            return value

        def forward(mb: int, s: int):
            stage = self.stages[s]
            rec = records[(mb, s)] = StageRecord()
            x = None if s == 0 else take(("act", mb, s))
            yield from stage.forward_steps(x, mbs[mb], rec)
            if s + 1 < self.pp:
                data[("act", mb, s + 1)] = rec.output.detach()

        def backward(mb: int, s: int, split: bool):
            rec = records.pop((mb, s))
            grad = None if s == self.pp - 1 else take(("grad", mb, s))
            steps = self.stages[s].backward_steps(rec, grad, mbs[mb].scale)
            while True:
                if split:  # B: the split modules queue their weight gradients
                    with self.store.deferring():
                        done = next(steps, _DONE) is _DONE
                else:
                    done = next(steps, _DONE) is _DONE
                if done:
                    break
                yield
            if split:
                self.store.flush((mb, s))
            if s > 0:
                data[("grad", mb, s - 1)] = rec.output
            for k, part in enumerate(rec.parts):
                sums[k] += part.double() * mbs[mb].scale
            for idx, load in rec.loads.items():
                loads[idx] = load if idx not in loads else loads[idx] + load

        sums = [torch.zeros((), dtype=torch.float64, device=device) for _ in range(3)]
        loads: dict[int, torch.Tensor] = {}
        for op in schedule.ops[self.device]:
            start = time.perf_counter() - t0
            if op.kind in (SEND, RECV):
                link = (self.device, op.peer, op.direction) if op.kind == SEND else (op.peer, self.device, op.direction)
                g = self._p2p[link]
                if op.kind == SEND:
                    tensor = take(key(op)).contiguous()
                    pending.append((op, dist.P2POp(dist.isend, tensor, self.ranks[op.peer], g)))
                else:
                    ids = mbs[op.microbatch].ids
                    buf = torch.empty(ids.shape[0], ids.shape[1], m.config.hidden_size, device=device, dtype=dtype)
                    pending.append((op, dist.P2POp(dist.irecv, buf, self.ranks[op.peer], g)))
                trace.append(TraceEvent(op, start, time.perf_counter() - t0))
                continue
            flush()
            for part in op.parts():  # wait for received inputs outside the op's own time
                k = ("act", part.microbatch, part.stage) if part.kind == F else ("grad", part.microbatch, part.stage)
                if isinstance(data.get(k), tuple):
                    data[k] = take(k)
            start = time.perf_counter() - t0
            if op.kind == F:
                for _ in forward(op.microbatch, op.stage):
                    pass
            elif op.kind in (B, BW):
                for _ in backward(op.microbatch, op.stage, split=op.kind == B):
                    pass
            elif op.kind == W:
                self.store.pop((op.microbatch, op.stage))
            elif op.kind == FB:
                # Interleave the forward's and the backward's steps (one thread; DualPipe's F&B).
                fwd, bwd = forward(op.microbatch, op.stage), backward(op.b_microbatch, op.b_stage, split=False)
                active = [fwd, bwd]
                while active:
                    for gen in list(active):
                        if next(gen, _DONE) is _DONE:
                            active.remove(gen)
            else:
                raise ConfigError(f"unknown pipeline op kind {op.kind!r}.")
            trace.append(TraceEvent(op, start, time.perf_counter() - t0))
        flush()
        for _, works in sends:
            for w in works:
                w.wait()
        if records or data or len(self.store):
            raise RuntimeError(
                f"pipeline step ended with work left: {len(records)} forwards without backward, "
                f"{len(data)} unused messages, {len(self.store)} weight-gradient groups."
            )
        result = self._finish(sums, loads, trace)
        result.t0 = t0
        return result

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Forward-only pass of ``batches`` = [(ids [b, T], labels [b, T])] through the held stages.

        Every device of the pipeline passes the same batches. Returns [2] float64 on every device, reduced over
        the pipeline: the sum over the batches of L_Main x (labelled tokens), and the labelled tokens (a batch
        without labels counts zero), so the mean validation loss is their ratio, as one process's
        token-weighted ``model(ids, labels).lm_loss``.
        """
        was_training = self.model.training
        self.model.eval()
        try:
            sums = self._forward_only(self._micro_batches(batches))
        finally:
            self.model.train(was_training)
        dist.all_reduce(sums, group=self.group)
        return sums

    def _forward_only(self, mbs: list[MicroBatch]) -> torch.Tensor:
        """This device's part of :meth:`evaluate`: its stages in order (each on the lowest device holding it),
        every micro-batch of one stage before the next stage; receives block, sends are waited at the end."""
        lay, me = self.layout, self.device
        sums = torch.zeros(2, dtype=torch.float64, device=self.param_device)
        local: dict[tuple[int, int], torch.Tensor] = {}
        sends = []
        for s in [s for s in range(self.pp) if lay.eval_device(s) == me]:
            src = lay.eval_device(s - 1) if s > 0 else me
            dst = lay.eval_device(s + 1) if s + 1 < self.pp else me
            for i, mb in enumerate(mbs):
                x = local.pop((i, s), None)
                if s > 0 and src != me:
                    x = torch.empty(
                        *mb.ids.shape, self.model.config.hidden_size, dtype=self.dtype, device=self.param_device
                    )
                    dist.recv(x, self.ranks[src], group=self._p2p[(src, me, FORWARD)])
                out = self.stages[s].forward_eval(x, mb)
                if s + 1 == self.pp:
                    n = int((mb.labels != IGNORE_INDEX).sum())
                    if n:
                        sums += torch.stack([out.double() * n, out.new_tensor(n, dtype=torch.float64)])
                elif dst == me:
                    local[(i, s + 1)] = out
                else:
                    sends.append(dist.isend(out.contiguous(), self.ranks[dst], group=self._p2p[(me, dst, FORWARD)]))
        for w in sends:
            w.wait()
        return sums

    # ------------------------------------------------------------------ reductions
    def _finish(self, sums, loads, trace) -> PipelineStepResult:
        params = dict(self.model.named_parameters())
        for group, names in self._shared:
            grads = [params[n].grad if params[n].grad is not None else torch.zeros_like(params[n]) for n in names]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=group)
            offset = 0
            for n, g in zip(names, grads):
                params[n].grad = flat[offset : offset + g.numel()].view_as(g).clone()
                offset += g.numel()
        n_moe = len(self.model.moe_rows())  # every MoE layer of the model, held here or not
        device = sums[0].device
        vec = torch.stack(sums)
        load = None
        if n_moe:
            load = torch.zeros(n_moe, self.model.config.n_routed_experts, dtype=torch.float64, device=device)
            for idx, v in loads.items():
                load[idx] += v.to(torch.float64)
            vec = torch.cat([vec, load.reshape(-1)])
        dist.all_reduce(vec, group=self.group)
        lm, mtp, bal = vec[:3].tolist()
        if load is not None:
            load = vec[3:].view(n_moe, -1).round().to(torch.long)
        return PipelineStepResult(
            loss=lm + mtp + bal, lm_loss=lm, mtp_loss=mtp, balance_loss=bal, load=load, trace=trace
        )

    def grad_norm(self) -> torch.Tensor:
        """The global gradient L2 norm over all stages (each parameter counted once; FP32, 0-dim)."""
        params = dict(self.model.named_parameters())
        grads = [params[n].grad for n in self.norm_owned if params[n].grad is not None]
        sq = torch.zeros((), dtype=torch.float32, device=self.param_device)
        for g in grads:
            sq = sq + g.detach().float().pow(2).sum()
        dist.all_reduce(sq, group=self.group)
        return sq.sqrt()

    def clip_grad_norm(self, max_norm: float | None) -> torch.Tensor:
        """:func:`dsv3.train.optim.clip_grad_norm` over the whole pipeline: scale the held gradients so
        that the global norm is at most ``max_norm`` (``None``/``<= 0``: only measure) and return the
        norm before; a non-finite norm leaves the gradients untouched (the caller skips the step)."""
        norm = self.grad_norm()
        if max_norm is not None and max_norm > 0:
            scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            scale = torch.where(torch.isfinite(norm), scale, torch.ones_like(scale))
            params = dict(self.model.named_parameters())
            for n in self.owned:
                if params[n].grad is not None:
                    params[n].grad.mul_(scale.to(params[n].grad.dtype))
        return norm

    def owned_parameters(self) -> list[nn.Parameter]:
        """The parameters this device holds (give these to the optimizer)."""
        params = dict(self.model.named_parameters())
        return [params[n] for n in self.owned]


# ---------------------------------------------------------------------- traces


def chrome_trace(traces: dict[int, list[TraceEvent]]) -> dict:
    """Chrome-trace / Perfetto JSON (``{"traceEvents": [...]}``) of per-device executed ops (microseconds)."""
    events = []
    for device, trace in sorted(traces.items()):
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": device, "args": {"name": f"device {device}"}})
        for e in trace:
            if not e.op.is_compute:
                continue
            label = f"F{e.op.microbatch}&B{e.op.b_microbatch}" if e.op.kind == FB else f"{e.op.kind}{e.op.microbatch}"
            events.append(
                {
                    "name": label,
                    "cat": e.op.kind,
                    "ph": "X",
                    "pid": 0,
                    "tid": device,
                    "ts": e.start * 1e6,
                    "dur": (e.end - e.start) * 1e6,
                    "args": {"stage": e.op.stage, "chunk": e.op.chunk},
                }
            )
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(path: str, traces: dict[int, list[TraceEvent]]) -> None:
    """Write :func:`chrome_trace` to ``path`` atomically (temp file, then rename)."""
    atomic_write_text(path, json.dumps(chrome_trace(traces)))
