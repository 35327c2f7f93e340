"""Measured pipeline steps beside simulated ones: read a ``dsv3 train --trace`` timeline, feed the simulator.

:func:`read_trace` reads the Chrome trace / Perfetto JSON that ``dsv3 train --pp P --trace`` writes (one
``"ph": "X"`` event per executed compute op, every pipeline device on one clock); :func:`match_schedule`
finds the schedule, ``pp`` and micro-batch count whose per-device compute-op order equals the trace's;
:func:`measured_step` gives its makespan, busy and idle times (the simulator's definitions);
:func:`measured_op_times` the median duration of each (kind, stage); :func:`compare_trace` simulates the
same op lists with those times, so measured and simulated steps differ only by what the simulator does
not model (jitter, communication, the host). The trace format: docs/planner.md ("Measured beside
simulated"). It imports no torch; ``bench/pipeline.py`` uses the same functions on in-memory traces.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from dataclasses import dataclass

from dsv3.errors import ConfigError, DataError, clip
from dsv3.layout import SCHEDULES
from dsv3.plan.limits import MAX_PIPELINE_CELLS, check_pipeline
from dsv3.plan.simulate import OpTimes, SimResult, _label, _peak_activations, op_key, run_schedule
from dsv3.schedules import BW, COMPUTE_KINDS, FB, B, F, Op, Schedule, W, build_schedule

#: A trace of a bounded step is a few MB; a larger file is the wrong one and would cost unbounded memory.
MAX_TRACE_BYTES = 64 * 2**20

# One executed op as read back: (op, start, end) in seconds on the trace's clock.
Executed = tuple[Op, float, float]

_NAME = re.compile(r"^(?:(F|B|W|BW)(\d+)|F(\d+)&B(\d+))$")


@dataclass(frozen=True)
class TraceOp:
    """One compute event of a trace file, before it is matched to a schedule's op."""

    device: int
    kind: str
    microbatch: int
    stage: int
    chunk: int
    b_microbatch: int  # FB only (else -1)
    start: float  # seconds
    end: float

    def matches(self, op: Op) -> bool:
        return (self.kind, self.microbatch, self.stage, self.chunk, self.b_microbatch) == (
            op.kind,
            op.microbatch,
            op.stage,
            op.chunk,
            op.b_microbatch if op.kind == FB else -1,
        )


@dataclass
class TraceComparison:
    """A measured step and its simulation from the measured op times (both :class:`SimResult`, seconds)."""

    path: str
    measured: SimResult
    simulated: SimResult

    @property
    def ratio(self) -> float:
        """measured / simulated makespan."""
        return self.measured.makespan / self.simulated.makespan if self.simulated.makespan > 0 else math.inf

    def to_json(self) -> dict:
        times = self.simulated.times
        return {
            "trace": self.path,
            "schedule": self.measured.schedule,
            "pp": self.measured.pp,
            "microbatches": self.measured.microbatches,
            "devices": self.measured.devices,
            "measured": {"makespan": self.measured.makespan, "busy": self.measured.busy, "idle": self.measured.bubble},
            "simulated": {
                "makespan": self.simulated.makespan,
                "busy": self.simulated.busy,
                "idle": self.simulated.bubble,
            },
            "measured_over_simulated": self.ratio,
            "op_times": [
                {"kind": k[0], "stage": k[1], **({"b_stage": k[2]} if len(k) > 2 else {}), "seconds": t}
                for k, t in sorted((times.per_op or {}).items())
            ],
            "comm": times.comm,
            "unit": "s",
        }


# ---------------------------------------------------------------------------- reading
def read_trace(path: str | os.PathLike) -> list[TraceOp]:
    """The compute ops of a ``--trace`` file, by device then start time.

    Raises:
        DataError: the file is missing, unreadable, too large, not JSON, or holds no well-formed pipeline ops.
    """
    where = clip(os.fspath(path), 80)
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise DataError(
            f"cannot read trace {where}: {exc.strerror or exc}; give the pipeline_trace.json that "
            f"dsv3 train --trace wrote"
        ) from None
    if size > MAX_TRACE_BYTES:
        raise DataError(
            f"trace {where} is {size:,} bytes, more than a pipeline step's trace "
            f"(at most {MAX_TRACE_BYTES:,}); give the pipeline_trace.json that dsv3 train --trace wrote"
        )
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except OSError as exc:
        raise DataError(f"cannot read trace {where}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise DataError(
            f"trace {where} is not JSON; give the pipeline_trace.json that dsv3 train --trace wrote"
        ) from None
    events = doc.get("traceEvents") if isinstance(doc, dict) else doc
    if not isinstance(events, list):
        raise DataError(f"trace {where} has no traceEvents list; give a Chrome trace written by dsv3 train --trace")
    ops = []
    for i, e in enumerate(events):
        if not isinstance(e, dict) or e.get("ph") != "X" or e.get("cat") not in COMPUTE_KINDS:
            continue  # metadata, or spans that are not pipeline ops
        ops.append(_trace_op(e, i, where))
    if not ops:
        raise DataError(
            f"trace {where} holds no pipeline ops (events with cat F, B, W, BW or FB); give the "
            f"pipeline_trace.json that dsv3 train --pp P --trace wrote"
        )
    ops.sort(key=lambda o: (o.device, o.start, o.end))
    return ops


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_PIPELINE_CELLS


