"""Pipeline schedules as data and their simulator, checked against the published numbers.

Published references (DualPipe README, arXiv 2412.19437 section 3.2.1; ZB-H1 from
arXiv 2401.10241), with F a forward chunk, B a FULL backward chunk, W its
weight part, F&B an overlapped forward+backward pair, PP the number of stages:

    bubble      1F1B (PP-1)(F+B); ZB1P (PP-1)(F+B-2W); DualPipe, DualPipeV (PP/2-1)(F&B+B-3W)
    activation  PP, PP, PP+1, PP+1 micro-batches per device
    parameters  1x, 1x, 2x, 2x per device;  devices PP, PP, PP, PP/2

Where they hold exactly (comm = 0), found by sweeping the simulator and explained
in dsv3.plan.simulate: 1F1B on every device for micro-batches >= PP; ZB1P on every
device when also W <= F and W <= B - W; DualPipe/V as the largest per-device
bubble when the input backward equals the forward (B - W = F), W <= F and
B <= F&B <= F + B (every device when F = W = B - W, the README figure's cells).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter

import pytest

from dsv3.errors import ConfigError
from dsv3.layout import SCHEDULES
from dsv3.plan.simulate import DeadlockError, simulate
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
)

TOL = 1e-9


# ----------------------------------------------------------------------------- published bubbles


@pytest.mark.parametrize("pp,m", [(2, 2), (3, 5), (4, 4), (4, 11), (8, 8), (8, 20), (12, 30)])
@pytest.mark.parametrize("f,b", [(1.0, 2.0), (0.7, 1.9), (2.0, 1.0)])
def test_1f1b_bubble_is_published_on_every_device(pp, m, f, b):
    res = simulate("1f1b", pp, m, f=f, b=b, w=0.3 * b)
    for bubble in res.bubble:
        assert bubble == pytest.approx((pp - 1) * (f + b), abs=TOL)
    assert res.makespan == pytest.approx((m + pp - 1) * (f + b), abs=TOL)


@pytest.mark.parametrize("pp,m", [(2, 2), (3, 7), (4, 4), (4, 9), (6, 12), (8, 20), (12, 24)])
@pytest.mark.parametrize("f,b,w", [(1.0, 2.0, 1.0), (1.0, 2.0, 0.5), (1.5, 2.5, 0.7), (1.0, 3.0, 0.9), (2.0, 1.0, 0.4)])
def test_zb1p_bubble_is_published_on_every_device(pp, m, f, b, w):
    assert w <= f and w <= b - w  # the condition under which ZB-H1's count is exact
    res = simulate("zb1p", pp, m, f=f, b=b, w=w)
    for bubble in res.bubble:
        assert bubble == pytest.approx((pp - 1) * (f + b - 2 * w), abs=TOL)


DUAL_TIMES = [  # (F, B, W, F&B) with B - W = F, W <= F, B <= F&B <= F + B
    (1.0, 2.0, 1.0, 3.0),
    (1.0, 2.0, 1.0, 2.0),
    (1.0, 1.5, 0.5, 2.5),
    (1.0, 1.5, 0.5, 1.8),
    (1.3, 2.0, 0.7, 2.9),
    (2.0, 2.1, 0.1, 3.0),
]


@pytest.mark.parametrize("pp,m", [(2, 4), (4, 8), (4, 14), (6, 12), (8, 16), (8, 20), (10, 28), (12, 24)])
@pytest.mark.parametrize("f,b,w,fb", DUAL_TIMES)
def test_dualpipe_bubble_is_published_as_the_per_device_maximum(pp, m, f, b, w, fb):
    res = simulate("dualpipe", pp, m, f=f, b=b, w=w, fb=fb)
    assert max(res.bubble) == pytest.approx((pp / 2 - 1) * (fb + b - 3 * w), abs=TOL)


@pytest.mark.parametrize("pp,m", [(2, 2), (2, 5), (4, 4), (4, 7), (6, 6), (8, 20), (10, 13), (12, 30)])
@pytest.mark.parametrize("f,b,w,fb", DUAL_TIMES)
def test_dualpipev_bubble_is_published_as_the_per_device_maximum(pp, m, f, b, w, fb):
    res = simulate("dualpipev", pp, m, f=f, b=b, w=w, fb=fb)
    assert res.devices == pp // 2
    assert max(res.bubble) == pytest.approx((pp / 2 - 1) * (fb + b - 3 * w), abs=TOL)


@pytest.mark.parametrize(
    "name,pp,m", [("dualpipe", 8, 20), ("dualpipe", 6, 16), ("dualpipev", 8, 20), ("dualpipev", 4, 9)]
)
def test_dualpipe_unit_cells_give_the_published_bubble_on_every_device(name, pp, m):
    f = 1.0  # the README figure: F = W = B - W, F&B = F + B
    res = simulate(name, pp, m, f=f, b=2 * f, w=f)
    for bubble in res.bubble:
        assert bubble == pytest.approx((pp / 2 - 1) * (3 * f + 2 * f - 3 * f), abs=TOL)
    # DualPipe's README example (8 PP ranks, 20 micro-batches): 60 units of work per device + 6 of bubble.
    if (name, pp, m) == ("dualpipe", 8, 20):
        assert res.makespan == pytest.approx(66.0)


def test_published_dualpipe_bubble_needs_its_conditions():
    # B - W = 1.5 != F = 1: the formula's 3 * (2.5 + 2 - 1.5) = 9 is not the simulated bubble.
    res = simulate("dualpipe", 8, 20, f=1.0, b=2.0, w=0.5, fb=2.5)
    assert abs(max(res.bubble) - 9.0) > 0.5


# ----------------------------------------------------------------------------- hand-derived timings


def test_two_stage_dualpipe_by_hand():
    # pp=2, 4 micro-batches; both devices (by symmetry) run
    #   F, F, F, BW, FB, BW, B, W  ->  makespan 3F + 3B + F&B with no bubble.
    f, b, w, fb = 1.1, 2.3, 0.6, 2.9
    res = simulate("dualpipe", 2, 4, f=f, b=b, w=w, fb=fb)
    assert [[e[3].kind for e in row] for row in res.timeline] == [[F, F, F, BW, FB, BW, B, W]] * 2
    assert res.makespan == pytest.approx(3 * f + 3 * b + fb)
    assert res.bubble == pytest.approx([0.0, 0.0], abs=TOL)


def test_1f1b_with_latency_by_hand():
    f, b, c = 1.0, 2.0, 0.25
    one = simulate("1f1b", 2, 1, f=f, b=b, comm=c)  # F, send, F, BW, send, BW
    assert one.makespan == pytest.approx(2 * f + 2 * b + 2 * c)
    two = simulate("1f1b", 2, 2, f=f, b=b, comm=c)
    # device 1: F0 [f+c, 2f+c], BW0, F1, BW1 ends 3f+2b+c; device 0's BW1 gets its gradient c later.
    assert two.makespan == pytest.approx(3 * f + 3 * b + 2 * c)
    assert [e[1] for e in two.timeline[1]] == pytest.approx([f + c, 2 * f + c, 2 * f + b + c, 3 * f + b + c])


def test_latency_never_shortens_a_step():
    for name, pp, m in [("1f1b", 4, 8), ("zb1p", 4, 8), ("dualpipe", 4, 8), ("dualpipev", 4, 8)]:
        spans = [simulate(name, pp, m, comm=c).makespan for c in (0.0, 0.1, 0.5)]
        assert spans[0] < spans[1] < spans[2]


# ----------------------------------------------------------------------------- activations and parameters


@pytest.mark.parametrize("pp,m", [(2, 4), (4, 8), (6, 12), (8, 16), (8, 20), (8, 33)])
def test_peak_activations_match_the_published_counts(pp, m):
    one = simulate("1f1b", pp, m)
    assert one.peak_activations == [pp - d for d in range(pp)]  # stage d holds pp - d; the table's PP is stage 0
    assert simulate("zb1p", pp, m).peak_activations == [pp] * pp
    if m % 2 == 0:
        assert simulate("dualpipe", pp, m).peak_activations == [pp + 1] * pp
    assert simulate("dualpipev", pp, m).peak_activations == [pp + 1] * (pp // 2)


def test_params_factor_and_devices():
    expected = {"1f1b": (1.0, 8), "zb1p": (1.0, 8), "dualpipe": (2.0, 8), "dualpipev": (2.0, 4)}
    for name, (factor, devices) in expected.items():
        res = simulate(name, 8, 16)
        assert (res.params_per_device_factor, res.devices) == (factor, devices)
        assert build_schedule(name, 8, 16).params_per_device_factor == factor
    assert build_schedule("dualpipe", 4, 8).device_stages == ((0, 3), (1, 2), (2, 1), (3, 0))
    assert build_schedule("dualpipev", 8, 8).device_stages == ((0, 7), (1, 6), (2, 5), (3, 4))


# ----------------------------------------------------------------------------- invariants on random configs


def _random_config(rng: random.Random):
    name = rng.choice(sorted(SCHEDULES))
    if name in ("1f1b", "zb1p"):
        pp = rng.randint(1, 9)
        m = rng.randint(1, 3 * pp + 2)
    elif name == "dualpipe":
        pp = 2 * rng.randint(1, 5)
        m = 2 * rng.randint(pp, 2 * pp + 3)
    else:
        pp = 2 * rng.randint(1, 6)
        m = rng.randint(pp, 3 * pp)
    f, b = rng.uniform(0.2, 2.0), rng.uniform(0.2, 3.0)
    w = rng.uniform(0.0, b)
    fb = rng.uniform(max(f, b), f + b)
    comm = rng.choice([0.0, 0.0, rng.uniform(0.0, 0.5)])
    return name, pp, m, dict(f=f, b=b, w=w, fb=fb, comm=comm)


def _duration(op: Op, t: dict) -> float:
    return {F: t["f"], B: t["b"] - t["w"], W: t["w"], BW: t["b"], FB: t["fb"]}[op.kind]


def test_invariants_on_random_configurations():
    rng = random.Random(1234)
    for _ in range(150):
        name, pp, m, t = _random_config(rng)
        sched = build_schedule(name, pp, m)
        res = simulate(sched, **t)

        # Every (micro-batch, stage) runs F, B and W exactly once, on one device that holds the stage.
        runs: Counter = Counter()
        device_of: dict = {}
        for d, ops in enumerate(sched.ops):
            for op in ops:
                halves = [(F, op.microbatch, op.stage, op.chunk)]
                if op.kind == FB:
                    halves.append((BW, op.b_microbatch, op.b_stage, op.b_chunk))
                elif op.kind in (B, W, BW):
                    halves = [(op.kind, op.microbatch, op.stage, op.chunk)]
                elif op.kind in (SEND, RECV):
                    continue
                for kind, mb, s, chunk in halves:
                    assert sched.device_stages[d][chunk] == s
                    for k in ("B", "W") if kind == BW else (kind,):
                        runs[k, mb, s] += 1
                        device_of.setdefault((mb, s), d)
                        assert device_of[mb, s] == d
        assert runs == Counter({(k, mb, s): 1 for k in "FBW" for mb in range(m) for s in range(pp)})

        # Sends match receives: same (src, dst, direction, micro-batch, stage), each once.
        sends = Counter(
            (d, op.peer, op.direction, op.microbatch, op.stage)
            for d, ops in enumerate(sched.ops)
            for op in ops
            if op.kind == SEND
        )
        recvs = Counter(
            (op.peer, d, op.direction, op.microbatch, op.stage)
            for d, ops in enumerate(sched.ops)
            for op in ops
            if op.kind == RECV
        )
        assert sends == recvs and max(sends.values(), default=1) == 1
        # ... and cross devices exactly where consecutive stages of a micro-batch do.
        hops = {(device_of[mb, s], device_of[mb, s + 1], mb, s + 1) for mb in range(m) for s in range(pp - 1)}
        assert {(a, b_, mb, s) for a, b_, dr, mb, s in sends if dr == FORWARD} == {h for h in hops if h[0] != h[1]}
        assert len([1 for *_, dr, _, _ in sends if dr == BACKWARD]) == len([h for h in hops if h[0] != h[1]])

        # Timeline: ops in list order, no overlap, each of the right length, busy/bubble consistent.
        compute = [[op for op in ops if op.kind not in (SEND, RECV)] for ops in sched.ops]
        ends: dict = {}
        for d, row in enumerate(res.timeline):
            assert [e[3] for e in row] == compute[d]
            prev = 0.0
            for label, start, end, op in row:
                assert start >= prev - TOL and end - start == pytest.approx(_duration(op, t))
                prev = end
                for kind, mb, s in (
                    [(F, op.microbatch, op.stage), (BW, op.b_microbatch, op.b_stage)]
                    if op.kind == FB
                    else [(op.kind, op.microbatch, op.stage)]
                ):
                    ends[kind, mb, s] = end
            assert res.busy[d] == pytest.approx(sum(_duration(op, t) for op in compute[d]))
            assert res.bubble[d] == pytest.approx(res.makespan - res.busy[d])
            assert res.bubble[d] >= -TOL
        assert res.makespan >= sum(res.busy) / res.devices - TOL

        # Each op starts exactly when its device is free and its inputs are there (ASAP, data + latency).
        def arrival(producer_key, mb, s_from, s_to):
            lag = 0.0 if device_of[mb, s_from] == device_of[mb, s_to] else t["comm"]
            return ends[producer_key] + lag

        for d, row in enumerate(res.timeline):
            prev = 0.0
            for label, start, end, op in row:
                ready = [prev]
                halves = (
                    [(F, op.microbatch, op.stage), (BW, op.b_microbatch, op.b_stage)]
                    if op.kind == FB
                    else [(op.kind, op.microbatch, op.stage)]
                )
                for kind, mb, s in halves:
                    if kind == F and s > 0:
                        ready.append(arrival((F, mb, s - 1), mb, s - 1, s))
                    if kind in (B, BW):
                        ready.append(ends[F, mb, s])
                        if s < pp - 1:
                            up = (B, mb, s + 1) if (B, mb, s + 1) in ends else (BW, mb, s + 1)
                            ready.append(arrival(up, mb, s + 1, s))
                    if kind == W:
                        ready.append(ends[B, mb, s])
                assert start == pytest.approx(max(ready), abs=1e-9)
                prev = end


# ----------------------------------------------------------------------------- bad input, bad op lists


@pytest.mark.parametrize(
    "name,pp,m",
    [
        ("dualpipe", 7, 14),
        ("dualpipe", 8, 14),
        ("dualpipe", 8, 17),
        ("dualpipev", 8, 7),
        ("dualpipev", 5, 10),
        ("dualpipev", 1, 4),
        ("1f1b", 0, 4),
        ("zb1p", 4, 0),
        ("1f1b", 2.5, 4),
        ("gpipe", 4, 8),
    ],
)
def test_bad_layouts_raise_one_sentence_config_errors(name, pp, m):
    with pytest.raises(ConfigError) as info:
        build_schedule(name, pp, m)
    message = str(info.value)
    assert message.endswith(".") and "\n" not in message


@pytest.mark.parametrize("times", [dict(w=3.0), dict(f=-1.0), dict(fb=float("nan")), dict(comm=-0.1)])
def test_bad_op_times_raise(times):
    with pytest.raises(ConfigError):
        simulate("1f1b", 2, 2, **times)


def _two_device(ops0, ops1) -> Schedule:
    return Schedule("hand", 2, 1, 2, ((0,), (1,)), (tuple(ops0), tuple(ops1)))


SEND_ACT = Op(SEND, 0, 1, peer=1, direction=FORWARD)
RECV_ACT = Op(RECV, 0, 1, peer=0, direction=FORWARD)
SEND_GRAD = Op(SEND, 0, 0, peer=0, direction=BACKWARD)
RECV_GRAD = Op(RECV, 0, 0, peer=1, direction=BACKWARD)
DEVICE_1 = [RECV_ACT, Op(F, 0, 1), Op(BW, 0, 1), SEND_GRAD]


def test_cyclic_waits_are_reported_as_deadlock():
    # Device 0 sends its activation only after its backward, which waits for device 1's gradient.
    with pytest.raises(DeadlockError, match="deadlocks: device 0 waits"):
        simulate(_two_device([RECV_GRAD, Op(F, 0, 0), Op(BW, 0, 0), SEND_ACT], DEVICE_1))


def test_an_early_recv_does_not_block_the_device():
    # RECV posts a receive; only the op that uses the data waits for it.
    res = simulate(_two_device([RECV_GRAD, Op(F, 0, 0), SEND_ACT, Op(BW, 0, 0)], DEVICE_1), f=1.0, b=2.0)
    assert res.makespan == pytest.approx(6.0)


@pytest.mark.parametrize(
    "ops0,ops1,why",
    [
        ([Op(F, 0, 0), SEND_ACT, RECV_GRAD, Op(BW, 0, 0)], [Op(F, 0, 1), Op(BW, 0, 1), SEND_GRAD], "needs act"),
        ([Op(F, 0, 0), SEND_ACT, RECV_GRAD, Op(BW, 0, 0)], [RECV_ACT, Op(F, 0, 1), Op(BW, 0, 1)], "no matching"),
        ([Op(F, 0, 0), SEND_ACT, RECV_GRAD, Op(B, 0, 0)], DEVICE_1, "never runs W"),
        ([Op(F, 0, 0), SEND_ACT, RECV_GRAD, Op(BW, 0, 0), Op(W, 0, 0)], DEVICE_1, "needs B|repeats"),
        ([SEND_ACT, Op(F, 0, 0), RECV_GRAD, Op(BW, 0, 0)], DEVICE_1, "not produced"),
        ([Op(F, 0, 1), SEND_ACT, RECV_GRAD, Op(BW, 0, 0)], DEVICE_1, "holds stage"),
    ],
)
def test_inconsistent_op_lists_are_rejected(ops0, ops1, why):
    with pytest.raises(ScheduleError, match=why):
        simulate(_two_device(ops0, ops1))


# ----------------------------------------------------------------------------- outputs


def test_to_json_and_plot(tmp_path):
    res = simulate("dualpipe", pp=4, microbatches=8, f=1.0, b=2.0, w=0.5, fb=2.5, comm=0.05)
    data = json.loads(json.dumps(res.to_json(timeline=True)))
    assert {"makespan", "bubble", "peak_activations", "devices", "params_per_device_factor"} <= set(data)
    assert data["devices"] == 4 and len(data["timeline"]) == 4
    assert data["timeline"][0][0]["kind"] == F and data["timeline"][0][0]["label"] == "F0"
    assert "timeline" not in res.to_json()

    from dsv3.plan.timeline import plot_timeline

    path = tmp_path / "timeline.png"
    assert plot_timeline(res, path) == str(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_schedules_and_simulator_import_neither_torch_nor_matplotlib():
    code = (
        "import sys, dsv3.plan.simulate, dsv3.schedules; "
        "bad = [m for m in ('torch', 'matplotlib') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
