"""`dsv3 plan schedule --trace FILE`: a measured pipeline step (Chrome trace) beside its simulation.

References: makespans and idle times worked out by hand for a hand-written trace; for traces of the simulator's
own timelines and of the real runtime, the makespan computed straight from the JSON events (max(ts + dur) -
min(ts)) and :func:`dsv3.plan.simulate.run_schedule` / :func:`~dsv3.plan.simulate.simulate` fed op times that
the test takes from the JSON itself.
"""

from __future__ import annotations

import json
import statistics

import pytest
from helpers import assert_one_error, cli

from dsv3.plan.simulate import OpTimes, run_schedule, simulate
from dsv3.schedules import BW, FB, B, F, W, build_schedule

MS = 1e-3


def _event(name, kind, device, stage, chunk, start_ms, end_ms):
    return {
        "name": name,
        "cat": kind,
        "ph": "X",
        "pid": 0,
        "tid": device,
        "ts": start_ms * 1e3,
        "dur": (end_ms - start_ms) * 1e3,
        "args": {"stage": stage, "chunk": chunk},
    }


def _hand_trace():
    """1F1B, pp=2, 2 micro-batches, stage 0: F 1 ms, BW 2 ms; stage 1: F 1.5 ms, BW 3 ms; 0.1 ms per transfer."""
    meta = [{"name": "thread_name", "ph": "M", "pid": 0, "tid": d, "args": {"name": f"device {d}"}} for d in (0, 1)]
    return {
        "traceEvents": meta
        + [
            _event("F0", F, 0, 0, 0, 0.0, 1.0),
            _event("F1", F, 0, 0, 0, 1.0, 2.0),
            _event("F0", F, 1, 1, 0, 1.1, 2.6),
            _event("BW0", BW, 1, 1, 0, 2.6, 5.6),
            _event("F1", F, 1, 1, 0, 5.6, 7.1),
            _event("BW1", BW, 1, 1, 0, 7.1, 10.1),
            _event("BW0", BW, 0, 0, 0, 5.7, 7.7),
            _event("BW1", BW, 0, 0, 0, 10.2, 12.2),
        ],
        "displayTimeUnit": "ms",
    }


def _write(tmp_path, doc, name="trace.json"):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def _run(capsys, *argv):
    code, out, err = cli(["plan", "schedule", *argv], capsys)
    assert code == 0, err
    return out


def test_hand_written_trace_gives_the_hand_computed_numbers(tmp_path, capsys):
    path = _write(tmp_path, _hand_trace())
    doc = json.loads(_run(capsys, "--trace", path, "--json"))
    assert (doc["schedule"], doc["pp"], doc["microbatches"], doc["devices"]) == ("1f1b", 2, 2, 2)
    # measured: first start 0, last end 12.2 ms; busy 1+1+2+2 = 6 ms and 1.5+3+1.5+3 = 9 ms
    assert doc["measured"]["makespan"] == pytest.approx(12.2 * MS)
    assert doc["measured"]["busy"] == pytest.approx([6 * MS, 9 * MS])
    assert doc["measured"]["idle"] == pytest.approx([6.2 * MS, 3.2 * MS])
    # simulated with those op times and no transfer time: device 1 runs 1..2.5, 2.5..5.5, 5.5..7, 7..10;
    # device 0 runs its BW0 at 5.5..7.5 and BW1 at 10..12
    assert doc["simulated"]["makespan"] == pytest.approx(12.0 * MS)
    assert doc["simulated"]["idle"] == pytest.approx([6 * MS, 3 * MS])
    assert doc["measured_over_simulated"] == pytest.approx(12.2 / 12.0)
    # the transfer time given in seconds closes the gap exactly: every 0.1 ms wait of the trace is a transfer
    doc = json.loads(_run(capsys, "--trace", path, "--comm", "0.0001", "--json"))
    assert doc["simulated"]["makespan"] == pytest.approx(12.2 * MS)
    assert doc["simulated"]["idle"] == pytest.approx(doc["measured"]["idle"])
    times = {(t["kind"], t["stage"]): t["seconds"] for t in doc["op_times"]}
    assert times == pytest.approx({(F, 0): 1 * MS, (BW, 0): 2 * MS, (F, 1): 1.5 * MS, (BW, 1): 3 * MS})


