"""MaxVio, metrics.jsonl (fields, non-finite values, resume truncation), progress display and `dsv3 plot`."""

import io
import json
import math

import numpy as np
import pytest
import torch
from helpers import assert_one_error, cli

from dsv3.cli import main
from dsv3.errors import DataError, RunDirError
from dsv3.train.metrics import STEP_FIELDS, MetricsLogger, ProgressBar, maxvio, read_metrics
from dsv3.train.plots import plot_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def strict_json(line):
    def reject(token):
        raise AssertionError(f"non-standard JSON constant {token}")

    return json.loads(line, parse_constant=reject)


# ---------------------------------------------------------------- maxvio


def test_maxvio_of_one_layer():
    assert maxvio([1, 2, 3, 6]) == pytest.approx((6 - 3) / 3)
    assert maxvio([5, 5, 5, 5]) == 0.0
    assert maxvio([0, 0, 0]) == 0.0
    assert maxvio([]) == 0.0
    assert maxvio(torch.tensor([0, 0, 0, 8])) == pytest.approx(3.0)
    assert maxvio(np.array([2.0, 6.0])) == pytest.approx(0.5)


def test_maxvio_takes_the_worst_layer():
    load = [[4, 4, 4, 4], [1, 1, 1, 5], [0, 0, 0, 0], [2, 4, 6, 8]]
    per_layer = [0.0, (5 - 2) / 2, 0.0, (8 - 5) / 5]
    assert maxvio(load) == pytest.approx(max(per_layer))
    assert maxvio(torch.tensor(load, dtype=torch.int64)) == pytest.approx(1.5)
    assert maxvio(np.array(load, dtype=np.float32)) == pytest.approx(1.5)
    with pytest.raises(ValueError):
        maxvio(3.0)


# ---------------------------------------------------------------- logger


def step_record(step, **extra):
    record = {
        "step": step,
        "loss": torch.tensor(3.0 - 0.01 * step),
        "lm_loss": 2.9 - 0.01 * step,
        "mtp_loss": np.float32(0.3),
        "balance_loss": 1e-4,
        "lr": 2.2e-4,
        "grad_norm": torch.tensor(0.7),
        "tokens_per_s": 1234.5,
        "maxvio": maxvio(torch.tensor([[3, 5, 4, 4]])),
    }
    record.update(extra)
    return record


