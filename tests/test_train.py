"""The training loop end to end: learning, exact resume, crash-safe checkpoints, metrics, bad input."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import assert_one_error, cli, quick_options, read_jsonl

import dsv3
from dsv3.checkpoint.state import latest_checkpoint, list_checkpoints, load_checkpoint_state
from dsv3.cli import main
from dsv3.train.config import TrainConfig
from dsv3.train.loop import train

REQUIRED = ("step", "loss", "lm_loss", "mtp_loss", "balance_loss", "lr", "grad_norm", "tokens_per_s", "maxvio")


def _train(setup, run_dir, **changes):
    return train(TrainConfig.from_dict(quick_options(setup, run_dir, **changes)), log=lambda s: None)


def test_training_learns_checkpoints_and_logs_metrics(train_setup, tmp_path):
    result = _train(train_setup, tmp_path / "run", steps=24, eval_every=12, save_every=12)
    assert result.step == 24 and result.sample is not None
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 25))
    # visibly learns: from ln(512) = 6.24 the training loss falls by more than half a nat
    assert sum(r["lm_loss"] for r in records[-5:]) / 5 < records[0]["lm_loss"] - 0.6
    assert result.val_losses[-1][1] < result.val_losses[0][1] - 0.2  # held-out documents too
    for r in records:
        for key in REQUIRED:
            assert key in r and math.isfinite(r[key]), key
    assert any("val_loss" in r for r in records) and any("expert_load" in r for r in records)
    # checkpoints load in dsv3 as plain Hugging Face directories, router biases included
    assert [s for s, _ in list_checkpoints(str(tmp_path / "run"))] == [12, 24]
    model = dsv3.from_pretrained(latest_checkpoint(str(tmp_path / "run")))
    assert any(m.gate.e_score_correction_bias.abs().sum() > 0 for m in model.moe_layers())


def test_resume_gives_identical_per_step_losses(train_setup, tmp_path):
    _train(train_setup, tmp_path / "straight", steps=6)

    class Stop(Exception):
        pass

    def stop_at_3(step):
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        train(
            TrainConfig.from_dict(quick_options(train_setup, tmp_path / "resumed", steps=6)),
            log=lambda s: None,
            step_hook=stop_at_3,
        )
    assert [s for s, _ in list_checkpoints(str(tmp_path / "resumed"))] == [3]
    result = train(None, resume=str(tmp_path / "resumed"), log=lambda s: None)
    assert result.step == 6
    straight = [r for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl") if "loss" in r]
    resumed = [r for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]  # no duplicated lines
    for a, b in zip(straight, resumed):
        for key in ("loss", "lm_loss", "mtp_loss", "balance_loss", "grad_norm", "lr", "maxvio"):
            assert a[key] == b[key], (a["step"], key)  # bit for bit
    # the final weights are identical too
    w1 = dsv3.from_pretrained(latest_checkpoint(str(tmp_path / "straight"))).state_dict()
    w2 = dsv3.from_pretrained(latest_checkpoint(str(tmp_path / "resumed"))).state_dict()
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_kill_during_checkpoint_write_keeps_previous_checkpoint(train_setup, tmp_path):
    run = tmp_path / "run"
    _train(train_setup, run, steps=3, save_every=3)
    good = latest_checkpoint(str(run))
    before = {f: hashlib.sha256(open(os.path.join(good, f), "rb").read()).hexdigest() for f in os.listdir(good)}
    script = textwrap.dedent(f"""
        import os, signal, torch
        import dsv3
        from dsv3.checkpoint.state import save_checkpoint
        model = dsv3.from_pretrained({good!r})
        def die(tmp):  # the new checkpoint is half-way written: kill -9 now
            assert os.listdir(tmp)
            os.kill(os.getpid(), signal.SIGKILL)
        save_checkpoint({str(run)!r}, 4, model=model, loader_state={{}}, before_commit=die)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    assert [s for s, _ in list_checkpoints(str(run))] == [3]  # the torn write is invisible
    after = {f: hashlib.sha256(open(os.path.join(good, f), "rb").read()).hexdigest() for f in os.listdir(good)}
    assert after == before
    state = load_checkpoint_state(good, model=dsv3.from_pretrained(good))
    assert state["step"] == 3
    # and the run resumes from it
    result = train(None, resume=str(run), overrides={"steps": 4}, log=lambda s: None)
    assert result.step == 4


