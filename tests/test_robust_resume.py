"""Robustness, classes 4-5: strict and honest resume, damaged checkpoints, the run lock, preemption
(SIGTERM) and full disks.

Each CLI test checks the exit code, that stderr holds one ``dsv3: error:`` line and no traceback,
and which files are left on disk.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import assert_one_error, cli, read_jsonl
from robust_helpers import flags, mounted_tmpfs, run_dsv3, tiny_options, tree_digest

from dsv3.checkpoint.state import (
    list_checkpoints,
    remove_stale_temporaries,
    select_resume_checkpoint,
    verify_checkpoint,
)
from dsv3.errors import CheckpointError, ConfigError
from dsv3.train.config import TrainConfig
from dsv3.train.loop import train
from dsv3.train.rundir import RunLock

STEP2, STEP4 = "step-0000002", "step-0000004"


@pytest.fixture(scope="module")
def base_run(train_setup, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4, and its per-step metrics."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DSV3_CACHE", str(tmp_path_factory.getbasetemp() / "dsv3-cache"))
        run = tmp_path_factory.mktemp("robust_base") / "run"
        train(
            TrainConfig.from_dict(tiny_options(train_setup, run, steps=4, save_every=2, eval_every=4)),
            log=lambda s: None,
        )
    assert [s for s, _ in list_checkpoints(str(run))] == [2, 4]
    return run, {r["step"]: r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r}


def _copy(base_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base_run[0], run)
    return run


# ============================================================== class 4: resume is strict and honest
@pytest.mark.parametrize("change", ["model", "init_from", "seq_len", "tokenizer", "data", "run_dir"])
def test_model_changing_flags_on_resume_are_refused(train_setup, base_run, tmp_path, capsys, change):
    run = _copy(base_run, tmp_path)
    before = tree_digest(run)
    value = {
        "model": "tiny",
        "init_from": run / "checkpoints" / STEP2,
        "seq_len": 32,
        "tokenizer": tmp_path / "other.json",
        "data": tmp_path,
        "run_dir": tmp_path / "elsewhere",
    }[change]
    if change == "tokenizer":
        shutil.copy(train_setup["tokenizer"], value)
        Path(value).write_text(Path(value).read_text().replace('"<|pad|>"', '"<|padding|>"'))
    code, _, err = cli(["train", "--resume", run, f"--{change.replace('_', '-')}", value], capsys)
    assert_one_error(code, err, f"--{change.replace('_', '-')}", "resume")
    assert tree_digest(run) == before  # nothing written, nothing renamed


def test_repeating_a_saved_value_on_resume_is_accepted(train_setup, base_run):
    from dsv3.train.preflight import refuse_frozen_overrides
    from dsv3.train.rundir import resume_config

    run = str(base_run[0])
    saved = resume_config(run, {})
    same = {
        "seq_len": str(saved.data.seq_len),
        "model": saved.model.name,
        "data.val_fraction": saved.data.val_fraction,
        "steps": "9",
    }
    refuse_frozen_overrides(saved, resume_config(run, same), same)  # no error: nothing frozen changes
    changed = {"data.seq_len": 32}  # a dotted name is the same flag
    with pytest.raises(ConfigError, match="--seq-len cannot change on --resume"):
        refuse_frozen_overrides(saved, resume_config(run, changed), changed)
    assert isinstance(saved, TrainConfig)


def test_resume_writes_effective_config_and_removes_stale_temporaries(base_run, tmp_path, capsys):
    run = _copy(base_run, tmp_path)
    stale_dir = run / "checkpoints" / ".step-0000006.k1ll3d.tmp"
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"half")
    stale_file = run / ".config.yaml.x7.tmp"
    stale_file.write_text("steps: 9\n")
    code, out, err = cli(["train", "--resume", run, "--steps", "5"], capsys)
    assert code == 0, err
    assert not stale_dir.exists() and not stale_file.exists() and "left by a killed run" in out
    from dsv3.train.rundir import resume_config

    assert resume_config(str(run), {}).schedule.steps == 5  # the override that applied, in config.yaml
    assert [s for s, _ in list_checkpoints(str(run))] == [2, 4, 5]


def test_interrupted_checkpoint_replace_is_repaired(base_run, tmp_path):
    """A kill between atomic_dir's two renames leaves step-N.old and no step-N: it is put back."""
    run = _copy(base_run, tmp_path)
    ckpts = run / "checkpoints"
    os.replace(ckpts / STEP4, ckpts / (STEP4 + ".old"))
    (ckpts / f".{STEP4}.abc.tmp").mkdir()
    removed = remove_stale_temporaries(str(run))
    assert removed == [str(ckpts / f".{STEP4}.abc.tmp")]
    assert sorted(os.listdir(ckpts)) == [STEP2, STEP4] and verify_checkpoint(str(ckpts / STEP4)) is None