def _trace_op(e: dict, i: int, where: str) -> TraceOp:
    bad = f"trace {where} event {i} is not a well-formed pipeline op"
    name, args = e.get("name"), e.get("args")
    m = _NAME.match(name) if isinstance(name, str) else None
    ts, dur = e.get("ts"), e.get("dur")
    times_ok = all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in (ts, dur))
    if m is None or not isinstance(args, dict) or not times_ok or dur < 0:
        raise DataError(f"{bad} (name, ts, dur and args.stage/chunk as dsv3 train --trace writes them): {clip(e, 80)}")
    kind = FB if m.group(3) is not None else m.group(1)
    if kind != e["cat"]:
        raise DataError(f"{bad}: its name {clip(name)} is not of its kind {clip(e['cat'])}")
    device, stage, chunk = e.get("tid"), args.get("stage"), args.get("chunk")
    if not (_int(device) and _int(stage) and chunk in (0, 1)):
        raise DataError(f"{bad}: tid, args.stage and args.chunk must be small non-negative integers: {clip(e, 80)}")
    mb = int(m.group(2) if kind != FB else m.group(3))
    b_mb = int(m.group(4)) if kind == FB else -1
    return TraceOp(device, kind, mb, stage, chunk, b_mb, ts * 1e-6, (ts + dur) * 1e-6)


# ---------------------------------------------------------------------------- matching
def _by_device(ops: list[TraceOp]) -> list[list[TraceOp]]:
    devices = sorted({o.device for o in ops})
    if devices != list(range(len(devices))):
        raise DataError(
            f"the trace's devices are {devices[:8]}, not 0 .. {len(devices) - 1}; it is not one pipeline's trace"
        )
    return [[o for o in ops if o.device == d] for d in devices]


def _same(schedule: Schedule, rows: list[list[TraceOp]]) -> bool:
    if schedule.devices != len(rows):
        return False
    for d, row in enumerate(rows):
        compute = [op for op in schedule.ops[d] if op.is_compute]
        if len(compute) != len(row) or not all(t.matches(op) for t, op in zip(row, compute)):
            return False
    return True


def match_schedule(
    ops: list[TraceOp],
    schedule: str | None = None,
    pp: int | None = None,
    microbatches: int | None = None,
    where: str = "the trace",
) -> tuple[Schedule, list[list[Executed]]]:
    """The schedule a trace executed and its ops as (op, start, end) per device, in op-list order.

    The trace's own stages and micro-batches give ``pp`` and the micro-batch count; the schedule is the one
    of :data:`~dsv3.layout.SCHEDULES` whose per-device compute-op lists equal the trace's.
    ``schedule``/``pp``/``microbatches``, when given, must agree with that.

    Raises:
        ConfigError: the trace is no schedule's step, or not the one the arguments name.
    """
    rows = _by_device(ops)
    t_pp = max(o.stage for o in ops) + 1  # every stage runs some op with its own stage number
    t_m = max(max(o.microbatch, o.b_microbatch) for o in ops) + 1
    found = None
    if t_pp * t_m <= MAX_PIPELINE_CELLS:
        for name in SCHEDULES:
            try:
                candidate = build_schedule(name, t_pp, t_m)
            except ConfigError:
                continue
            if _same(candidate, rows):
                found = candidate
                break
    asked = [
        f"--{k} {v}" for k, v in (("schedule", schedule), ("pp", pp), ("microbatches", microbatches)) if v is not None
    ]
    if found is None:
        raise ConfigError(
            f"{where} ({len(rows)} devices, stages 0..{t_pp - 1}, micro-batches 0..{t_m - 1}) is not the op order of "
            f"any schedule ({', '.join(SCHEDULES)}); give a whole step's trace written by dsv3 train --trace"
        )
    wrong = [
        a
        for a, got, want in (
            ("schedule", found.name, schedule),
            ("pp", found.pp, pp),
            ("microbatches", found.microbatches, microbatches),
        )
        if want is not None and str(want).lower() != str(got)
    ]
    if wrong:
        raise ConfigError(
            f"{where} is a {found.name} step with --pp {found.pp} and --microbatches {found.microbatches}, not "
            f"{' '.join(asked)}; drop those flags or give the matching trace"
        )
    executed = []
    for d, row in enumerate(rows):
        compute = [op for op in found.ops[d] if op.is_compute]
        executed.append([(op, t.start, t.end) for op, t in zip(compute, row)])
    return found, executed


