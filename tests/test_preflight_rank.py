"""The memory pre-check refuses a run from the busiest rank of its layout (``dsv3 plan``'s per-rank numbers),
counting the ranks that share a CPU node's memory."""

import contextlib
import io
import json

import pytest
from helpers import small_config

from dsv3.cli import main
from dsv3.errors import ConfigError
from dsv3.train.config import TrainConfig
from dsv3.train.preflight import check_memory, estimate_training_bytes, run_layout

CFG = small_config(num_hidden_layers=4, n_routed_experts=8)


def _plan_peak(tmp_path, *args) -> float:
    path = tmp_path / "config.json"
    CFG.save(path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert (
            main(
                [
                    "plan",
                    "--config",
                    str(path),
                    "--seq-len",
                    "32",
                    "--micro-batch",
                    "2",
                    "--precision",
                    "weights=fp32,grads=fp32,moments=fp32,activations=fp32,router=fp32,master=none",
                    "--json",
                    *args,
                ]
            )
            == 0
        )
    return json.loads(out.getvalue())["peak_device_bytes"]


@pytest.mark.parametrize(
    "layout,args",
    [
        ({}, ["--global-batch", "2"]),
        (dict(dp=4, ep=4), ["--dp", "4", "--ep", "4", "--global-batch", "8"]),
        (
            dict(pp=2, dp=2, ep=2, schedule="1f1b", global_batch=16),
            ["--pp", "2", "--dp", "2", "--ep", "2", "--global-batch", "16"],
        ),
    ],
    ids=["one-process", "dp4-ep4", "pp2-dp2-ep2"],
)
def test_the_estimate_is_the_busiest_rank_of_dsv3_plan(tmp_path, layout, args):
    got = estimate_training_bytes(CFG, seq_len=32, micro_batch=2, **layout)
    assert got == _plan_peak(tmp_path, *args)


def test_ranks_of_a_cpu_node_share_its_memory_and_gpus_do_not():
    layout = dict(dp=4, ep=4)
    one = estimate_training_bytes(CFG, seq_len=32, micro_batch=2)
    rank = estimate_training_bytes(CFG, seq_len=32, micro_batch=2, **layout)
    assert rank < one  # each rank holds a quarter of the experts and of the optimizer state
    kw = dict(seq_len=32, micro_batch=2, layout=layout, available=int(3 * rank))
    with pytest.raises(ConfigError, match="4 ranks x"):
        check_memory(CFG, device="cpu", ranks_per_node=4, **kw)
    assert check_memory(CFG, device="cpu", ranks_per_node=2, **kw) == 2 * rank
    assert check_memory(CFG, device="cuda", ranks_per_node=4, **kw) == rank  # one device per rank
    with pytest.raises(ConfigError, match="plan a parallel layout"):
        check_memory(CFG, device="cuda", seq_len=32, micro_batch=2, available=int(rank))  # one process: all of it


def test_run_layout_reads_the_torchrun_world(monkeypatch):
    config = TrainConfig.from_dict(dict(seq_len=32, pp=2, ep=2, pipeline="dualpipev", global_batch=16))
    assert run_layout(config, world_size=1) == {}
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert run_layout(config) == dict(pp=2, dp=4, ep=2, schedule="dualpipev", global_batch=16)  # DualPipeV: 1 device
