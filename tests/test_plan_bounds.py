"""The planner stays bounded (issue 15, class 7): absurd sizes end in one line, exit code 2, at once.

Each CLI case runs `python -m dsv3 ...` in a subprocess, as a user would, with a
hard timeout: an input that made the planner run unbounded (hours of
simulation, gigabytes of op lists, a billion-step divisor loop) fails the test by
timing out instead of hanging CI.
"""

import itertools
import json
import os
import subprocess
import sys

import pytest
from helpers import assert_one_error

from dsv3.config import load_preset
from dsv3.errors import ConfigError
from dsv3.layout import balanced_stage_layers
from dsv3.plan import limits
from dsv3.plan.layout import Layout
from dsv3.plan.search import search
from dsv3.plan.simulate import simulate

TIMEOUT = 30  # seconds; the refusals take well under one, the rest is interpreter start-up on a busy machine
BIG = str(10**12)
HUGE = "9" * 400


def _run(argv: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "dsv3", *argv], capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path, env=env
    )


def _configs(tmp_path) -> dict[str, str]:
    """Malformed and absurd model configs."""
    files = {
        "not_utf8": b'\xff\xfe{"hidden_size": 7168}',
        "truncated": b'{"hidden_size": ',
        "nested": b"[" * 100_000 + b"]" * 100_000,
        "layers": json.dumps({"num_hidden_layers": 10**8}).encode(),
        "mtp": json.dumps({"num_nextn_predict_layers": 10**6}).encode(),
        "deep": json.dumps({"num_hidden_layers": 1024}).encode(),
    }
    out = {}
    for name, data in files.items():
        path = tmp_path / f"{name}.json"
        path.write_bytes(data)
        out[name] = str(path)
    with open(tmp_path / "huge.json", "wb") as f:  # sparse: 20 MiB that take no disk
        f.truncate(20 * 2**20)
    out["huge"] = str(tmp_path / "huge.json")
    return out


