"""`dsv3 memory` and the library behind it (dsv3.memory.measure): bytes per category of a training config."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_one_error, cli

from dsv3.cli import main
from dsv3.train.config import TrainConfig
from dsv3.train.measure import measure_config, prepare_config


def _config(setup, **changes) -> TrainConfig:
    return TrainConfig.from_dict(
        dict(
            model=setup["model"],
            data=setup["corpus"],
            tokenizer=setup["tokenizer"],
            seq_len=32,
            micro_batch=2,
            global_batch=2,
            **changes,
        )
    )


def test_categories_follow_the_options(train_setup):
    plain = measure_config(_config(train_setup), steps=1)
    session = prepare_config(_config(train_setup))
    try:
        n_bytes = sum(p.numel() * p.element_size() for p in session.model.parameters())
        n_params = sum(p.numel() for p in session.model.parameters())
    finally:
        session.close()
    assert plain.params == n_bytes and plain.grads == n_bytes
    assert plain.optimizer == 2 * n_bytes  # AdamW m and v in FP32
    assert plain.ema_host == 0 and plain.activations > 0 and plain.tokens_per_s > 0
    assert plain.training_state == 4 * n_bytes

    bf16 = measure_config(_config(train_setup, optim_states="bf16"), steps=1)
    assert bf16.optimizer == 2 * 2 * n_params  # m and v in BF16: half the FP32 moments
    ema = measure_config(_config(train_setup, ema_decay=0.9), steps=1)
    assert ema.ema_host == 3 * 4 * n_params  # FP32 shadows + two staging buffers, in host memory
    assert ema.training_state == plain.training_state  # the EMA is not on the training device
    selective = measure_config(_config(train_setup, recompute="selective"), steps=1)
    full = measure_config(_config(train_setup, recompute="full"), steps=1)
    assert full.activations < selective.activations < plain.activations
    assert selective.params == plain.params and selective.optimizer == plain.optimizer


def test_bytes_only_measurement_then_interleaved_steps(train_setup):
    session = prepare_config(_config(train_setup, ema_decay=0.5), name="s")
    try:
        report = session.measure(steps=0)
        assert report.name == "s" and report.activations > 0 and report.tokens_per_s != report.tokens_per_s  # NaN
        before = [p.detach().clone() for p in session.model.parameters()]
        assert session.step() > 0
        assert any(not torch.equal(a, p) for a, p in zip(before, session.model.parameters()))  # it trained
    finally:
        session.close()


def test_cli_prints_one_json_document(train_setup, capsys):
    argv = [
        "memory",
        "--model",
        train_setup["model"],
        "--data",
        train_setup["corpus"],
        "--tokenizer",
        train_setup["tokenizer"],
        "--seq-len",
        "32",
        "--micro-batch",
        "2",
        "--steps",
        "1",
        "--optim-states",
        "bf16",
        "--json",
    ]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    for key in (
        "params",
        "grads",
        "optimizer",
        "ema_host",
        "activations",
        "saved_tensors",
        "tokens_per_s",
        "training_state",
    ):
        assert key in doc
    assert doc["optimizer"] == doc["params"]  # BF16 moments: 2 x 2 bytes = one FP32 copy


@pytest.mark.parametrize("argv", [["memory", "--model", "no-such-preset"], ["memory", "--data", "/no/such/path"]])
def test_cli_bad_input_exits_2_with_one_line(argv, capsys):
    code, _, err = cli(argv, capsys)
    assert_one_error(code, err)