# ---------------------------------------------------------------------------- measuring
def measured_span(executed: list[list[Executed]]) -> tuple[float, list[float], list[float], float]:
    """(makespan, busy per device, idle per device, first start) of executed compute ops on one shared clock."""
    spans = [(s, e) for row in executed for _, s, e in row]
    if not spans:
        raise ConfigError("a measured step needs at least one executed compute op")
    t0 = min(s for s, _ in spans)
    makespan = max(e for _, e in spans) - t0
    busy = [sum(e - s for _, s, e in row) for row in executed]
    return makespan, busy, [makespan - b for b in busy], t0


def measured_step(schedule: Schedule, executed: list[list[Executed]], times: OpTimes | None = None) -> SimResult:
    """The measured step as a :class:`SimResult` (seconds, time 0 = the first op's start over all devices).

    ``executed[d]``: device d's compute ops as (op, start, end) on one clock shared by all devices.
    makespan = last end - first start; ``busy[d]`` = sum of device d's op durations; ``bubble[d]`` (idle) =
    makespan - busy[d]. ``times`` (the op times the comparison used) is only recorded.
    """
    makespan, busy, idle, t0 = measured_span(executed)
    timeline = [[(_label(op), s - t0, e - t0, op) for op, s, e in row] for row in executed]
    return SimResult(
        schedule=schedule.name,
        pp=schedule.pp,
        microbatches=schedule.microbatches,
        devices=schedule.devices,
        times=times or OpTimes(),
        makespan=makespan,
        busy=busy,
        bubble=idle,
        peak_activations=_peak_activations(schedule),
        params_per_device_factor=schedule.params_per_device_factor,
        timeline=timeline,
    )


def measured_op_times(executed: list[list[Executed]], comm: float = 0.0, per_stage: bool = True) -> OpTimes:
    """Simulator op times from executed ops: the median duration of each kind over all stages (``f``, ``b``,
    ``w``, ``fb``) and, with ``per_stage``, of each (kind, stage) in ``per_op`` (FB pairs by both stages).

    ``b`` (the full backward) is the median BW, or median B + median W when the step split every backward;
    ``w`` is the median W (so a split B lasts ``b - w``), 0 without W ops.
    """
    kinds: dict[str, list[float]] = {}
    keyed: dict[tuple, list[float]] = {}
    for row in executed:
        for op, s, e in row:
            kinds.setdefault(op.kind, []).append(e - s)
            keyed.setdefault(op_key(op), []).append(e - s)
    med = {k: statistics.median(v) for k, v in kinds.items()}
    f = med.get(F, 0.0)
    w = med.get(W, 0.0)
    b = med[BW] if BW in med else med.get(B, 0.0) + w
    if B in med and BW in med:  # both kinds ran: W is what the full backward adds to the split one
        w = max(0.0, min(b, b - med[B]))
    w = min(w, b)
    per_op = {k: statistics.median(v) for k, v in keyed.items()} if per_stage else None
    return OpTimes(f=f, b=b, w=w, fb=med.get(FB), comm=comm, per_op=per_op)


def compare(
    schedule: Schedule, executed: list[list[Executed]], comm: float = 0.0, per_stage: bool = True, path: str = ""
) -> TraceComparison:
    """Measured step vs :func:`~dsv3.plan.simulate.run_schedule` of the same op lists fed its op times."""
    times = measured_op_times(executed, comm=comm, per_stage=per_stage)
    simulated = run_schedule(schedule, times)
    return TraceComparison(path=path, measured=measured_step(schedule, executed, times), simulated=simulated)


def compare_trace(
    path: str | os.PathLike,
    schedule: str | None = None,
    pp: int | None = None,
    microbatches: int | None = None,
    comm: float = 0.0,
    per_stage: bool = True,
) -> TraceComparison:
    """Read a ``dsv3 train --trace`` file, find its schedule (checked against the arguments given), compare."""
    where = f"trace {clip(os.fspath(path), 80)}"
    ops = read_trace(path)
    found, executed = match_schedule(ops, schedule, pp, microbatches, where=where)
    check_pipeline(found.pp, found.microbatches)
    return compare(found, executed, comm=comm, per_stage=per_stage, path=os.fspath(path))


__all__ = [
    "MAX_TRACE_BYTES",
    "TraceComparison",
    "TraceOp",
    "compare",
    "compare_trace",
    "match_schedule",
    "measured_op_times",
    "measured_span",
    "measured_step",
    "read_trace",
]
