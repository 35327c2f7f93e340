"""Learning-rate schedule and batch-size ramp: values at chosen steps against closed forms."""

import math

import pytest

from dsv3.errors import ConfigError
from dsv3.train.schedule import BatchRamp, LRSchedule

# The report's schedule, in steps of a hypothetical run: warmup 2000, constant to 10000,
# cosine over 5000 steps to 2.2e-5, tail 2.2e-5, last 500 steps at 7.3e-6.
REPORT = LRSchedule(
    peak_lr=2.2e-4,
    warmup_steps=2000,
    decay_start=10_000,
    decay_steps=5000,
    min_lr=2.2e-5,
    final_lr=7.3e-6,
    final_steps=500,
    total_steps=16_000,
)


def cosine(step, start, length, peak, low):
    return low + (peak - low) * 0.5 * (1 + math.cos(math.pi * (step - start) / length))


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 2.2e-4 / 2000),  # first warmup step
        (999, 2.2e-4 * 1000 / 2000),  # mid-warmup
        (1999, 2.2e-4),  # end of warmup
        (2000, 2.2e-4),  # constant phase
        (9999, 2.2e-4),  # last constant step
        (10_000, 2.2e-4),  # cosine starts at the peak
        (12_500, (2.2e-4 + 2.2e-5) / 2),  # mid-cosine: halfway between peak and min
        (11_234, cosine(11_234, 10_000, 5000, 2.2e-4, 2.2e-5)),
        (14_999, cosine(14_999, 10_000, 5000, 2.2e-4, 2.2e-5)),
        (15_000, 2.2e-5),  # end of decay
        (15_499, 2.2e-5),  # tail
        (15_500, 7.3e-6),  # final phase
        (15_999, 7.3e-6),
        (20_000, 7.3e-6),  # past the end: last value
    ],
)
def test_report_schedule_at_chosen_steps(step, expected):
    assert REPORT.lr_at(step) == pytest.approx(expected, rel=1e-12, abs=0)


def test_schedule_is_continuous_and_monotone_after_warmup():
    lrs = [REPORT.lr_at(s) for s in range(16_000)]
    assert all(a <= b for a, b in zip(lrs[:2000], lrs[1:2000]))
    assert all(a >= b for a, b in zip(lrs[1999:], lrs[2000:]))
    jumps = [abs(a - b) for a, b in zip(lrs[1999:15_499], lrs[2000:15_500])]
    assert max(jumps) < 2.2e-4 * math.pi / 5000  # cosine slope bound: no jumps before the final switch


def test_no_warmup_and_no_tail():
    s = LRSchedule(peak_lr=1e-3, decay_start=0, decay_steps=10, min_lr=0.0)
    assert s.lr_at(0) == 1e-3
    assert s.lr_at(5) == pytest.approx(0.5e-3)
    assert s.lr_at(10) == 0.0 and s.lr_at(10**6) == 0.0


def test_for_run_keeps_the_report_proportions():
    s = LRSchedule.for_run(14_800, peak_lr=2.2e-4)
    assert s.total_steps == 14_800
    assert s.warmup_steps == 148
    assert s.decay_start == 10_000 and s.decay_start + s.decay_steps == 14_300
    assert s.final_steps == 167
    assert s.min_lr == pytest.approx(2.2e-5) and s.final_lr == pytest.approx(7.3e-6)
    assert s.lr_at(14_299) == pytest.approx(cosine(14_299, 10_000, 4300, 2.2e-4, 2.2e-5))
    assert s.lr_at(14_300) == pytest.approx(2.2e-5) and s.lr_at(14_799) == pytest.approx(7.3e-6)
    assert LRSchedule.for_run(10**7).warmup_steps == 2000  # the report's 2K steps cap
    tiny = LRSchedule.for_run(3, peak_lr=1.0)  # degenerate lengths still make a valid schedule
    assert tiny.lr_at(0) == 1.0 and all(tiny.lr_at(s) > 0 for s in range(3))
    no_final = LRSchedule.for_run(1000, final_fraction=0.0)
    assert no_final.final_steps == 0 and no_final.lr_at(999) == no_final.min_lr


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"peak_lr": 0.0}, "peak_lr"),
        ({"peak_lr": 1e-3, "min_lr": 2e-3}, "min_lr"),
        ({"peak_lr": 1e-3, "warmup_steps": 10, "decay_start": 5}, "decay_start"),
        ({"peak_lr": 1e-3, "final_steps": 5, "total_steps": 100}, "final_lr"),
        ({"peak_lr": 1e-3, "final_steps": 5, "final_lr": 1e-5}, "total_steps"),
        (
            {
                "peak_lr": 1e-3,
                "decay_start": 50,
                "decay_steps": 50,
                "final_steps": 10,
                "final_lr": 1e-5,
                "total_steps": 100,
            },
            "final phase",
        ),
        ({"peak_lr": 1e-3, "decay_start": 50, "decay_steps": 60, "total_steps": 100}, "decay"),
        ({"peak_lr": 1e-3, "warmup_steps": 2.5}, "warmup_steps"),
        ({"peak_lr": float("nan")}, "peak_lr"),
    ],
)
def test_inconsistent_schedules_raise_one_sentence(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment) as info:
        LRSchedule(**kwargs)
    assert "\n" not in str(info.value)