def test_lines_hold_every_field_and_are_finite_json(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(step_record(1))
        log.log(step_record(2, val_loss=2.5, expert_load=torch.tensor([[3, 5, 4, 4], [4, 4, 4, 4]])))
        lines = (tmp_path / "metrics.jsonl").read_text().splitlines()  # flushed before close
        assert len(lines) == 2
    records = [strict_json(line) for line in lines]
    for record in records:
        for key in STEP_FIELDS:
            assert key in record
            assert isinstance(record[key], (int, float)) and math.isfinite(record[key]), key
        assert "nonfinite" not in record
    assert records[1]["val_loss"] == 2.5 and records[1]["expert_load"] == [[3, 5, 4, 4], [4, 4, 4, 4]]
    assert records[0]["loss"] == pytest.approx(2.99) and records[0]["maxvio"] == pytest.approx(0.25)
    assert read_metrics(tmp_path) == records


def test_non_finite_values_become_null_with_a_flag(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        written = log.log(step_record(3, loss=float("nan"), grad_norm=torch.tensor(float("inf")), lm_loss=-math.inf))
    line = strict_json((tmp_path / "metrics.jsonl").read_text())
    assert line["loss"] is None and line["grad_norm"] is None and line["lm_loss"] is None
    assert line["nonfinite"] == {"loss": "nan", "grad_norm": "inf", "lm_loss": "-inf"}
    assert written == line
    (back,) = read_metrics(tmp_path)
    assert math.isnan(back["loss"]) and back["grad_norm"] == math.inf and back["lm_loss"] == -math.inf


def test_resume_truncates_steps_after_the_checkpoint(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for step in range(1, 11):
            log.log(step_record(step))
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 11, "loss": 1.')  # a crash in the middle of a write
    with MetricsLogger(tmp_path, tensorboard=False, start_step=6) as log:
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
        log.log(step_record(7))
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6, 7]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary files left


def test_a_torn_last_line_is_dropped_when_reopened(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log({"step": 2, "loss": 1.5})
    assert [strict_json(x)["step"] for x in path.read_text().splitlines()] == [1, 2]


def test_corrupt_lines_are_data_errors(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(DataError, match="line 2"):
        read_metrics(tmp_path)
    with pytest.raises(DataError):
        MetricsLogger(tmp_path, tensorboard=False, start_step=2)
    assert path.read_text() == '{"step": 1}\nnot json\n{"step": 3}\n'  # left as it was
    with pytest.raises(RunDirError):
        read_metrics(tmp_path / "missing")
    with MetricsLogger(tmp_path / "other", tensorboard=False) as log:
        with pytest.raises(ValueError):
            log.log({"loss": 1.0})


def test_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    with MetricsLogger(tmp_path, tensorboard=True) as log:
        assert log.tensorboard_enabled
        log.log(step_record(1))
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    with MetricsLogger(tmp_path / "off", tensorboard=False) as log:
        assert not log.tensorboard_enabled
    assert not (tmp_path / "off" / "tensorboard").exists()


# ---------------------------------------------------------------- progress


def test_progress_lines_show_step_loss_throughput_lr_and_eta():
    out = io.StringIO()  # not a terminal: "auto" falls back to plain lines
    bar = ProgressBar(100, initial=40, stream=out, every=20)
    assert bar.mode == "lines"
    for step in range(41, 101):
        bar.update(step, loss=2.5, tokens_per_s=12345.6, lr=2.2e-4)
    bar.close()
    lines = out.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["step 60/100", "step 80/100", "step 100/100"]
    assert "loss 2.5000" in lines[0] and "tok/s 12,346" in lines[0] and "lr 2.20e-04" in lines[0] and "eta " in lines[0]
    assert lines[-1].endswith("eta 0:00:00")


def test_progress_bar_and_off_modes():
    out = io.StringIO()
    with ProgressBar(10, mode="bar", stream=out) as bar:
        bar.update(5, loss=1.25, tokens_per_s=99.0, lr=1e-3)
        bar._bar.refresh()
    text = out.getvalue()
    assert "5/10" in text and "loss 1.2500" in text and "lr 1.00e-03" in text
    silent = io.StringIO()
    with ProgressBar(10, mode="off", stream=silent) as bar:
        bar.update(10, loss=1.0)
        bar.write("hello")
    assert silent.getvalue() == ""


# ---------------------------------------------------------------- plots


def write_run(run_dir, steps=60, layers=3, experts=8):
    rng = np.random.default_rng(0)
    with MetricsLogger(run_dir, tensorboard=False) as log:
        for step in range(1, steps + 1):
            extra = {}
            if step % 10 == 0:
                extra["val_loss"] = 3.0 / math.sqrt(step) + 0.2
            if step % 5 == 0:
                load = rng.integers(50, 150, size=(layers, experts))
                load[0, 0] += 400 // step  # an overloaded expert that evens out
                extra["expert_load"] = load
                extra["expert_load_layers"] = list(range(1, layers + 1))
            rec = step_record(
                step, loss=3.0 / math.sqrt(step), lm_loss=2.8 / math.sqrt(step), mtp_loss=0.3 / math.sqrt(step), **extra
            )
            if step == 17:
                rec["loss"] = float("nan")
            log.log(rec)


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 200
    assert float(pixels[..., :3].std()) > 0.01  # not a blank canvas


def test_dsv3_plot_writes_both_pictures(tmp_path, capsys):
    run = tmp_path / "run"
    write_run(run)
    assert main(["plot", str(run)]) == 0
    printed = capsys.readouterr().out.split()
    assert [p.rsplit("/", 1)[-1] for p in printed] == ["loss.png", "expert_load.png"]
    for name in ("loss.png", "expert_load.png"):
        assert_png(run / name)
    out = tmp_path / "pictures"
    assert main(["plot", str(run), "--out", str(out), "--log-y"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["expert_load.png", "loss.png"]


def test_plot_without_expert_load_writes_losses_only(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for step in range(1, 30):
            log.log({"step": step, "loss": 1.0 / step})
    assert [p.name for p in plot_run(tmp_path)] == ["loss.png"]
    assert_png(tmp_path / "loss.png")


def test_bad_run_dirs_exit_2_with_one_line(tmp_path, capsys):
    empty_run = tmp_path / "empty"
    empty_run.mkdir()
    (empty_run / "metrics.jsonl").write_text("")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "metrics.jsonl").write_text('{"step": 1}\n[1, 2]\n{"step": 3}\n')
    no_metrics = tmp_path / "no_metrics"
    no_metrics.mkdir()
    bad_loads = tmp_path / "bad_loads"
    bad_loads.mkdir()
    (bad_loads / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 2.0, "expert_load": [[1, 2], [3]]}\n{"step": 2, "expert_load": [[1, 2]]}\n'
    )
    for run in (tmp_path / "missing", no_metrics, empty_run, corrupt, bad_loads):
        code, _, err = cli(["plot", str(run)], capsys)
        assert_one_error(code, err)
    assert not list(empty_run.glob("*.png")) and not list(no_metrics.iterdir())
