"""Robustness II, class 2: damaged sharded (DCP) checkpoints fall back to the newest intact one, or fail
with one line naming the file.

A tiny 2-rank torchrun run (module-scoped) writes ``dcp-00000001`` and ``dcp-00000002``; each case copies
its run directory, truncates, deletes or flips one file of ``dcp-00000002``, then exports (the run: falls back
and says so; the damaged checkpoint itself: one line naming the file), generates (one line) and, for one file
of each kind, resumes in one process (falls back, trains the step again, and the damaged checkpoint is
replaced by an intact one).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dist_helpers import free_port
from helpers import assert_one_error, cli
from robust_helpers import tree_digest

from dsv3.checkpoint.manifest import select_sharded, verify_sharded
from dsv3.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
NEW, OLD = "dcp-00000002", "dcp-00000001"
FILES = (".metadata", "__0_0.distcp", "__1_0.distcp", "meta.json", "manifest.json", "tokenizer.json")


@pytest.fixture(scope="module")
def sharded_run(train_setup, tmp_path_factory):
    """A finished 2-step run of 2 torchrun ranks (ep 2) with a sharded checkpoint after each step."""
    run = tmp_path_factory.mktemp("robust_sharded") / "run"
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        DSV3_DIST_TIMEOUT="60",
        DSV3_CACHE=str(tmp_path_factory.getbasetemp() / "dsv3-cache"),
    )
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        TORCHRUN,
        "--nproc-per-node=2",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        "-m",
        "dsv3",
        "train",
        "--model",
        train_setup["model"],
        "--data",
        train_setup["corpus"],
        "--tokenizer",
        train_setup["tokenizer"],
        "--seq-len",
        "16",
        "--micro-batch",
        "2",
        "--global-batch",
        "4",
        "--steps",
        "2",
        "--warmup-steps",
        "1",
        "--eval-every",
        "1000",
        "--eval-batches",
        "1",
        "--sample-tokens",
        "0",
        "--save-every",
        "1",
        "--no-progress",
        "--no-tensorboard",
        "--ep",
        "2",
        "--run-dir",
        str(run),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in run.glob("dcp-*")) == [OLD, NEW]
    assert sorted(os.listdir(run / NEW)) == sorted(FILES)
    return run


def _damage(path: Path, how: str) -> None:
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # flip one byte in the middle: same size, another SHA-256
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["truncate", "delete", "flip"])
def test_each_damaged_file_falls_back_or_is_one_line(sharded_run, tmp_path, capsys, how):
    for name in FILES:
        run = tmp_path / name / "run"
        shutil.copytree(sharded_run, run)
        _damage(run / NEW / name, how)
        before = tree_digest(run)
        reason = verify_sharded(str(run / NEW))
        if name == "manifest.json" and how == "delete":  # read as a checkpoint written before manifests
            assert reason is None
            continue
        assert reason is not None and name in reason, (name, how, reason)
        assert select_sharded(str(run)) == str(run / OLD)
        code, out, err = cli(["export", run, tmp_path / name / "hf"], capsys)  # the run: falls back, says so
        assert code == 0, err
        assert any(f"{NEW} is damaged" in line and f"falling back to {OLD}" in line for line in err), err
        line = assert_one_error(*cli(["export", run / NEW, tmp_path / name / "hf2"], capsys)[::2])
        assert name in line, line  # the damaged checkpoint given by name: one line naming the file
        line = assert_one_error(*cli(["generate", run / NEW, "--max-tokens", "2"], capsys)[::2])
        assert name in line, line  # generate reads sharded checkpoints too: the damaged file named
        assert tree_digest(run) == before  # nothing moved, repaired or deleted
        assert not (tmp_path / name / "hf2").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name,how", [("__1_0.distcp", "truncate"), (".metadata", "delete"), ("__0_0.distcp", "flip")])
def test_resume_falls_back_to_the_newest_intact_sharded_checkpoint(sharded_run, tmp_path, capsys, name, how):
    run = tmp_path / "run"
    shutil.copytree(sharded_run, run)
    _damage(run / NEW / name, how)
    code, out, err = cli(["train", "--resume", run], capsys)
    assert code == 0, err
    assert f"sharded checkpoint {NEW} is damaged" in out and f"falling back to {OLD}" in out, out
    assert verify_sharded(str(run / NEW)) is None  # step 2 trained again and written whole


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_every_sharded_checkpoint_damaged_is_one_line(sharded_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(sharded_run, run)
    _damage(run / NEW / "__0_0.distcp", "truncate")
    _damage(run / OLD / ".metadata", "delete")
    with pytest.raises(CheckpointError, match="every sharded checkpoint"):
        select_sharded(str(run))
    before = tree_digest(run)
    assert_one_error(*cli(["export", run, tmp_path / "hf"], capsys)[::2], "every sharded checkpoint", NEW)
    assert_one_error(*cli(["train", "--resume", run], capsys)[::2], "every sharded checkpoint")
    assert tree_digest(run) == before


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_resume_under_torchrun_falls_back_once(sharded_run, train_setup, tmp_path):
    """Under torchrun rank 0 verifies, says so once, and every rank loads the checkpoint it chose."""
    run = tmp_path / "run"
    shutil.copytree(sharded_run, run)
    _damage(run / NEW / "__1_0.distcp", "flip")
    env = dict(os.environ, OMP_NUM_THREADS="1", DSV3_DIST_TIMEOUT="60")
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        TORCHRUN,
        "--nproc-per-node=2",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        "-m",
        "dsv3",
        "train",
        "--resume",
        str(run),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (done.stdout + done.stderr).count(f"sharded checkpoint {NEW} is damaged") == 1, done.stdout
    assert f"resumed {run} from {OLD}" in done.stdout
    assert verify_sharded(str(run / NEW)) is None  # step 2 trained again and written whole
