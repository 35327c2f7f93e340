"""Discrete-event simulation of a pipeline schedule's per-device op lists.

The simulator executes the op lists of :mod:`dsv3.schedules` (the same lists the runtime runs) with
fixed op times (``f``, ``b``, ``w``, ``fb``, ``comm``; per stage through ``OpTimes.per_op``, so a
measured step can be replayed: :mod:`dsv3.plan.trace`). A compute op starts when its device is free and
its inputs are there (data from another device ``comm`` after its SEND). It reports the makespan, each
device's bubble (idle time within it) and peak in-flight activations (units of one micro-batch through
one stage), and raises :class:`DeadlockError` for an op list that never completes
(:class:`~dsv3.schedules.ScheduleError` for an inconsistent one). The op times, the rules and when the
DualPipe README's bubble and memory formulas hold exactly: docs/planner.md ("The pipeline simulator").
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass, field

from dsv3.errors import ConfigError
from dsv3.plan.limits import check_pipeline
from dsv3.schedules import (
    BACKWARD,
    BW,
    FB,
    FORWARD,
    RECV,
    SEND,
    B,
    F,
    Op,
    Schedule,
    ScheduleError,
    W,
    build_schedule,
    validate_schedule,
)


def op_key(op: Op) -> tuple:
    """The key of ``op`` in :attr:`OpTimes.per_op`: ``(kind, stage)``, or ``(FB, stage, b_stage)`` for a pair."""
    return (op.kind, op.stage, op.b_stage) if op.kind == FB else (op.kind, op.stage)


# A timeline entry: (label, start, end, op): "F3", "B3", "W3", "BW3" or "F5&B2", the times, and the Op itself.
TimelineEntry = tuple[str, float, float, Op]


class DeadlockError(ScheduleError):
    """The op lists wait on each other in a cycle, so the step can never finish."""


def _check_time(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"pipeline op time {name} must be a finite number >= 0, got {value!r}.")


@dataclass(frozen=True)
class OpTimes:
    """Per-op times of one stage (any consistent unit) and the point-to-point latency."""

    f: float = 1.0
    b: float = 2.0
    w: float = 1.0
    fb: float | None = None
    comm: float = 0.0
    per_op: dict | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        for name in ("f", "b", "w", "comm") + (("fb",) if self.fb is not None else ()):
            _check_time(name, getattr(self, name))
        for key, value in (self.per_op or {}).items():
            _check_time(f"{key}", value)
        if self.w > self.b:
            raise ConfigError(
                f"w (weight-gradient time, {self.w}) must not exceed b (full backward time, {self.b}) because W is part of B."
            )
        if self.fb is None:
            object.__setattr__(self, "fb", float(self.f + self.b))

    def of(self, op: Op) -> float:
        """Device time of one op (its ``per_op`` entry when there is one)."""
        if self.per_op:
            t = self.per_op.get(op_key(op))
            if t is not None:
                return t
        return {F: self.f, B: self.b - self.w, W: self.w, BW: self.b, FB: self.fb}.get(op.kind, 0.0)


@dataclass
class SimResult:
    """The simulated step of one schedule (see the module docstring for definitions)."""

    schedule: str
    pp: int
    microbatches: int
    devices: int
    times: OpTimes
    makespan: float
    busy: list[float]
    bubble: list[float]
    peak_activations: list[float]
    params_per_device_factor: float
    timeline: list[list[TimelineEntry]] = field(repr=False)

    @property
    def max_bubble(self) -> float:
        return max(self.bubble)

    @property
    def bubble_fraction(self) -> float:
        """Idle share of all device time: sum(bubble) / (devices * makespan)."""
        return sum(self.bubble) / (self.devices * self.makespan) if self.makespan > 0 else 0.0

    def to_json(self, timeline: bool = False) -> dict:
        out = {
            "schedule": self.schedule,
            "pp": self.pp,
            "microbatches": self.microbatches,
            "devices": self.devices,
            "f": self.times.f,
            "b": self.times.b,
            "w": self.times.w,
            "fb": self.times.fb,
            "comm": self.times.comm,
            "makespan": self.makespan,
            "busy": list(self.busy),
            "bubble": list(self.bubble),
            "max_bubble": self.max_bubble,
            "bubble_fraction": self.bubble_fraction,
            "peak_activations": list(self.peak_activations),
            "params_per_device_factor": self.params_per_device_factor,
        }
        if timeline:
            out["timeline"] = [
                [
                    {"label": label, "start": start, "end": end, **dataclasses.asdict(op)}
                    for label, start, end, op in row
                ]
                for row in self.timeline
            ]
        return out


def _label(op: Op) -> str:
    if op.kind == FB:
        return f"F{op.microbatch}&B{op.b_microbatch}"
    return f"{op.kind}{op.microbatch}"


def _needs(op: Op) -> list[tuple[str, int, int]]:
    """Data keys a compute op waits for (same keys as ``validate_schedule``)."""
    keys = []
    for part in op.parts():
        mb, s = part.microbatch, part.stage
        if part.kind == F:
            keys += [("act", mb, s)] if s > 0 else []
        elif part.kind in (B, BW):
            keys += [("F", mb, s), ("grad", mb, s)]
        else:
            keys.append(("B", mb, s))
    return keys


def _makes(op: Op, pp: int) -> list[tuple[str, int, int]]:
    keys = []
    for part in op.parts():
        mb, s = part.microbatch, part.stage
        if part.kind == F:
            keys += [("F", mb, s), ("act", mb, s + 1) if s + 1 < pp else ("grad", mb, s)]
        elif part.kind in (B, BW):
            keys += [("B", mb, s)] + ([("grad", mb, s - 1)] if s > 0 else [])
    return keys


def _peak_activations(schedule: Schedule) -> list[float]:
    peaks = []
    for ops in schedule.ops:
        live = peak = 0
        for op in ops:
            for part in op.parts():  # FB: the forward's set is taken before the backward's is released
                if part.kind == F:
                    live += 1
                    peak = max(peak, live)
            for part in op.parts():
                if part.kind in (BW, W):
                    live -= 1
        peaks.append(float(peak))
    return peaks


class _Replay:
    """The simulator's state over the op lists of ``nd`` devices: each device's next op, when it is free, the
    data it holds (key -> time usable), the RECVs posted before their SEND, and the SENDs run before their RECV."""

    def __init__(self, schedule: Schedule, times: OpTimes) -> None:
        nd = schedule.devices
        self.schedule, self.times, self.pp = schedule, times, schedule.pp
        self.pos = [0] * nd
        self.free = [0.0] * nd  # when each device finishes its last compute op
        self.ready: list[dict[tuple, float]] = [{} for _ in range(nd)]  # data key -> time usable on that device
        self.posted: list[set[tuple]] = [set() for _ in range(nd)]  # RECVs whose SEND has not run yet
        self.sent: dict[tuple, float] = {}  # (src, dst, key) -> arrival time, for SENDs that ran before their RECV
        self.timeline: list[list[TimelineEntry]] = [[] for _ in range(nd)]
        self.busy = [0.0] * nd
        self.waiting: list[tuple | None] = [None] * nd  # the data key a stalled device waits for
        self.runnable = deque(range(nd))

    def run(self) -> None:
        """Run each device until it stalls on data whose SEND has not been simulated; that SEND wakes it up."""
        ops = self.schedule.ops
        while self.runnable:
            d = self.runnable.popleft()
            while self.pos[d] < len(ops[d]) and self.step(d, ops[d][self.pos[d]]):
                self.pos[d] += 1

    def step(self, d: int, op: Op) -> bool:
        """Run device d's next op if it can run now; False if it waits for a SEND not yet simulated."""
        if op.kind == SEND:
            self._send(d, op)
            return True
        if op.kind == RECV:
            key = ("act" if op.direction == FORWARD else "grad", op.microbatch, op.stage)
            if (op.peer, d, key) in self.sent:
                self.ready[d][key] = self.sent.pop((op.peer, d, key))
            else:
                self.posted[d].add(key)
            return True
        return self._compute(d, op)

    def _send(self, d: int, op: Op) -> None:
        key = ("act" if op.direction == FORWARD else "grad", op.microbatch, op.stage)
        arrival = max(self.free[d], self.ready[d][key]) + self.times.comm
        if key in self.posted[op.peer]:
            self.posted[op.peer].discard(key)
            self.ready[op.peer][key] = arrival
            if self.waiting[op.peer] == key:  # the peer was stalled on exactly this data
                self.waiting[op.peer] = None
                self.runnable.append(op.peer)
        else:
            self.sent[(d, op.peer, key)] = arrival

    def _compute(self, d: int, op: Op) -> bool:
        needs = _needs(op)
        for key in needs:
            if key in self.posted[d]:
                self.waiting[d] = key
                return False
        start = max([self.free[d]] + [self.ready[d][key] for key in needs])
        end = start + self.times.of(op)
        for key in _makes(op, self.pp):
            self.ready[d][key] = end
        self.free[d] = end
        self.busy[d] += end - start
        self.timeline[d].append((_label(op), start, end, op))
        return True

    def check_finished(self) -> None:
        """Raise :class:`DeadlockError` when a device stopped before the end of its list."""
        ops = self.schedule.ops
        stuck = [d for d in range(len(ops)) if self.pos[d] < len(ops[d])]
        if not stuck:
            return
        d = stuck[0]
        op = ops[d][self.pos[d]]
        what, mb, stage = next(key for key in _needs(op) if key in self.posted[d])
        raise DeadlockError(
            f"schedule {self.schedule.name!r} deadlocks: device {d} waits at op {self.pos[d]} ({op}) for the {what} "
            f"of micro-batch {mb} stage {stage}, whose SEND comes after a wait that never ends (devices "
            f"{', '.join(map(str, stuck))} are stuck); reorder the op lists to break the cycle."
        )