SEARCH = ["plan", "search", "--gpu-memory", "80GiB"]
CASES = [
    # plan search
    (SEARCH + ["--preset", "deepseek-v3", "--gpus", BIG], "--gpus 1,000,000,000,000 is more than the planner handles"),
    (SEARCH + ["--gpus", "2048"], "needs the model to plan: give --preset"),
    (SEARCH + ["--preset", "tiny", "--gpus", "0"], "--gpus must be a positive integer"),
    (SEARCH + ["--preset", "tiny", "--gpus", "8", "--ep", "0"], "--ep value must be a positive integer"),
    (SEARCH + ["--preset", "tiny", "--gpus", "8", "--pp", "-2"], "--pp value must be a positive integer"),
    (SEARCH + ["--preset", "tiny", "--gpus", "8", "--zero", "5"], "--zero values must be 0, 1, 2 or 3"),
    (SEARCH + ["--preset", "tiny", "--gpus", "8", "--top", "-1"], "--top must be an integer >= 0"),
    (SEARCH + ["--preset", "tiny", "--gpus", "8", "--global-batch", str(10**14)], "--global-batch 100,000,000,000,000"),
    (
        SEARCH
        + ["--preset", "deepseek-v3", "--gpus", str(2**20), "--ep", "1,2,4,8,16,32,64,128,256", "--zero", "0,1,2,3"],
        "layouts, more than the 10,000 one search tries",
    ),
    (
        ["plan", "search", "--preset", "tiny", "--gpus", "8", "--gpu-memory", "0GiB"],
        "--gpu-memory must be a positive size",
    ),
    # plan schedule
    (
        ["plan", "schedule", "--schedule", "1f1b", "--pp", "4", "--microbatches", str(10**8)],
        "4 pipeline stages x 100,000,000 micro-batches is more than the 32,768",
    ),
    (
        ["plan", "schedule", "--schedule", "dualpipe", "--pp", str(10**6), "--microbatches", str(10**6)],
        "--pp 1,000,000 is more than the planner handles",
    ),
    (["plan", "schedule", "--schedule", "1f1b", "--pp", "0", "--microbatches", "4"], "--pp must be a positive integer"),
    (
        ["plan", "schedule", "--schedule", "1f1b", "--pp", "4", "--microbatches", "-4"],
        "--microbatches must be a positive integer",
    ),
    (
        ["plan", "schedule", "--schedule", "dualpipe", "--pp", "128", "--microbatches", "256", "--plot", "t.png"],
        "too large to draw",
    ),
    # plan
    (["plan", "--config", "{deep}", "--pp", "1024"], "--pp 1024 is deeper than the planner simulates"),
    (["plan", "--preset", "tiny", "--micro-batch", HUGE], "--micro-batch (a 400-digit number) is more than"),
    (["plan", "--preset", "tiny", "--seq-len", "-1"], "--seq-len must be a positive integer"),
    (["plan", "--preset", "tiny", "--dp", BIG], "--dp 1,000,000,000,000 is more than the planner handles"),
    (["plan", "--preset", "tiny", "--gpus", BIG], "--gpus 1,000,000,000,000 is more than the planner handles"),
    (["plan", "--preset", "tiny", "--tp", "2", "--dp", str(2**20)], "the layout needs 2,097,152 GPUs"),
    (["plan", "--preset", "tiny", "--tokens", "1e400"], "--tokens must be a finite number > 0, got inf"),
    (
        ["plan", "--preset", "tiny", "--tokens", "1T", "--price-per-gpu-hour", "nan"],
        "--price-per-gpu-hour must be a finite number >= 0, got nan",
    ),
    (["plan", "--preset", "tiny", "--peak-tflops", "inf"], "--peak-tflops must be a finite number > 0"),
    (["plan", "--preset", "tiny", "--gpu-memory", "0GiB"], "--gpu-memory must be a positive size"),
    (["plan", "--preset", "tiny", "--gpu-memory", HUGE + "GiB"], "is larger than any device"),
    (["plan", "--preset", "tiny", "--gpu-memory", "1e400GiB"], "is larger than any device"),
    (["plan", "--preset", "tiny", "--stage-layers", "x" * 100_000], "must be integers separated by commas"),
    (["plan", "--preset", "tiny", "--schedule", "g" * 100_000], "unknown schedule 'ggg"),
    (["plan", "--preset", "tiny", "--precision", "w" * 100_000], "is not ITEM=FORMAT"),
    # model configs
    (["plan", "--config", "{not_utf8}"], "is not UTF-8 text"),
    (["plan", "--config", "{truncated}"], "is not valid JSON"),
    # The model config's own checks (dsv3.config) refuse these before the planner's bounds see them.
    (["plan", "--config", "{nested}"], "is nested too deeply"),
    (["plan", "--config", "{layers}"], "num_hidden_layers must be between 1 and 65,536, got 100,000,000"),
    (["plan", "--config", "{mtp}"], "num_nextn_predict_layers must be between 0 and 65,536"),
    (["plan", "--config", "{huge}"], "is 20,971,520 bytes, not a config.json"),
    (["plan", "--config", "/dev/zero"], "is not a regular file"),
    (["plan", "search", "--config", "{layers}", "--gpus", "8", "--gpu-memory", "80GiB"], "num_hidden_layers"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("argv,needle", CASES, ids=[" ".join(a)[:70] for a, _ in CASES])
def test_absurd_input_gives_one_line_and_exit_2_at_once(tmp_path, argv, needle):
    configs = _configs(tmp_path)
    argv = [a.format(**configs) if a.startswith("{") else a for a in argv]
    res = _run(argv, tmp_path)
    line = assert_one_error(res.returncode, res.stderr, needle)
    assert len(line) < 400  # one readable line, whatever was pasted
    assert res.stdout == "" and not (tmp_path / "t.png").exists()


@pytest.mark.timeout(60)
def test_a_long_step_is_extrapolated_not_simulated_op_by_op(tmp_path):
    """10^6 micro-batches through 16 stages: two short simulations and a straight line, at once."""
    res = _run(["plan", "--preset", "deepseek-v3", "--pp", "16", "--global-batch", str(10**6), "--json"], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    doc = json.loads(res.stdout)
    assert doc["schedule"]["microbatches"] == 10**6 and doc["schedule"]["extrapolated"] is True
    assert doc["schedule"]["peak_activations"][0] == 16  # 1F1B's first device holds PP micro-batches


def test_extrapolated_plan_matches_the_full_simulation(monkeypatch):
    """Lower the simulation bound so that a short step is extrapolated, and compare with simulating it whole."""
    from dsv3.plan.planner import make_plan

    small = load_preset("small")
    for schedule, m in (
        ("1f1b", 40),
        ("1f1b", 43),
        ("zb1p", 41),
        ("dualpipe", 40),
        ("dualpipe", 42),
        ("dualpipev", 40),
    ):
        lay = Layout(pp=4, ep=2, dp=2, seq_len=512, global_batch=2 * m, schedule=schedule)
        whole = make_plan(small, lay)
        assert not whole.schedule.extrapolated
        with monkeypatch.context() as mp:
            mp.setattr(limits, "MAX_PIPELINE_CELLS", 80)
            line = make_plan(small, lay)
        assert line.schedule.extrapolated
        assert line.schedule.makespan == pytest.approx(whole.schedule.makespan, rel=1e-9)  # whole periods: exact
        assert line.schedule.bubble == pytest.approx(whole.schedule.bubble, rel=1e-9)
        assert line.schedule.peak_activations == whole.schedule.peak_activations
        assert [d.total for d in line.devices] == [d.total for d in whole.devices]


@pytest.mark.timeout(60)
def test_search_says_which_model_it_plans(tmp_path):
    res = _run(
        [
            "plan",
            "search",
            "--preset",
            "tiny",
            "--gpus",
            "4",
            "--gpu-memory",
            "1GiB",
            "--seq-len",
            "256",
            "--schedule",
            "1f1b",
            "--recompute",
            "none",
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0].startswith("tiny on 4 GPUs")


# ---------------------------------------------------------------------------- the library refuses the same sizes
TINY = load_preset("tiny")


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "changes,needle",
    [
        (dict(dp=10**12), "--dp 1,000,000,000,000"),
        (dict(pp=2, global_batch=10**13), "--global-batch 10,000,000,000,000 is more than the planner handles"),
        (dict(micro_batch=10**400), "401-digit"),
        (dict(seq_len=0), "--seq-len must be a positive integer"),
        (dict(tp=True), "--tp must be an integer"),
        (dict(zero=1.0), "--zero must be 0, 1, 2 or 3"),
    ],
)
def test_layout_validate_bounds_every_size(changes, needle):
    with pytest.raises(ConfigError, match=None) as exc:
        Layout(**changes).validate(TINY)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_simulator_and_search_refuse_before_building_anything():
    with pytest.raises(ConfigError, match="stage micro-batches"):
        simulate("dualpipe", pp=8, microbatches=10**9)
    with pytest.raises(ConfigError, match="more than the planner handles"):
        search(TINY, 10**12, 2**30)
    with pytest.raises(ConfigError, match="decoder layers"):
        search(TINY.replace(num_hidden_layers=limits.MAX_LAYERS + 1), 8, 2**30)


def test_checks_accept_the_bounds_themselves():
    assert limits.check_int("x", limits.MAX_COUNT) == limits.MAX_COUNT
    assert limits.check_gpus("gpus", limits.MAX_GPUS) == limits.MAX_GPUS
    limits.check_pipeline(1, limits.MAX_PIPELINE_CELLS)
    with pytest.raises(ConfigError):
        limits.check_pipeline(2, limits.MAX_PIPELINE_CELLS // 2 + 1)
    for bad in (float("nan"), float("inf"), -1.0, "1"):
        with pytest.raises(ConfigError):
            limits.check_float("f", bad)
    assert limits.check_float("f", 0.0) == 0.0
    with pytest.raises(ConfigError):
        limits.check_float("f", 0.0, inclusive=False)


def test_divisors_against_brute_force():
    for n in list(range(1, 200)) + [2**20, 2**20 - 1, 10**6, 997 * 991]:
        ref = [d for d in range(1, n + 1) if n % d == 0] if n < 10**5 else None
        got = limits.divisors(n)
        assert got == sorted(got) and all(n % d == 0 for d in got)
        if ref is not None:
            assert got == ref
        else:
            assert len(got) == len(set(got)) and all(n // d in got for d in got)


@pytest.mark.timeout(60)
def test_balanced_split_is_optimal_against_brute_force():
    """The pruned dynamic programme gives a split with the least (slowest stage, sum of squared stage costs)."""

    def score(split, costs, first, last):
        out, start = [], 0
        for k, n in enumerate(split):
            c = sum(costs[start : start + n]) + (first if k == 0 else 0.0) + (last if k == len(split) - 1 else 0.0)
            out.append(c)
            start += n
        return (max(out), sum(c * c for c in out))

    rng = __import__("random").Random(0)
    for _ in range(300):
        n = rng.randint(1, 12)
        pp = rng.randint(1, n)
        costs = [float(rng.choice([0, 1, 1, 2, 3])) for _ in range(n)]
        first, last = float(rng.choice([0, 1])), float(rng.choice([0, 2]))
        splits = [
            tuple(b - a for a, b in zip((0,) + cuts, cuts + (n,)))  # every contiguous split into pp stages
            for cuts in itertools.combinations(range(1, n), pp - 1)
        ]
        best = min(score(s, costs, first, last) for s in splits)
        got = balanced_stage_layers(costs, first, last, pp)
        assert sum(got) == n and min(got) >= 1 and score(got, costs, first, last) == best