CHECKPOINT_FILES = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "optimizer.safetensors",
    "rng.safetensors",
    "training_state.json",
    "manifest.json",
]


def _damage(path: Path, how: str) -> None:
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        with open(path, "r+b") as fh:
            fh.truncate(max(0, path.stat().st_size // 2))
    else:  # flip one byte in the middle: same size, different content
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["delete", "truncate", "flip"])
@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_verify_checkpoint_detects_each_kind_of_damage(base_run, tmp_path, name, how):
    ckpt = tmp_path / STEP4
    shutil.copytree(base_run[0] / "checkpoints" / STEP4, ckpt)
    assert verify_checkpoint(str(ckpt)) is None
    _damage(ckpt / name, how)
    reason = verify_checkpoint(str(ckpt))
    assert reason is not None and (name in reason or "manifest" in reason), reason


@pytest.mark.parametrize(
    "name,how", [("optimizer.safetensors", "delete"), ("rng.safetensors", "truncate"), ("model.safetensors", "flip")]
)
def test_damaged_newest_checkpoint_falls_back_and_says_so(base_run, tmp_path, capsys, name, how):
    run = _copy(base_run, tmp_path)
    _damage(run / "checkpoints" / STEP4 / name, how)
    code, out, err = cli(["train", "--resume", run, "--steps", "4"], capsys)
    assert code == 0, err
    assert f"{STEP4} is damaged" in out and f"falling back to {STEP2}" in out and "(step 2)" in out
    assert (run / "checkpoints" / (STEP4 + ".damaged")).is_dir()  # kept aside, never resumed
    assert verify_checkpoint(str(run / "checkpoints" / STEP4)) is None  # step 4 written again, intact
    again = {r["step"]: r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r}
    for step in (3, 4):  # steps 3 and 4 retrained from step 2: the same losses, bit for bit
        for key in ("loss", "lm_loss", "grad_norm"):
            assert again[step][key] == base_run[1][step][key], (step, key)


def test_every_checkpoint_damaged_is_one_line(base_run, tmp_path, capsys):
    run = _copy(base_run, tmp_path)
    for step in (STEP2, STEP4):
        (run / "checkpoints" / step / "manifest.json").unlink()
    before = tree_digest(run)
    code, _, err = cli(["train", "--resume", run], capsys)
    assert_one_error(code, err, "every checkpoint", "damaged")
    assert tree_digest(run) == before


def test_select_resume_checkpoint_picks_the_newest_intact(base_run, tmp_path):
    run = _copy(base_run, tmp_path)
    _damage(run / "checkpoints" / STEP4 / "training_state.json", "delete")
    said = []
    chosen = select_resume_checkpoint(str(run), said.append)
    assert chosen == str(run / "checkpoints" / STEP2)
    assert len(said) == 1 and "training_state.json is missing" in said[0]
    assert [s for s, _ in list_checkpoints(str(run))] == [2]


# ============================================================== class 4: the run lock
def test_locked_run_refuses_a_second_resume(base_run, tmp_path, capsys):
    run = _copy(base_run, tmp_path)
    before = tree_digest(run)
    with RunLock(str(run)):
        code, _, err = cli(["train", "--resume", run, "--steps", "6"], capsys)
    assert_one_error(code, err, "in use by another dsv3 process", f"pid {os.getpid()}")
    assert tree_digest(run) == before  # metrics.jsonl not touched: no duplicate steps


def test_lock_held_by_another_process_and_released_when_it_dies(base_run, tmp_path, capsys):
    run = _copy(base_run, tmp_path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from dsv3.train.rundir import RunLock; "
            f"lock = RunLock({str(run)!r}).acquire(); print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = cli(["train", "--resume", run], capsys)
        assert_one_error(code, err, "in use", f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait(timeout=30)
    with RunLock(str(run)):  # the kernel dropped the dead process's lock
        pass


# ============================================================== class 5: full disks
def test_full_disk_during_checkpoint_write(train_setup, tmp_path, capsys, monkeypatch):
    import dsv3.checkpoint.state as state

    real = state.save_file

    def full_disk(tensors, filename, *args, **kwargs):
        if STEP4 in filename:
            with open(filename, "wb") as fh:  # a partial file, then the disk is full
                fh.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(state, "save_file", full_disk)
    run = tmp_path / "run"
    code, _, err = cli(["train", *flags(tiny_options(train_setup, run, steps=4, save_every=2))], capsys)
    assert_one_error(code, err, "no space left on device", f"{STEP2} is intact", "--resume")
    assert os.listdir(run / "checkpoints") == [STEP2]  # temporary files removed
    assert verify_checkpoint(str(run / "checkpoints" / STEP2)) is None


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs (needs mount rights, else skipped)."""
    with mounted_tmpfs(tmp_path / "disk", "size=24m") as path:
        yield path


def test_real_full_disk_keeps_the_previous_checkpoint(train_setup, small_disk):
    run = small_disk / "run"

    def fill_disk(step):
        if step == 2:  # after checkpoint 2: leave 256 KiB, far less than a checkpoint needs
            st = os.statvfs(small_disk)
            free = st.f_bavail * st.f_frsize
            with open(small_disk / "filler", "wb") as fh:
                os.posix_fallocate(fh.fileno(), 0, free - 256 * 1024)

    with pytest.raises(CheckpointError, match="no space left on device") as info:
        train(
            TrainConfig.from_dict(tiny_options(train_setup, run, steps=4, save_every=2)),
            log=lambda s: None,
            step_hook=fill_disk,
        )
    assert STEP2 in str(info.value) and "\n" not in str(info.value)
    assert os.listdir(run / "checkpoints") == [STEP2]
    assert verify_checkpoint(str(run / "checkpoints" / STEP2)) is None


# ============================================================== class 5: preemption (SIGTERM)
# decay_start = decay_end = 1: the learning rate of a step does not depend on --steps, so a run
# stopped and resumed with another --steps trains exactly as a run that was never stopped.
def _preemptible(setup, run, steps):
    return tiny_options(
        setup, run, steps=steps, save_every=10_000, eval_every=10_000, decay_start=1.0, decay_end=1.0, warmup_steps=2
    )


def _start(argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "dsv3", *[str(a) for a in argv]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait_for_a_step(proc, run, timeout=180):
    metrics = run / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any('"loss"' in line for line in metrics.read_text().splitlines()):
            return
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"the run logged no step: {proc.communicate()[1][-2000:]}")


def _losses(run):
    return {
        r["step"]: (r["loss"], r["lm_loss"], r["grad_norm"]) for r in read_jsonl(run / "metrics.jsonl") if "loss" in r
    }


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_checkpoints_the_current_step_and_resume_is_bit_identical(train_setup, tmp_path):
    run = tmp_path / "preempted"
    proc = _start(["train", *flags(_preemptible(train_setup, run, 500))])
    _wait_for_a_step(proc, run)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err  # 128 + SIGTERM, as a shell reports it
    assert "interrupted by SIGTERM" in out + err and "Traceback" not in err
    steps = [s for s, _ in list_checkpoints(str(run))]
    assert len(steps) == 1 and 1 <= steps[0] < 500  # written at the end of the current step
    k = steps[0]
    assert verify_checkpoint(str(run / "checkpoints" / f"step-{k:07d}")) is None
    assert max(_losses(run)) == k  # the checkpoint is at the last logged step

    resumed = run_dsv3(["train", "--resume", run, "--steps", k + 2])
    assert resumed.returncode == 0, resumed.stderr
    straight = tmp_path / "straight"
    done = run_dsv3(["train", *flags(_preemptible(train_setup, straight, k + 2))])
    assert done.returncode == 0, done.stderr
    a, b = _losses(straight), _losses(run)
    assert sorted(a) == sorted(b) == list(range(1, k + 3))
    assert a == b  # bit for bit, including the steps after the resume


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_second_signal_stops_at_once(train_setup, tmp_path):
    run = tmp_path / "run"
    proc = _start(["train", *flags(_preemptible(train_setup, run, 500))])
    _wait_for_a_step(proc, run)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    # 130: the second signal stopped it at once; 143: the kernel merged the two (a pending signal is not queued)
    # and the run stopped after its checkpoint
    assert proc.returncode in (130, 143) and "Traceback" not in err, err
    assert (
        not [n for n in os.listdir(run / "checkpoints") if n.endswith(".tmp")]
        if (run / "checkpoints").exists()
        else True
    )
    for _, path in list_checkpoints(str(run)):  # whatever was written is complete
        assert verify_checkpoint(path) is None


def test_full_disk_outside_a_checkpoint_is_one_line(train_setup, tmp_path, capsys, monkeypatch):
    """A disk that fills up while metrics are written (not a checkpoint) is one line too, not a traceback."""
    from dsv3.errors import disk_error_message
    from dsv3.train.metrics import MetricsLogger

    real = MetricsLogger.log

    def log(self, record):
        if record.get("step") == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        return real(self, record)

    monkeypatch.setattr(MetricsLogger, "log", log)
    run = tmp_path / "run"
    code, _, err = cli(["train", *flags(tiny_options(train_setup, run, steps=3, save_every=1))], capsys)
    assert_one_error(code, err, "no space left on device", "metrics.jsonl", "--resume")
    assert [s for s, _ in list_checkpoints(str(run))] == [1]
    assert disk_error_message(OSError(errno.EACCES, "denied")) is None  # other errors are not disk errors


LIBRARY_SCRIPT = """
import json, sys
from dsv3.errors import TrainingPreempted
from dsv3.train.config import TrainConfig
from dsv3.train.loop import train

try:
    train(TrainConfig.from_dict(json.loads(sys.argv[1])), log=lambda s: None)
except Exception:  # the contract: a generic handler does not swallow the preemption
    print("swallowed")
except TrainingPreempted as exc:
    print(json.dumps({"signal": exc.signal_name, "checkpoint": exc.checkpoint, "step": exc.step,
                      "code": exc.exit_code}))
    sys.exit(exc.exit_code)
print("ran on")
"""


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigterm_to_a_script_calling_train_raises_with_the_checkpoint(train_setup, tmp_path):
    """The library preemption contract: the script sees TrainingPreempted with the checkpoint written."""
    import json

    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", LIBRARY_SCRIPT, json.dumps(_preemptible(train_setup, run, 500))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    _wait_for_a_step(proc, run)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen["signal"] == "SIGTERM" and seen["code"] == 143
    assert seen["checkpoint"] == str(run / "checkpoints" / f"step-{seen['step']:07d}")
    assert verify_checkpoint(seen["checkpoint"]) is None  # complete before the exception reached the script
    assert [s for s, _ in list_checkpoints(str(run))] == [seen["step"]]