def test_for_run_validation():
    with pytest.raises(ConfigError):
        LRSchedule.for_run(0)
    with pytest.raises(ConfigError):
        LRSchedule.for_run(100, warmup_steps=101)
    with pytest.raises(ConfigError):
        LRSchedule.for_run(100, decay_start_fraction=0.9, decay_end_fraction=0.5)
    with pytest.raises(ValueError):
        REPORT.lr_at(-1)


def test_batch_ramp_in_steps():
    ramp = BatchRamp(start=3072, end=15360, ramp_steps=100, micro_batch=16)
    assert ramp.batch_size_at(0) == 3072
    exact = 3072 + (15360 - 3072) * 37 / 100  # 7618.56 -> nearest multiple of 16
    assert ramp.batch_size_at(37) == 16 * round(exact / 16) == 7616
    assert ramp.batch_size_at(50) == 9216
    assert ramp.batch_size_at(100) == ramp.batch_size_at(10**9) == 15360
    sizes = [ramp.batch_size_at(s) for s in range(120)]
    assert all(b % 16 == 0 for b in sizes) and sizes == sorted(sizes)
    assert ramp.accumulation_steps(50) == 9216 // 16
    assert ramp.accumulation_steps(50, micro_batch=4) == 9216 // 4
    assert ramp.sequences_before(0) == 0
    assert ramp.sequences_before(120) == sum(sizes)
    with pytest.raises(ConfigError):
        ramp.accumulation_steps(50, micro_batch=7)
    with pytest.raises(ConfigError):
        ramp.tokens_before(3)  # no seq_len


def test_batch_ramp_in_tokens_follows_consumed_tokens():
    seq_len, ramp_tokens = 32, 40_000
    ramp = BatchRamp(start=8, end=40, ramp_tokens=ramp_tokens, seq_len=seq_len, micro_batch=4)
    tokens, step = 0, 0
    while tokens < ramp_tokens:  # independent recomputation of the definition
        exact = 8 + (40 - 8) * tokens / ramp_tokens
        want = max(4, 4 * math.floor(exact / 4 + 0.5))
        assert ramp.tokens_before(step) == tokens
        assert ramp.batch_size_at(step) == want, step
        tokens += want * seq_len
        step += 1
    assert ramp.batch_size_at(step) == ramp.batch_size_at(step + 1000) == 40
    assert ramp.tokens_before(step + 10) == tokens + 10 * 40 * seq_len


def test_report_batch_ramp():
    ramp = BatchRamp.report(micro_batch=16)
    assert ramp.batch_size_at(0) == 3072
    assert ramp.batch_size_at(10**6) == 15360
    # The last ramp step starts before 469B tokens, the first constant step after.
    n = next(s for s in range(0, 40_000) if ramp.batch_size_at(s) == 15360 and ramp.tokens_before(s) >= 469e9)
    assert ramp.tokens_before(n - 1) < 469e9 <= ramp.tokens_before(n)
    assert BatchRamp.constant(64, micro_batch=8).accumulation_steps(12345) == 8


@pytest.mark.parametrize(
    "kwargs",
    [
        {"start": 64, "end": 32, "ramp_steps": 10},
        {"start": 0, "end": 32, "ramp_steps": 10},
        {"start": 8, "end": 32},
        {"start": 8, "end": 32, "ramp_steps": 10, "ramp_tokens": 100, "seq_len": 4},
        {"start": 8, "end": 32, "ramp_tokens": 100},
        {"start": 8, "end": 32, "ramp_steps": -1},
        {"start": 8, "end": 32, "ramp_steps": 10, "micro_batch": 64},
    ],
)
def test_bad_batch_ramps_raise(kwargs):
    with pytest.raises(ConfigError) as info:
        BatchRamp(**kwargs)
    assert "\n" not in str(info.value)
