"""`torchrun -m dsv3 train` with dp=4, ep=2 trains the run one process trains; bad layouts fail on every rank."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_helpers import free_port
from helpers import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", DSV3_DIST_TIMEOUT="60")
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _args(setup, run_dir):
    return ["train", "--model", setup["model"], "--data", setup["corpus"], "--tokenizer", setup["tokenizer"],
            "--seq-len", "32", "--micro-batch", "2", "--global-batch", "8", "--steps", "3", "--lr", "3e-3",
            "--warmup-steps", "1", "--eps", "1e-3", "--eval-every", "1000", "--eval-batches", "1",
            "--sample-tokens", "0", "--save-every", "1000", "--no-progress", "--no-tensorboard",
            "--run-dir", str(run_dir)]


def _torchrun(n, args, timeout):
    cmd = [TORCHRUN, f"--nproc-per-node={n}", "--master-addr=127.0.0.1", f"--master-port={free_port()}",
           "-m", "dsv3", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_torchrun_dp4_ep2_has_the_losses_of_one_process(train_setup, tmp_path):
    one = subprocess.run([sys.executable, "-m", "dsv3", *_args(train_setup, tmp_path / "one")], capture_output=True,
                         text=True, timeout=180, env=_env())
    assert one.returncode == 0, one.stderr[-3000:]
    four = _torchrun(4, _args(train_setup, tmp_path / "four") + ["--ep", "2", "--dp", "4", "--save-every", "2"],
                     timeout=200)
    assert four.returncode == 0, four.stderr[-3000:]
    ref = [r for r in read_jsonl(tmp_path / "one" / "metrics.jsonl") if "loss" in r]
    got = [r for r in read_jsonl(tmp_path / "four" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in got] == [r["step"] for r in ref] == [1, 2, 3]
    for a, b in zip(got, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        if "expert_load" in b:
            assert a["expert_load"] == b["expert_load"]  # loads summed over the ranks: the global ones
        assert a["a2a_bytes_per_rank"] > 0 and 1.0 <= a["nodes_per_token"] <= 2.0
    assert four.stdout.count("done in") == 1  # rank 0 alone talks
    assert sorted(p.name for p in (tmp_path / "four").glob("dcp-*")) == ["dcp-00000002", "dcp-00000003"]
    # the torchrun run continues in one process from its step-2 sharded checkpoint: step 3 as before
    import shutil

    shutil.rmtree(tmp_path / "four" / "dcp-00000003")
    resumed = subprocess.run([sys.executable, "-m", "dsv3", "train", "--resume", str(tmp_path / "four")],
                             capture_output=True, text=True, timeout=180, env=_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    last = [r for r in read_jsonl(tmp_path / "four" / "metrics.jsonl") if "loss" in r][-1]
    assert last["step"] == 3 and last["loss"] == pytest.approx(ref[2]["loss"], rel=1e-5)
    assert (tmp_path / "four" / "dcp-00000003").is_dir()  # and keeps writing sharded checkpoints


@pytest.mark.timeout(120)
def test_bad_layout_fails_with_one_line_on_every_rank_before_writing(train_setup, tmp_path):
    run_dir = tmp_path / "bad"
    proc = _torchrun(2, _args(train_setup, run_dir) + ["--ep", "3"], timeout=110)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("dsv3: error:")]
    assert len(lines) == 2 and all("--ep 3 does not divide the data-parallel degree 2" in ln for ln in lines)
    assert not run_dir.exists()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_one_process_checkpoint_resumes_under_torchrun(train_setup, tmp_path):
    import shutil

    run = tmp_path / "one"
    one = subprocess.run([sys.executable, "-m", "dsv3", *_args(train_setup, run), "--save-every", "2"],
                         capture_output=True, text=True, timeout=180, env=_env())
    assert one.returncode == 0, one.stderr[-3000:]
    ref = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    shutil.rmtree(run / "checkpoints" / "step-0000003")
    two = _torchrun(2, ["train", "--resume", str(run), "--ep", "2"], timeout=200)
    assert two.returncode == 0, two.stderr[-3000:]
    last = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r][-1]
    assert last["step"] == 3 and last["loss"] == pytest.approx(ref[2]["loss"], rel=1e-5)
    assert (run / "dcp-00000003").is_dir()