def test_nonfinite_losses_skip_steps_then_stop(train_setup, tmp_path, monkeypatch, capsys):
    from dsv3.model import DeepseekV3ForCausalLM

    real_forward = DeepseekV3ForCausalLM.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        calls["n"] += self.training
        if self.training and calls["n"] > 4:  # two micro-batches a step: from step 3 on
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(DeepseekV3ForCausalLM, "forward", poisoned)
    code = main(
        ["train", *_flags(quick_options(train_setup, tmp_path / "run", steps=10, save_every=2, max_nonfinite=3))]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "non-finite" in err[0] and "step-0000002" in err[0]
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records if r.get("skipped")] == [3, 4, 5]
    assert [s for s, _ in list_checkpoints(str(tmp_path / "run"))] == [2]  # the last good one survives


def _flags(options):
    out = []
    for k, v in options.items():
        out += ["--" + k.replace("_", "-"), str(v)]
    return out


def test_generate_from_run_dir(train_setup, tmp_path, capsys):
    _train(train_setup, tmp_path / "run", steps=3, save_every=3)
    assert main(["generate", str(tmp_path / "run"), "--prompt", "def ", "--max-tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def ")


def _tree_digest(path):
    digest = {}
    for root, _, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            digest[os.path.relpath(full, path)] = hashlib.sha256(open(full, "rb").read()).hexdigest()
    return digest


@pytest.mark.parametrize(
    "case",
    [
        "missing-data",
        "empty-corpus",
        "bad-yaml",
        "unknown-option",
        "bad-model-json",
        "shape-mismatch",
        "bad-number",
        "existing-run",
        "bad-resume",
        "bad-generate",
    ],
)
def test_bad_input_exits_2_with_one_line(train_setup, tmp_path, capsys, case):
    existing = tmp_path / "existing"
    opts = quick_options(train_setup, tmp_path / "new")
    if case == "missing-data":
        argv = ["train", *_flags({**opts, "data": str(tmp_path / "nope")})]
    elif case == "empty-corpus":
        (tmp_path / "empty").mkdir()
        argv = ["train", *_flags({**opts, "data": str(tmp_path / "empty")})]
    elif case == "bad-yaml":
        (tmp_path / "run.yaml").write_text("steps: [1, 2\n")
        argv = ["train", "--config", str(tmp_path / "run.yaml")]
    elif case == "unknown-option":
        (tmp_path / "run.yaml").write_text("stepz: 3\n")
        argv = ["train", "--config", str(tmp_path / "run.yaml")]
    elif case == "bad-model-json":
        (tmp_path / "config.json").write_text('{"hidden_size": 64,')
        argv = ["train", *_flags({**opts, "model": str(tmp_path / "config.json")})]
    elif case == "shape-mismatch":
        _train(train_setup, existing, steps=1, save_every=1)
        ckpt = latest_checkpoint(str(existing))
        cfg = (open(os.path.join(ckpt, "config.json")).read()).replace('"kv_lora_rank": 32', '"kv_lora_rank": 48')
        open(os.path.join(ckpt, "config.json"), "w").write(cfg)
        argv = ["train", *_flags({**opts, "init_from": ckpt})]
    elif case == "bad-number":
        argv = ["train", *_flags({**opts, "steps": "many"})]
    elif case == "existing-run":
        _train(train_setup, existing, steps=1, save_every=1)
        argv = ["train", *_flags({**opts, "run_dir": str(existing), "lr": 1e-4})]
    elif case == "bad-resume":
        argv = ["train", "--resume", str(tmp_path)]
    else:
        argv = ["generate", str(tmp_path / "nothing-here"), "--prompt", "x"]
    before = _tree_digest(existing) if existing.exists() else None
    code, _, err = cli(argv, capsys)
    assert_one_error(code, err)
    if before is not None:
        assert _tree_digest(existing) == before  # nothing already written is damaged
    assert not (tmp_path / "new").exists()  # a refused run leaves nothing behind


def test_ctrl_c_saves_a_checkpoint_then_resume_continues(train_setup, tmp_path):
    import signal
    import time

    run = tmp_path / "run"
    argv = [
        sys.executable,
        "-m",
        "dsv3",
        "train",
        *_flags(quick_options(train_setup, run, steps=400, save_every=1000, eval_every=1000)),
    ]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any('"loss"' in line for line in metrics.read_text().splitlines()[1:]):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    steps = [s for s, _ in list_checkpoints(str(run))]
    assert len(steps) == 1 and 1 <= steps[0] < 400  # written on the way out, not at a save interval
    assert "interrupted" in out + err
    result = train(None, resume=str(run), overrides={"steps": steps[0] + 1}, log=lambda s: None)
    assert result.step == steps[0] + 1