def run_schedule(schedule: Schedule, times: OpTimes | None = None) -> SimResult:
    """Simulate a built (or hand-written) schedule; see the module docstring.

    Raises:
        ScheduleError: the op lists are inconsistent (see ``validate_schedule``).
        DeadlockError: the op lists wait on each other in a cycle.
    """
    times = times or OpTimes()
    validate_schedule(schedule)
    sim = _Replay(schedule, times)
    sim.run()
    sim.check_finished()
    makespan = max(sim.free) if schedule.devices else 0.0
    return SimResult(
        schedule=schedule.name,
        pp=schedule.pp,
        microbatches=schedule.microbatches,
        devices=schedule.devices,
        times=times,
        makespan=makespan,
        busy=sim.busy,
        bubble=[makespan - x for x in sim.busy],
        peak_activations=_peak_activations(schedule),
        params_per_device_factor=schedule.params_per_device_factor,
        timeline=sim.timeline,
    )


def simulate(
    schedule: str | Schedule,
    pp: int | None = None,
    microbatches: int | None = None,
    *,
    f: float = 1.0,
    b: float = 2.0,
    w: float = 1.0,
    fb: float | None = None,
    comm: float = 0.0,
) -> SimResult:
    """Build (if given a name) and simulate a pipeline schedule.

    Args:
        schedule: ``"1f1b"``, ``"zb1p"``, ``"dualpipe"``, ``"dualpipev"``, or a built :class:`Schedule`.
        pp: pipeline stages (with a name).
        microbatches: micro-batches per step (with a name).
        f: forward time of one stage for one micro-batch (F).
        b: FULL backward time of one stage (B in the DualPipe README: inputs + weights).
        w: weight-gradient part of ``b`` (W); a split input backward takes ``b - w``.
        fb: time of an overlapped forward + full backward pair (F&B); ``None`` means ``f + b``.
        comm: point-to-point latency between devices.

    Example::

        res = simulate("dualpipe", pp=8, microbatches=20, f=1.0, b=2.0, w=0.5, fb=2.5)
        res.makespan, res.bubble, res.peak_activations
    """
    times = OpTimes(f=f, b=b, w=w, fb=fb, comm=comm)
    if not isinstance(schedule, Schedule):
        if pp is None or microbatches is None:
            raise ConfigError("simulate needs pp and microbatches together with a schedule name; pass both.")
        check_pipeline(pp, microbatches)  # bounded op lists before any are built
        schedule = build_schedule(schedule, pp, microbatches)
    return run_schedule(schedule, times)


__all__ = ["DeadlockError", "OpTimes", "op_key", "SimResult", "run_schedule", "simulate", "BACKWARD", "FORWARD"]