def test_text_summary_and_the_measured_beside_simulated_picture(tmp_path, capsys):
    path = _write(tmp_path, _hand_trace())
    png = tmp_path / "t.png"
    out = _run(capsys, "--trace", path, "--plot", png)
    assert "makespan measured 12.20 ms, simulated 12.00 ms" in out and "idle measured" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    one = tmp_path / "one.png"
    _run(capsys, "--schedule", "1f1b", "--pp", "2", "--microbatches", "2", "--plot", one)
    # two panels (measured above simulated) are taller than the plain simulation's one
    assert Image.open(png).size[1] > Image.open(one).size[1] * 1.5


def _trace_of(result, jitter=0.0):
    """A Chrome trace of a simulated step's timeline (seconds), each op's end moved by ``jitter`` x its index."""
    from dsv3.parallel.pipeline.executor import TraceEvent, chrome_trace

    return chrome_trace(
        {
            d: [TraceEvent(op, s, e + jitter * i) for i, (_, s, e, op) in enumerate(row)]
            for d, row in enumerate(result.timeline)
        }
    )


@pytest.mark.parametrize("name,pp,m", [("1f1b", 4, 8), ("zb1p", 2, 6), ("dualpipe", 4, 8), ("dualpipev", 4, 6)])
def test_trace_of_a_known_step_reads_back_its_schedule_and_times(tmp_path, capsys, name, pp, m):
    ref = simulate(name, pp=pp, microbatches=m, f=0.010, b=0.024, w=0.008, fb=0.030)
    doc = json.loads(_run(capsys, "--trace", _write(tmp_path, _trace_of(ref)), "--json"))
    assert (doc["schedule"], doc["pp"], doc["microbatches"], doc["devices"]) == (name, pp, m, ref.devices)
    assert doc["measured"]["makespan"] == pytest.approx(ref.makespan)
    assert doc["measured"]["idle"] == pytest.approx(ref.bubble)
    # uniform op times per kind: the simulation from the measured times is the original one
    assert doc["simulated"]["makespan"] == pytest.approx(ref.makespan)
    assert doc["simulated"]["idle"] == pytest.approx(ref.bubble)


def test_measured_makespan_is_the_traces_and_simulated_is_run_schedule_of_its_medians(tmp_path, capsys):
    """Ops whose ends drift later and later (overlapping the next op's start): the measured and simulated
    steps differ, and each is computed as it should be."""
    from dsv3.plan.trace import match_schedule, read_trace

    ref = simulate("zb1p", pp=2, microbatches=6, f=0.010, b=0.024, w=0.008)
    doc = _trace_of(ref, jitter=0.0007)
    path = _write(tmp_path, doc)
    got = json.loads(_run(capsys, "--trace", path, "--json"))
    spans = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    makespan = (max(e["ts"] + e["dur"] for e in spans) - min(e["ts"] for e in spans)) * 1e-6
    assert got["measured"]["makespan"] == pytest.approx(makespan)
    schedule, _ = match_schedule(read_trace(path))
    assert got["simulated"]["makespan"] == pytest.approx(run_schedule(schedule, _median_times(spans)).makespan)
    assert abs(got["measured"]["makespan"] - got["simulated"]["makespan"]) > 0.01


