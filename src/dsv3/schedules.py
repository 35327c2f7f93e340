"""Pipeline-parallel schedules as data: the per-device op lists of 1F1B, ZB1P, DualPipe and DualPipeV.

The single definition of every schedule (torch-free, on the bottom floor beside :mod:`dsv3.layout`,
whose :func:`~dsv3.layout.check_layout` says which ``pp`` and micro-batch counts a schedule runs).
The planner's simulator (:mod:`dsv3.plan.simulate`) times these lists and the runtime
(:mod:`dsv3.parallel.pipeline.executor`) executes the same lists, so the bubble we predict is the
bubble we run. :func:`build_schedule` gives a :class:`Schedule`: for each device its :class:`Op` list
(``F``, ``B``, ``W``, ``BW``, ``FB``, ``SEND``, ``RECV``); :func:`validate_schedule` checks an op
list against the contract both executors rely on (docs/pipeline.md, "Schedules as data": list order,
asynchronous SENDs, RECVs waited by their first user, first-in first-out messages per link, direction
and kind, first-in first-out W). Each schedule is written per device with explicit phases; DualPipe
and DualPipeV share one eight-step body (as deepseek-ai/DualPipe writes both).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dsv3.errors import ConfigError
from dsv3.layout import check_layout

# Op kinds.
F, B, W, BW, FB, SEND, RECV = "F", "B", "W", "BW", "FB", "SEND", "RECV"
COMPUTE_KINDS = (F, B, W, BW, FB)
# SEND/RECV directions: activations travel forward, gradients backward.
FORWARD, BACKWARD = "forward", "backward"


class ScheduleError(ConfigError):
    """A pipeline op list is inconsistent (missing, duplicated or out-of-order work or messages)."""


@dataclass(frozen=True)
class Op:
    """One entry of a device's op list.

    Attributes:
        kind: one of ``F, B, W, BW, FB, SEND, RECV``.
        microbatch: the micro-batch index in ``0 .. microbatches-1`` (for ``FB``: the forward's).
        stage: the pipeline stage in ``0 .. pp-1`` (for ``FB``: the forward's; for
            ``SEND``/``RECV``: the stage that consumes the data).
        chunk: which of the device's stage chunks runs it (0 or 1; always 0 for 1F1B/ZB1P).
        b_microbatch, b_stage, b_chunk: ``FB`` only, the full backward overlapped with the forward.
        peer: ``SEND``/``RECV`` only, the other device.
        direction: ``SEND``/``RECV`` only, ``"forward"`` (activation) or ``"backward"`` (gradient).
    """

    kind: str
    microbatch: int
    stage: int
    chunk: int = 0
    b_microbatch: int = -1
    b_stage: int = -1
    b_chunk: int = -1
    peer: int = -1
    direction: str = ""

    @property
    def is_compute(self) -> bool:
        return self.kind in COMPUTE_KINDS

    def parts(self) -> tuple[Op, ...]:
        """The plain compute ops this op performs: ``(F, BW)`` for an ``FB`` pair, else ``(self,)``."""
        if self.kind != FB:
            return (self,)
        return (Op(F, self.microbatch, self.stage, self.chunk), Op(BW, self.b_microbatch, self.b_stage, self.b_chunk))

    def __str__(self) -> str:
        if self.kind == FB:
            return f"F{self.microbatch}&B{self.b_microbatch} (stages {self.stage}&{self.b_stage})"
        if self.kind in (SEND, RECV):
            arrow = "to" if self.kind == SEND else "from"
            what = "act" if self.direction == FORWARD else "grad"
            return f"{self.kind} {what} mb{self.microbatch} stage {self.stage} {arrow} device {self.peer}"
        return f"{self.kind}{self.microbatch} (stage {self.stage})"


@dataclass(frozen=True)
class Schedule:
    """A pipeline schedule: for each device, the ordered ops it executes.

    Attributes:
        name: schedule name (a key of :data:`SCHEDULES`).
        pp: number of pipeline stages.
        microbatches: number of micro-batches per training step.
        devices: number of devices (``pp``, or ``pp // 2`` for DualPipeV).
        device_stages: for each device, the stage each of its chunks holds (chunk order).
        ops: for each device, its op list in execution order.
    """

    name: str
    pp: int
    microbatches: int
    devices: int
    device_stages: tuple[tuple[int, ...], ...]
    ops: tuple[tuple[Op, ...], ...]

    @property
    def params_per_device_factor(self) -> float:
        """Parameters held per device, in units of one stage of the ``pp``-stage split (1/pp of the layers).

        1 for 1F1B and ZB1P; 2 for DualPipe (two copies, 2x, as the DualPipe README
        says) and 2 for DualPipeV (two stages of a ``pp``-stage split on each of its
        ``pp/2`` devices: the README's 2x, which is 1x of a ``pp/2``-device 1F1B).
        """
        return float(max(len(stages) for stages in self.device_stages))

    def compute_ops(self, device: int) -> list[Op]:
        """The device's compute ops (no SEND/RECV), in order."""
        return [op for op in self.ops[device] if op.is_compute]


# --------------------------------------------------------------------------- building blocks

Placement = Callable[[int, int], tuple[int, int]]  # (microbatch, stage) -> (device, chunk)


class _RankWriter:
    """Writes one device's op list, adding the SEND/RECV each compute op needs.

    ``chunks[c] = (stage, microbatches in order)``. :meth:`forward` and
    :meth:`backward` take the next micro-batch of a chunk (each in order);
    :meth:`weight` completes the oldest deferred split backward.
    """

    def __init__(self, device: int, pp: int, chunks: Sequence[tuple[int, Sequence[int]]], place: Placement):
        self.device, self.pp, self.chunks, self.place = device, pp, chunks, place
        self.ops: list[Op] = []
        self._next_f = [0] * len(chunks)
        self._next_b = [0] * len(chunks)
        self._deferred_w: deque[tuple[int, int, int]] = deque()

    def _take(self, counters: list[int], chunk: int) -> tuple[int, int]:
        stage, mbs = self.chunks[chunk]
        mb = mbs[counters[chunk]]
        counters[chunk] += 1
        return mb, stage

    def _peer(self, mb: int, stage: int) -> int | None:
        """The device of ``stage`` for ``mb`` if it is another device, else None."""
        if not 0 <= stage < self.pp:
            return None
        device = self.place(mb, stage)[0]
        return None if device == self.device else device

    def _recv_input(self, mb: int, stage: int, chunk: int) -> None:
        peer = self._peer(mb, stage - 1)
        if peer is not None:
            self.ops.append(Op(RECV, mb, stage, chunk, peer=peer, direction=FORWARD))

    def _send_output(self, mb: int, stage: int, chunk: int) -> None:
        peer = self._peer(mb, stage + 1)
        if peer is not None:
            self.ops.append(Op(SEND, mb, stage + 1, chunk, peer=peer, direction=FORWARD))

    def _recv_grad(self, mb: int, stage: int, chunk: int) -> None:
        peer = self._peer(mb, stage + 1)
        if peer is not None:
            self.ops.append(Op(RECV, mb, stage, chunk, peer=peer, direction=BACKWARD))

    def _send_grad(self, mb: int, stage: int, chunk: int) -> None:
        peer = self._peer(mb, stage - 1)
        if peer is not None:
            self.ops.append(Op(SEND, mb, stage - 1, chunk, peer=peer, direction=BACKWARD))

    def forward(self, chunk: int) -> None:
        mb, stage = self._take(self._next_f, chunk)
        self._recv_input(mb, stage, chunk)
        self.ops.append(Op(F, mb, stage, chunk))
        self._send_output(mb, stage, chunk)

    def backward(self, chunk: int, split: bool = False) -> None:
        """Full backward ``BW``, or with ``split`` the input part ``B`` (its ``W`` deferred)."""
        mb, stage = self._take(self._next_b, chunk)
        self._recv_grad(mb, stage, chunk)
        self.ops.append(Op(B if split else BW, mb, stage, chunk))
        if split:
            self._deferred_w.append((mb, stage, chunk))
        self._send_grad(mb, stage, chunk)

    def weight(self) -> None:
        mb, stage, chunk = self._deferred_w.popleft()
        self.ops.append(Op(W, mb, stage, chunk))

    def forward_backward(self, f_chunk: int, b_chunk: int) -> None:
        """Overlapped pair: forward of ``f_chunk``'s next micro-batch with full backward of ``b_chunk``'s."""
        fmb, fstage = self._take(self._next_f, f_chunk)
        bmb, bstage = self._take(self._next_b, b_chunk)
        self._recv_input(fmb, fstage, f_chunk)
        self._recv_grad(bmb, bstage, b_chunk)
        self.ops.append(Op(FB, fmb, fstage, f_chunk, b_microbatch=bmb, b_stage=bstage, b_chunk=b_chunk))
        self._send_output(fmb, fstage, f_chunk)
        self._send_grad(bmb, bstage, b_chunk)


# --------------------------------------------------------------------------- 1F1B and ZB1P


def _one_f_one_b(rank: _RankWriter, pp: int, m: int) -> None:
    """1F1B (PipeDream-flush): warm up with forwards, alternate one F / one full backward, drain."""
    d = rank.device
    warmup = min(pp - 1 - d, m)
    for _ in range(warmup):  # phase 1: forwards fill the pipeline below this stage
        rank.forward(0)
    for _ in range(m - warmup):  # phase 2: steady state, one F then one BW
        rank.forward(0)
        rank.backward(0)
    for _ in range(warmup):  # phase 3: drain the remaining backwards
        rank.backward(0)


def _zb1p(rank: _RankWriter, pp: int, m: int) -> None:
    """ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism", arXiv 2401.10241).

    1F1B with the backward split into B (inputs) and W (weights); device d
    postpones its first d weight passes to the end, where they fill the drain
    bubble, so its peak activation count equals 1F1B's first stage (pp).
    """
    d = rank.device
    warmup = min(pp - 1 - d, m)
    deferred = min(d, m - warmup)
    for _ in range(warmup):  # phase 1: forwards, as 1F1B
        rank.forward(0)
    for _ in range(deferred):  # phase 2: F, B with the W postponed
        rank.forward(0)
        rank.backward(0, split=True)
    for _ in range(m - warmup - deferred):  # phase 3: steady state F, B, W
        rank.forward(0)
        rank.backward(0, split=True)
        rank.weight()
    for _ in range(warmup):  # phase 4: drain B, W
        rank.backward(0, split=True)
        rank.weight()
    for _ in range(deferred):  # phase 5: the postponed weight passes
        rank.weight()


def _single_chunk(name: str, body: Callable[[_RankWriter, int, int], None], pp: int, m: int) -> Schedule:
    check_layout(pp=pp, schedule=name, microbatches=m)
    place: Placement = lambda mb, stage: (stage, 0)  # noqa: E731
    ops = []
    for d in range(pp):
        rank = _RankWriter(d, pp, [(d, range(m))], place)
        body(rank, pp, m)
        ops.append(tuple(rank.ops))
    return Schedule(name, pp, m, pp, tuple((d,) for d in range(pp)), tuple(ops))


def one_f_one_b(pp: int, microbatches: int) -> Schedule:
    """1F1B on ``pp`` devices; any ``microbatches >= 1`` (the published bubble needs ``microbatches >= pp``)."""
    return _single_chunk("1f1b", _one_f_one_b, pp, microbatches)


def zb1p(pp: int, microbatches: int) -> Schedule:
    """ZB1P (ZB-H1) on ``pp`` devices; any ``microbatches >= 1`` (the published bubble needs ``microbatches >= pp``)."""
    return _single_chunk("zb1p", _zb1p, pp, microbatches)


# --------------------------------------------------------------------------- DualPipe and DualPipeV


def _dualpipe_rank(rank: _RankWriter, n: int, h: int, chunks: int, a: int, c: int, middle: bool) -> None:
    """The eight steps of DualPipe (deepseek-ai/DualPipe ``dualpipe.py``/``dualpipev.py``) for one device.

    Args:
        n: devices in one half of the bidirectional pipeline (DualPipe: pp/2; DualPipeV: all pp/2).
        h: this device's distance from the nearest end (DualPipe: min(d, pp-1-d); DualPipeV: d).
        chunks: micro-batches through each chunk (DualPipe: m/2; DualPipeV: m).
        a: the chunk whose micro-batches reach this device first ("phase 0"); c: the other ("phase 1").
        middle: the device where the two directions meet (DualPipe's two middle
            devices, DualPipeV's last device): its first main-step pair is not overlapped.
    """
    for _ in range((n - h - 1) * 2):  # step 1: nF0
        rank.forward(a)
    for _ in range(h + 1):  # step 2: nF0F1
        rank.forward(a)
        rank.forward(c)
    for _ in range(n - h - 1):  # step 3: nB1W1F1 (zero bubble)
        rank.backward(c, split=True)
        rank.weight()
        rank.forward(c)
    for i in range(chunks - 2 * n + h + 1):  # step 4 (main): nF0B1F1B0, overlapped pairs
        if i == 0 and middle:  # not overlapped, to shrink the bubble
            rank.forward(a)
            rank.backward(c)
        else:
            rank.forward_backward(a, c)
        rank.forward_backward(c, a)
    for _ in range(n - h - 1):  # step 5: nB1F1B0
        rank.backward(c)
        rank.forward_backward(c, a)
    split = False  # step 6: nB1B0, the second half of these backwards split off their W
    for i in range(h + 1):
        split = split or (i == (h + 1) // 2 and h % 2 == 1)
        rank.backward(c, split=split)
        split = split or (i == (h + 1) // 2 and h % 2 == 0)
        rank.backward(a, split=split)
    for _ in range(n - h - 1):  # step 7: nWB0 (zero bubble)
        rank.weight()
        rank.backward(a, split=True)
    for _ in range(h + 1):  # step 8: nW
        rank.weight()


def dualpipe(pp: int, microbatches: int) -> Schedule:
    """DualPipe on ``pp`` devices (two stage copies each); ``pp`` even, ``microbatches`` even and >= 2*pp.

    Micro-batches ``0 .. m/2-1`` enter at device 0 (chunk 0, stage d on device d),
    ``m/2 .. m-1`` at device pp-1 (chunk 1, stage s on device pp-1-s).
    """
    m = microbatches
    check_layout(pp=pp, schedule="dualpipe", microbatches=m)
    half = m // 2
    place: Placement = lambda mb, stage: (stage, 0) if mb < half else (pp - 1 - stage, 1)  # noqa: E731
    ops = []
    for d in range(pp):
        chunks = [(d, range(half)), (pp - 1 - d, range(half, m))]
        rank = _RankWriter(d, pp, chunks, place)
        first_half = d < pp // 2
        _dualpipe_rank(
            rank,
            n=pp // 2,
            h=min(d, pp - 1 - d),
            chunks=half,
            a=0 if first_half else 1,
            c=1 if first_half else 0,
            middle=d in (pp // 2 - 1, pp // 2),
        )
        ops.append(tuple(rank.ops))
    return Schedule("dualpipe", pp, m, pp, tuple((d, pp - 1 - d) for d in range(pp)), tuple(ops))


def dualpipev(pp: int, microbatches: int) -> Schedule:
    """DualPipeV: ``pp`` stages on ``pp/2`` devices in a V; ``pp`` even, ``microbatches >= pp``.

    Device d holds stage d (chunk 0) and stage pp-1-d (chunk 1); every micro-batch
    enters at device 0, turns at device pp/2-1 and leaves at device 0.
    """
    m = microbatches
    check_layout(pp=pp, schedule="dualpipev", microbatches=m)
    n = pp // 2
    place: Placement = lambda mb, stage: (stage, 0) if stage < n else (pp - 1 - stage, 1)  # noqa: E731
    ops = []
    for d in range(n):
        rank = _RankWriter(d, pp, [(d, range(m)), (pp - 1 - d, range(m))], place)
        _dualpipe_rank(rank, n=n, h=d, chunks=m, a=0, c=1, middle=d == n - 1)
        ops.append(tuple(rank.ops))
    return Schedule("dualpipev", pp, m, n, tuple((d, pp - 1 - d) for d in range(n)), tuple(ops))


_BUILDERS: dict[str, Callable[[int, int], Schedule]] = {
    "1f1b": one_f_one_b,
    "zb1p": zb1p,
    "dualpipe": dualpipe,
    "dualpipev": dualpipev,
}


def build_schedule(name: str, pp: int, microbatches: int) -> Schedule:
    """Build the named schedule's per-device op lists.

    Args:
        name: ``"1f1b"``, ``"zb1p"``, ``"dualpipe"`` or ``"dualpipev"`` (case-insensitive).
        pp: number of pipeline stages.
        microbatches: micro-batches per training step.

    Raises:
        ConfigError: unknown name, or ``pp``/``microbatches`` the schedule cannot run.
    """
    check_layout(pp=pp, schedule=name, microbatches=microbatches)
    return _BUILDERS[str(name).lower()](pp, microbatches)


def pipeline_schedule(num_layers: int, name: str, pp: int, microbatches: int, world_size: int) -> Schedule:
    """The schedule of a pipeline layout that :func:`~dsv3.layout.check_layout` accepts (layers, schedule,
    micro-batches, a world of whole pipelines); what :class:`~dsv3.parallel.pipeline.executor.PipelineRuntime`
    runs."""
    check_layout(world_size, pp, schedule=name, num_layers=num_layers, microbatches=microbatches)
    return build_schedule(name, pp, microbatches)


# --------------------------------------------------------------------------- checking an op list


def _data_key(op: Op) -> tuple[str, int, int]:
    return ("act" if op.direction == FORWARD else "grad", op.microbatch, op.stage)


def validate_schedule(schedule: Schedule) -> None:
    """Check that an op list is complete and consistent; raise :class:`ScheduleError` if not.

    Checked: ops name valid micro-batches, stages, chunks and peers; every
    (micro-batch, stage) runs F, its input backward and its weight backward
    exactly once, all on the device holding that stage; on each device, an op
    only uses data produced earlier there or named by an earlier RECV (F after
    its input, B after its F and output gradient, W after its B, SEND after the
    data's producer); every SEND has exactly one matching RECV and vice versa;
    and on every link, in each direction and for each kind of message
    (activations, gradients), the sender's SENDs come in the same order as the
    receiver's RECVs. The runtime needs the last rule: messages of one kind on
    one link and direction share a process group and have the same shape, so
    they match first-in first-out, and an out-of-order receive would silently
    get another micro-batch's data. Timing and deadlocks are the simulator's business.
    """
    _ScheduleCheck(schedule).run()


class _ScheduleCheck:
    """The steps of :func:`validate_schedule`: each op's fields, its data flow, then completeness and messages."""

    def __init__(self, schedule: Schedule) -> None:
        self.s = schedule
        self.where: dict[tuple[str, int, int], int] = {}  # (F|B|W, mb, stage) -> device
        self.sends: dict[tuple, int] = {}
        self.recvs: dict[tuple, int] = {}
        self.order: dict[tuple[str, int, int, str], list[tuple[int, int, Op]]] = {}  # (SEND|RECV, src, dst, dir)

    def fail(self, d: int, i: int, op: Op, why: str) -> None:
        raise ScheduleError(f"schedule {self.s.name!r} device {d} op {i} ({op}) {why}.")

    def run(self) -> None:
        s, nd = self.s, self.s.devices
        if len(s.ops) != nd or len(s.device_stages) != nd:
            raise ScheduleError(f"schedule {s.name!r} declares {nd} devices but has {len(s.ops)} op lists.")
        for d, ops in enumerate(s.ops):
            have: set[tuple[str, int, int]] = set()  # data usable on this device
            for i, op in enumerate(ops):
                self.fields(d, i, op)
                if op.kind in (SEND, RECV):
                    self.transfer(d, i, op, have)
                else:
                    self.compute(d, i, op, have)
        self.complete()
        self.matched()
        self.in_order()

    def fields(self, d: int, i: int, op: Op) -> None:
        """Valid kind, micro-batch, stage and chunk; a compute op runs on the chunk holding its stage."""
        s = self.s
        if op.kind not in COMPUTE_KINDS + (SEND, RECV):
            self.fail(d, i, op, f"has unknown kind {op.kind!r}")
        for part in op.parts():
            mb, st, c = part.microbatch, part.stage, part.chunk
            if not (0 <= mb < s.microbatches and 0 <= st < s.pp and 0 <= c < len(s.device_stages[d])):
                self.fail(d, i, op, "names a micro-batch, stage or chunk outside the schedule")
            if op.is_compute and s.device_stages[d][c] != st:
                self.fail(d, i, op, f"runs stage {st} on chunk {c}, which holds stage {s.device_stages[d][c]}")

    def transfer(self, d: int, i: int, op: Op, have: set) -> None:
        """A SEND of data produced here, or a RECV that makes data usable here; no transfer twice."""
        if not 0 <= op.peer < self.s.devices or op.peer == d or op.direction not in (FORWARD, BACKWARD):
            self.fail(d, i, op, "has an invalid peer or direction")
        src, dst = (d, op.peer) if op.kind == SEND else (op.peer, d)
        book = self.sends if op.kind == SEND else self.recvs
        key = (src, dst) + _data_key(op)
        if key in book:
            self.fail(d, i, op, "duplicates an earlier transfer")
        book[key] = i
        self.order.setdefault((op.kind, src, dst, op.direction), []).append((op.microbatch, op.stage, op))
        if op.kind == SEND and _data_key(op) not in have:
            self.fail(d, i, op, "sends data this device has not produced yet")
        if op.kind == RECV:
            have.add(_data_key(op))

    def compute(self, d: int, i: int, op: Op, have: set) -> None:
        """Inputs before use, then the outputs; each F, B and W of a (micro-batch, stage) once."""
        pp = self.s.pp
        needs, makes = [], []
        for part in op.parts():
            mb, st = part.microbatch, part.stage
            if part.kind == F:
                needs += [("act", mb, st)] if st > 0 else []
                makes += [("F", mb, st), ("act", mb, st + 1) if st + 1 < pp else ("grad", mb, st)]
            elif part.kind in (B, BW):
                needs += [("F", mb, st), ("grad", mb, st)]
                makes += [("B", mb, st)] + ([("grad", mb, st - 1)] if st > 0 else [])
            else:  # W
                needs += [("B", mb, st)]
        for what, mb, st in needs:
            if (what, mb, st) not in have:
                self.fail(d, i, op, f"needs {what} of micro-batch {mb} stage {st} before it is produced or received")
        have.update(makes)
        for part in op.parts():
            for k in ("B", "W") if part.kind == BW else (part.kind,):
                key = (k, part.microbatch, part.stage)
                if key in self.where:
                    self.fail(d, i, op, f"repeats {k} of micro-batch {part.microbatch} stage {part.stage}")
                self.where[key] = d

    def complete(self) -> None:
        for k in ("F", "B", "W"):
            for mb in range(self.s.microbatches):
                for st in range(self.s.pp):
                    if (k, mb, st) not in self.where:
                        raise ScheduleError(f"schedule {self.s.name!r} never runs {k} of micro-batch {mb} stage {st}.")

    def matched(self) -> None:
        for key in self.sends.keys() ^ self.recvs.keys():
            side = "SEND" if key in self.sends else "RECV"
            raise ScheduleError(
                f"schedule {self.s.name!r} has a {side} between devices {key[0]}->{key[1]} of {key[2]} "
                f"micro-batch {key[3]} stage {key[4]} with no matching {'RECV' if side == 'SEND' else 'SEND'}."
            )

    def in_order(self) -> None:
        for (kind, src, dst, direction), sent in self.order.items():
            if kind != SEND:
                continue
            got = self.order.get((RECV, src, dst, direction), [])
            for (smb, sst, sop), (rmb, rst, rop) in zip(sent, got):
                if (smb, sst) != (rmb, rst):
                    what = "activations" if direction == FORWARD else "gradients"
                    raise ScheduleError(
                        f"schedule {self.s.name!r} sends {what} from device {src} to device {dst} in another order "
                        f"than device {dst} receives them ({sop} meets {rop}); messages of one kind on a link match "
                        f"first-in first-out, so reorder the RECVs to follow the SENDs."
                    )
