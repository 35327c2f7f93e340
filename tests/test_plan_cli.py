"""`dsv3 plan`, `dsv3 plan schedule` and `dsv3 plan search` through the CLI dispatcher."""

import json
import os
import subprocess
import sys

import pytest
from helpers import assert_one_error, cli

from dsv3.cli import main
from dsv3.plan.simulate import simulate


def _json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_json_has_the_documented_fields(capsys):
    doc = _json(
        capsys,
        [
            "plan",
            "--preset",
            "deepseek-v3",
            "--pp",
            "16",
            "--ep",
            "64",
            "--dp",
            "128",
            "--schedule",
            "dualpipe",
            "--recompute",
            "selective",
            "--fp8",
            "--global-batch",
            "4096",
            "--tokens",
            "14.8T",
            "--mfu",
            "0.4",
            "--price-per-gpu-hour",
            "2",
            "--json",
        ],
    )
    assert doc["params"]["total"] == 671_026_404_352
    assert 37e9 < doc["params"]["activated"] < 38e9
    assert doc["flops_per_token"] > 0
    assert len(doc["stages"]) == 16
    layers = [i for s in doc["stages"] for i in s["layers"]]
    assert layers == list(range(61))
    for s in doc["stages"]:
        assert s["params_per_device"] > 0
        mem = s["memory_bytes"]
        assert set(mem) >= {"weights", "grads", "optimizer", "activations", "total"}
        assert mem["total"] >= mem["weights"] + mem["grads"] + mem["optimizer"] + mem["activations"]
    assert doc["gpu_hours"] == pytest.approx(14.8e12 / doc["tokens_per_s_per_gpu"] / 3600)
    assert doc["cost"] == pytest.approx(2 * doc["gpu_hours"])
    assert doc["layout"]["gpus"] == 2048 and doc["layout"]["edp"] == 2
    assert "moe_layer" in doc["activation_items"] and doc["schedule"]["peak_activations"][0] == 17


def test_plan_gpus_sets_dp_and_human_output_has_tables(capsys):
    doc = _json(capsys, ["plan", "--preset", "tiny", "--pp", "2", "--gpus", "8", "--json"])
    assert doc["layout"]["dp"] == 4
    assert (
        main(["plan", "--preset", "tiny", "--pp", "2", "--ep", "2", "--dp", "2", "--detail", "--gpu-memory", "8GiB"])
        == 0
    )
    out = capsys.readouterr().out
    for text in (
        "Parameters",
        "Memory per device",
        "Compute and cost",
        "Saved for backward",
        "mlp.experts.input",
        "fits",
    ):
        assert text in out


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--preset", "tiny", "--ep", "3", "--dp", "3"], "16 routed experts cannot be split over --ep 3"),
        (["--preset", "tiny", "--tp", "3"], "4 attention heads cannot be split over --tp 3"),
        (["--preset", "tiny", "--pp", "8"], "4 layers cannot fill --pp 8 stages"),
        (["--preset", "tiny", "--pp", "2", "--stage-layers", "1,2"], "sums to 3 but the model has 4 layers"),
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--preset", "tiny", "--schedule", "gpipe"], "unknown schedule 'gpipe'"),
        (["--preset", "tiny", "--gpu-memory", "80 parsecs"], "--gpu-memory '80 parsecs' is not a size"),
        (["--preset", "tiny", "--gpus", "6", "--pp", "4"], "--gpus 6 is not a multiple"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, argv, needle):
    code, _, err = cli(["plan"] + argv, capsys)
    assert_one_error(code, err, needle)


def test_schedule_subcommand_reports_the_simulator(capsys, tmp_path):
    png = tmp_path / "timeline.png"
    doc = _json(
        capsys,
        [
            "plan",
            "schedule",
            "--schedule",
            "dualpipe",
            "--pp",
            "8",
            "--microbatches",
            "20",
            "--f",
            "1",
            "--b",
            "2",
            "--w",
            "0.5",
            "--fb",
            "2.5",
            "--comm",
            "0.05",
            "--plot",
            str(png),
            "--json",
        ],
    )
    res = simulate("dualpipe", pp=8, microbatches=20, f=1.0, b=2.0, w=0.5, fb=2.5, comm=0.05)
    assert doc["makespan"] == res.makespan and doc["bubble"] == res.bubble
    assert doc["peak_activations"] == res.peak_activations
    assert png.stat().st_size > 0
    assert main(["plan", "schedule", "--schedule", "dualpipev", "--pp", "8", "--microbatches", "3"]) == 2
    assert "needs" in capsys.readouterr().err


def test_search_ranks_fitting_layouts_and_says_why_others_fail(capsys):
    doc = _json(
        capsys,
        [
            "plan",
            "search",
            "--preset",
            "tiny",
            "--gpus",
            "8",
            "--gpu-memory",
            "60MiB",
            "--seq-len",
            "256",
            "--global-batch",
            "64",
            "--json",
        ],
    )
    fits, rejected = doc["fits"], doc["rejected"]
    assert fits and rejected and doc["tried"] == len(fits) + len(rejected)
    for c in fits:
        assert c["peak_bytes"] <= 60 * 2**20 and c["layout"]["gpus"] == 8
    exact = [c["step_time_s"] for c in fits if c["exact"]]
    assert exact == sorted(exact)
    reasons = " ".join(c["reason"] for c in rejected)
    assert "must divide DP x TP" in reasons  # EP 16 on 8 GPUs
    assert "more than 60 MiB" in reasons
    assert all(c["reason"] for c in rejected)


def test_planner_imports_no_torch_and_is_fast():
    code = (
        "import sys, time; t = time.time()\n"
        "import dsv3.plan.params, dsv3.plan.memory, dsv3.plan.flops, dsv3.plan.cost, dsv3.plan.layout\n"
        "import dsv3.plan.search, dsv3.plan.report, dsv3.plan.planner, dsv3.plan.activations, dsv3.plan.precision\n"
        "from dsv3.cli import main\n"
        "import contextlib, io\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['plan', '--preset', 'deepseek-v3']) == 0\n"
        "    assert main(['plan', '--preset', 'deepseek-v3', '--json']) == 0\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    env = dict(os.environ)
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)