def _median_times(spans, comm=0.0):
    """OpTimes with the median duration (s) of each (kind, stage) of the JSON events (no FB ops)."""
    by: dict = {}
    for e in spans:
        by.setdefault((e["cat"], e["args"]["stage"]), []).append(e["dur"] * 1e-6)
    assert not any(k[0] == FB for k in by)
    per_op = {k: statistics.median(v) for k, v in by.items()}
    return OpTimes(f=1.0, b=2.0, w=1.0, comm=comm, per_op=per_op)  # every op has its per_op entry


@pytest.mark.parametrize(
    "change,words",
    [
        ("flags", ["is a 1f1b step with --pp 2 and --microbatches 2", "--schedule zb1p"]),
        ("missing", ["cannot read trace", "No such file"]),
        ("not json", ["is not JSON"]),
        ("no events", ["holds no pipeline ops"]),
        ("bad event", ["event 2 is not a well-formed pipeline op"]),
        ("dropped op", ["is not the op order of any schedule"]),
        ("swapped ops", ["is not the op order of any schedule"]),
        ("devices", ["not 0 .. 1"]),
        ("times", ["--f, --w cannot go with --trace"]),
    ],
)
def test_bad_traces_are_one_line_errors(tmp_path, capsys, change, words):
    doc = _hand_trace()
    events = doc["traceEvents"]
    argv = []
    if change == "flags":
        argv = ["--schedule", "zb1p"]
    elif change == "no events":
        doc["traceEvents"] = events[:2]
    elif change == "bad event":
        events[2]["name"] = "G0"
    elif change == "dropped op":
        del events[-1]
    elif change == "swapped ops":
        events[4]["ts"], events[5]["ts"] = events[5]["ts"], events[4]["ts"]
    elif change == "devices":
        for e in events:
            e["tid"] = 2 * e["tid"]
    elif change == "times":
        argv = ["--f", "1", "--w", "0.5"]
    path = _write(tmp_path, doc)
    if change == "missing":
        path = tmp_path / "nope.json"
    elif change == "not json":
        path.write_bytes(b'{"traceEvents": [')
    code, _, err = cli(["plan", "schedule", "--trace", path, *argv], capsys)
    assert_one_error(code, err, *words)


def test_schedule_without_trace_still_needs_its_flags(capsys):
    code, _, err = cli(["plan", "schedule", "--pp", "2"], capsys)
    assert_one_error(code, err, "needs --schedule, --microbatches")


# ---------------------------------------------------------------------------- a trace of the real runtime
def _traced_step(rank, path, schedule, pp, n_micro):
    """Two pipeline steps of the test model on 2 gloo processes; the second step's trace is written to ``path``."""
    from datetime import timedelta

    import torch.distributed as dist
    from pipeline_worker import SEQ, batches, build_model

    from dsv3.parallel.pipeline.executor import PipelineRuntime
    from dsv3.parallel.pipeline.train import write_step_trace

    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    model = build_model(4)
    model.train()
    rt = PipelineRuntime(model, schedule, pp, seq_len=SEQ)
    for step in range(2):
        res = rt.step(batches(step, n_micro))
    write_step_trace(path, rt, res)
    return res.t0, [(e.op, e.start, e.end) for e in res.trace if e.op.is_compute]


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_trace_of_the_pipeline_runtime(tmp_path, capsys):
    from dist_helpers import run_ranks

    path = tmp_path / "pipeline_trace.json"
    got = run_ranks(_traced_step, 2, str(path), "zb1p", 2, 4, timeout=75)
    out = json.loads(_run(capsys, "--trace", path, "--schedule", "zb1p", "--pp", "2", "--microbatches", "4", "--json"))
    spans = [e for e in json.loads(path.read_text())["traceEvents"] if e["ph"] == "X"]
    makespan = (max(e["ts"] + e["dur"] for e in spans) - min(e["ts"] for e in spans)) * 1e-6
    assert out["measured"]["makespan"] == pytest.approx(makespan, rel=1e-9)
    # the same as the workers' own clocks said (shared monotonic clock of this machine)
    ends = [t0 + e for t0, ops in got for _, _, e in ops]
    starts = [t0 + s for t0, ops in got for _, s, _ in ops]
    assert out["measured"]["makespan"] == pytest.approx(max(ends) - min(starts), rel=1e-6)
    busy = [sum(e["dur"] for e in spans if e["tid"] == d) * 1e-6 for d in (0, 1)]
    assert out["measured"]["idle"] == pytest.approx([makespan - b for b in busy], rel=1e-9)
    sim = run_schedule(build_schedule("zb1p", 2, 4), _median_times(spans))
    assert out["simulated"]["makespan"] == pytest.approx(sim.makespan, rel=1e-9)
    assert out["simulated"]["idle"] == pytest.approx(sim.bubble, rel=1e-9, abs=1e-12)
    assert {(e["cat"]) for e in spans} == {F, B, W}


