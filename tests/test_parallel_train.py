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
    return [
        "train",
        "--model",
        setup["model"],
        "--data",
        setup["corpus"],
        "--tokenizer",
        setup["tokenizer"],
        "--seq-len",
        "32",
        "--micro-batch",
        "2",
        "--global-batch",
        "8",
        "--steps",
        "3",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "1",
        "--eps",
        "1e-3",
        "--eval-every",
        "1000",
        "--eval-batches",
        "1",
        "--sample-tokens",
        "0",
        "--save-every",
        "1000",
        "--no-progress",
        "--no-tensorboard",
        "--run-dir",
        str(run_dir),
    ]


def _one_process(args) -> None:
    """``dsv3 ARGS`` in this process (no interpreter start-up: the reference runs of these tests)."""
    from dsv3.cli import main

    assert main(list(args)) == 0


def _ema_by_global_key(path) -> dict:
    """The EMA of a checkpoint under global keys (``{module}.{expert}.{leaf}`` for routed experts), read
    without dsv3's loaders: a one-process checkpoint's ema.safetensors, or a sharded one's ``ema/`` DCP keys."""
    import json

    import torch

    path = Path(path)
    if path.name.startswith("dcp-"):
        import torch.distributed.checkpoint as dcp

        meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        state = {
            k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in meta.items() if k.startswith("ema/")
        }
        dcp.load(state, checkpoint_id=str(path))
        return {k[len("ema/") :]: v for k, v in state.items()}
    from safetensors.torch import load_file

    from dsv3.checkpoint.state import join_tensors

    saved = json.loads((path / "training_state.json").read_text())["ema"]
    out = {}
    for name, t in join_tensors(saved, load_file(str(path / "ema.safetensors")))["shadow"].items():
        mod, _, leaf = name.rpartition(".")
        if mod.endswith(".experts"):
            out.update({f"{mod}.{e}.{leaf}": t[e] for e in range(t.shape[0])})
        else:
            out[name] = t
    return out


def _same_ema(got: dict, want: dict) -> None:
    import torch

    assert got and sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k].float(), want[k].float(), rtol=1e-4, atol=1e-6, msg=k)


def _torchrun(n, args, timeout):
    cmd = [
        TORCHRUN,
        f"--nproc-per-node={n}",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        "-m",
        "dsv3",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_torchrun_dp4_ep2_has_the_losses_of_one_process(train_setup, tmp_path):
    """Also: each rank reads only its part of the global batch, the sharded checkpoints hold the EMA, and the
    run continued in one process from step 2 ends with the EMA of the uninterrupted one-process run."""
    _one_process(_args(train_setup, tmp_path / "one") + ["--ema-decay", "0.5"])
    four = _torchrun(
        4,
        _args(train_setup, tmp_path / "four") + ["--ep", "2", "--dp", "4", "--save-every", "2", "--ema-decay", "0.5"],
        timeout=200,
    )
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

    want_ema = _ema_by_global_key(tmp_path / "one" / "checkpoints" / "step-0000003")
    _same_ema(_ema_by_global_key(tmp_path / "four" / "dcp-00000003"), want_ema)
    shutil.rmtree(tmp_path / "four" / "dcp-00000003")
    _one_process(["train", "--resume", str(tmp_path / "four")])
    last = [r for r in read_jsonl(tmp_path / "four" / "metrics.jsonl") if "loss" in r][-1]
    assert last["step"] == 3 and last["loss"] == pytest.approx(ref[2]["loss"], rel=1e-5)
    assert (tmp_path / "four" / "dcp-00000003").is_dir()  # and keeps writing sharded checkpoints
    _same_ema(_ema_by_global_key(tmp_path / "four" / "dcp-00000003"), want_ema)  # the EMA resumed, not restarted


@pytest.mark.timeout(120)
def test_bad_layout_fails_with_one_line_on_every_rank_before_writing(train_setup, tmp_path):
    """Both ranks of a torchrun world (its environment, set here: torchrun's agent stops the other workers as
    soon as one fails, so under load a slower rank could be killed before it speaks) say the same line."""
    run_dir = tmp_path / "bad"
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "dsv3", *_args(train_setup, run_dir), "--ep", "3"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(
                _env(),
                RANK=str(r),
                LOCAL_RANK=str(r),
                WORLD_SIZE="2",
                LOCAL_WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            ),
        )
        for r in range(2)
    ]
    try:
        outs = [p.communicate(timeout=100) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 2, err[-2000:]
        lines = [ln for ln in err.splitlines() if ln.startswith("dsv3: error:")]
        assert len(lines) == 1 and "--ep 3 does not divide the data-parallel degree 2" in lines[0]
    assert not run_dir.exists()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_one_process_checkpoint_resumes_under_torchrun(train_setup, tmp_path):
    import shutil

    run = tmp_path / "one"
    _one_process(_args(train_setup, run) + ["--save-every", "2", "--ema-decay", "0.5"])
    ref = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    want_ema = _ema_by_global_key(run / "checkpoints" / "step-0000003")
    shutil.rmtree(run / "checkpoints" / "step-0000003")
    two = _torchrun(2, ["train", "--resume", str(run), "--ep", "2"], timeout=200)
    assert two.returncode == 0, two.stderr[-3000:]
    last = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r][-1]
    assert last["step"] == 3 and last["loss"] == pytest.approx(ref[2]["loss"], rel=1e-5)
    assert (run / "dcp-00000003").is_dir()
    _same_ema(_ema_by_global_key(run / "dcp-00000003"), want_ema)  # the one-process EMA carried on under torchrun