# ---------------------------------------------------------------------------- the library pieces
def test_per_op_times_override_the_kind_times_per_stage():
    from dsv3.errors import ConfigError
    from dsv3.plan.simulate import op_key
    from dsv3.schedules import Op

    t = OpTimes(f=1.0, b=2.0, w=0.5, per_op={(F, 1): 4.0, (FB, 0, 1): 9.0})
    assert t.of(Op(F, 0, 1)) == 4.0 and t.of(Op(F, 0, 0)) == 1.0 and t.of(Op(B, 0, 1)) == 1.5
    assert t.of(Op(FB, 3, 0, b_microbatch=1, b_stage=1)) == 9.0 and op_key(Op(FB, 3, 0, b_stage=1)) == (FB, 0, 1)
    with pytest.raises(ConfigError, match="finite number >= 0"):
        OpTimes(per_op={(F, 0): -1.0})
    # 1F1B pp=2, m=2 with a stage-1 forward twice as long: the hand-worked makespan
    # dev0 F0 0-1, F1 1-2; dev1 F0 1-3, BW0 3-5, F1 5-7, BW1 7-9; dev0 BW0 5-7, BW1 9-11
    sched = build_schedule("1f1b", 2, 2)
    assert run_schedule(sched, OpTimes(f=1.0, b=2.0, w=0.0, per_op={(F, 1): 2.0})).makespan == pytest.approx(11.0)


def test_measured_op_times_per_kind_follow_the_simulators_b_and_w():
    from dsv3.plan.trace import measured_op_times, measured_span
    from dsv3.schedules import Op

    split = [
        [(Op(F, 0, 0), 0.0, 1.0), (Op(B, 0, 0), 1.0, 2.5), (Op(W, 0, 0), 2.5, 3.0)],
        [(Op(F, 0, 1), 1.0, 4.0), (Op(B, 0, 1), 4.0, 4.5), (Op(W, 0, 1), 5.0, 6.0)],
    ]
    t = measured_op_times(split, comm=0.25)
    # medians over both stages: F (1, 3) -> 2, B (1.5, 0.5) -> 1, W (0.5, 1) -> 0.75; b = B + W
    assert (t.f, t.b, t.w, t.comm) == pytest.approx((2.0, 1.75, 0.75, 0.25))
    assert t.per_op == pytest.approx({(F, 0): 1.0, (B, 0): 1.5, (W, 0): 0.5, (F, 1): 3.0, (B, 1): 0.5, (W, 1): 1.0})
    assert measured_op_times(split, per_stage=False).per_op is None
    mixed = [[(Op(BW, 0, 0), 0.0, 3.0), (Op(B, 1, 0), 3.0, 5.0), (Op(W, 1, 0), 5.0, 6.0)]]
    t = measured_op_times(mixed)
    assert (t.b, t.w) == pytest.approx((3.0, 1.0))  # full backward 3, its split input part 2: W = 1
    makespan, busy, idle, t0 = measured_span(split)
    assert (makespan, t0) == (6.0, 0.0) and busy == [3.0, 4.5] and idle == [3.0, 1.5]
