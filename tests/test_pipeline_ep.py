"""Pipeline parallelism combined with expert and ZeRO-1 data parallelism (pp x dp, ep inside dp).

The distributed runs go through ``dsv3.train.session`` (build_session joins the world that
tests/dist_helpers.py describes in the environment, as torchrun does) and are compared with a
one-process session: per-step losses and the final parameters (allclose rtol 1e-5 / atol 1e-6).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dist_helpers import free_port, run_ranks
from helpers import quick_options, read_jsonl, small_config
from pipeline_worker import session_losses, sessions_rank

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
STEPS = 3


@pytest.fixture(scope="module")
def four_layers(train_setup, tmp_path_factory):
    """The train_setup corpus and tokenizer with a 4-layer model (DualPipeV with pp=4 needs 4 layers)."""
    root = tmp_path_factory.mktemp("four_layers")
    small_config(vocab_size=512, num_hidden_layers=4).save(root / "config.json")
    return dict(train_setup, model=str(root / "config.json"))


def _opts(setup, run_dir, **changes):
    # AdamW eps 1e-3 (as in test_parallel_ep): with 1e-8 float rounding noise in a near-zero gradient
    # element becomes a full lr step. micro_batch 1 x 8: 4 micro-batches per pipeline at dp=2.
    return quick_options(setup, run_dir, **{"micro_batch": 1, "global_batch": 8, "eps": 1e-3, **changes})


def _assert_equal_to_one_process(runs, ref, rtol=1e-5, atol=1e-6):
    """Every rank's losses, norms and validation loss are one process's; its parameters, EMA shadows and router
    biases are one process's restricted to what it holds (its stages, its expert block); together the ranks
    hold every parameter, and each rank's EMA averages exactly the parameters it holds."""
    ref_losses, ref_norms, ref_params, ref_buffers, _, ref_ema, ref_val = ref
    held = set()
    for rank, (losses, norms, params, buffers, offsets, ema, val) in enumerate(runs):
        np.testing.assert_allclose(losses, ref_losses, rtol=rtol, atol=atol, err_msg=f"rank {rank}")
        np.testing.assert_allclose(val, ref_val, rtol=rtol, atol=atol, err_msg=f"rank {rank} validation")
        assert params.keys() <= ref_params.keys() and ema.keys() == (params.keys() if ref_ema else set())
        held |= params.keys()
        for kind, mine, theirs in (("param", params, ref_params), ("ema", ema, ref_ema)):
            for name, value in mine.items():
                want = theirs[name]
                module = name.rpartition(".")[0]
                if module in offsets:  # this rank's block of routed experts (global numbers)
                    want = want[offsets[module] : offsets[module] + value.shape[0]]
                np.testing.assert_allclose(value, want, rtol=rtol, atol=atol, err_msg=f"rank {rank} {kind} {name}")
        for name, value in buffers.items():  # router biases: the same update on every rank holding the layer
            first = next(r[3][name] for r in runs if name in r[3])
            np.testing.assert_array_equal(value, first, err_msg=f"rank {rank} {name}")
            np.testing.assert_allclose(value, ref_buffers[name], rtol=rtol, atol=atol, err_msg=name)
        assert norms == runs[0][1]  # one clipping decision everywhere
        np.testing.assert_allclose(norms, ref_norms, rtol=rtol, err_msg="global gradient norm")
    assert held == ref_params.keys()


# The 4-rank layouts, all run in one spawned world (FOUR_RANK_TIMEOUT in all), each beside its one-process run.
CASES = {
    # 4 stages on 2 devices (each holds half the layers); the EMA of the held stages, validation (3 batches
    # over dp 2: one rank pads with an unlabelled copy) with the EMA weights
    "dualpipev-4-ema": ("dualpipev", 4, {"ema_decay": 0.9, "use_ema": True, "eval_batches": 3}),
    "1f1b-2": ("1f1b", 2, {}),
    # DualPipe's FB ops run the cut MoE (async all-to-alls); with selective recomputation and the CPU EMA
    "dualpipe-2-selective-ema": ("dualpipe", 2, {"recompute": "selective", "ema_decay": 0.9}),
    # FP8 GEMMs and FP8 dispatch payloads through the cut MoE of the FB ops, BF16 moments
    "dualpipe-2-fp8": ("dualpipe", 2, {"fp8": True, "optim_states": "bf16"}),
}
FOUR_RANK_TIMEOUT = 420
WITH_WORLD = FOUR_RANK_TIMEOUT + 180  # the first test also pays for the one-process references


@pytest.fixture(scope="module")
def four_rank_runs(four_layers, tmp_path_factory):
    """{case: (the 4 ranks' session_losses, the one-process session_losses)} for every case of CASES."""
    root = tmp_path_factory.mktemp("four_rank_runs")
    opts = {name: _opts(four_layers, root / name, **extra) for name, (_, _, extra) in CASES.items()}
    refs = {name: session_losses(o, STEPS) for name, o in opts.items()}  # also builds the token caches
    layouts = [dict(opts[name], pp=pp, pipeline=schedule, ep=2, dp=2) for name, (schedule, pp, _) in CASES.items()]
    runs = run_ranks(sessions_rank, 4, layouts, STEPS, timeout=FOUR_RANK_TIMEOUT)
    return {name: ([r[i] for r in runs], refs[name]) for i, name in enumerate(CASES)}


@pytest.mark.slow
@pytest.mark.timeout(WITH_WORLD)
@pytest.mark.parametrize("case", ["dualpipev-4-ema", "1f1b-2", "dualpipe-2-selective-ema"])
def test_pp_dp2_ep2_on_4_ranks_equals_one_process(four_rank_runs, case):
    """4 ranks: DualPipeV (4 stages on 2 devices), 1F1B or DualPipe (pp=2, two stages per device in both
    directions, FB ops), x dp=2 with ep=2 and ZeRO-1: ep peers run the same op list, so their all-to-alls
    line up, also inside overlapped FB ops. Losses, parameters, router biases, norms, the EMA and the
    validation loss (a forward-only pipelined pass) equal one process's."""
    runs, ref = four_rank_runs[case]
    assert bool(ref[5]) == ("ema_decay" in CASES[case][2])
    _assert_equal_to_one_process(runs, ref)
    # the expert blocks: ep rank r of every pipeline device holds experts [4r, 4r + 4)
    assert [min(r[4].values()) for r in runs] == [0, 4, 0, 4]


@pytest.mark.slow
@pytest.mark.timeout(WITH_WORLD)
def test_dualpipe_dp2_ep2_with_fp8_dispatch_stays_close_to_one_fp8_process(four_rank_runs):
    """--fp8 under DualPipe x dp2 x ep2 (FP8 GEMMs, FP8 dispatch payloads through the cut MoE of the FB
    ops, BF16 moments) stays within the FP8 tolerance of one FP8 process, which sends nothing: losses
    within 1e-3 relative (measured 1.5e-4), norms within 5e-2, every tensor within 3 % (relative L2,
    measured at most 1.3 %, while 3 steps move the weights by tens of %; Adam turns the FP8 noise of
    near-zero gradients into whole lr steps, so elementwise bounds say nothing). The ranks agree
    exactly among themselves: dense parameters and router biases are bit-identical on all four."""
    runs, ref = four_rank_runs["dualpipe-2-fp8"]
    ref_losses, ref_norms, ref_params = ref[:3]
    for rank, (losses, norms, params, buffers, offsets) in enumerate(r[:5] for r in runs):
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-3, err_msg=f"rank {rank}")
        np.testing.assert_allclose(norms, ref_norms, rtol=5e-2, err_msg=f"rank {rank}")
        for name, value in params.items():
            module = name.rpartition(".")[0]
            want = ref_params[name]
            if module in offsets:
                want = want[offsets[module] : offsets[module] + value.shape[0]]
            else:
                np.testing.assert_array_equal(value, runs[0][2][name], err_msg=f"rank {rank} {name}")
            assert np.linalg.norm(value - want) <= 0.03 * np.linalg.norm(want), f"rank {rank} {name}"
        for name, value in buffers.items():
            np.testing.assert_array_equal(value, next(r[3][name] for r in runs if name in r[3]), err_msg=name)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", DSV3_DIST_TIMEOUT="60")
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _args(setup, run_dir, *extra):
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
        "1",
        "--global-batch",
        "8",
        "--steps",
        "4",
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
        "--ema-decay",
        "0.9",
        "--use-ema",  # validation with the EMA weights (under pp: of the held stages)
        "--sample-tokens",
        "0",
        "--save-every",
        "2",
        "--keep-last",
        "3",
        "--no-progress",
        "--no-tensorboard",
        "--run-dir",
        str(run_dir),
        *extra,
    ]


def _run(cmd, timeout):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


def _torchrun(n, args, timeout):
    return _run(
        [
            TORCHRUN,
            f"--nproc-per-node={n}",
            "--master-addr=127.0.0.1",
            f"--master-port={free_port()}",
            "-m",
            "dsv3",
            *args,
        ],
        timeout,
    )


def _losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def pp_dp_ep_run(train_setup, tmp_path_factory):
    """A one-process ``dsv3 train`` and ``torchrun --nproc-per-node 4 -m dsv3 train --pp 2 --dp 2 --ep 2`` of
    the same 4 steps (DCP checkpoints at steps 2 and 4), with the CPU EMA and validation on its weights."""
    root = tmp_path_factory.mktemp("pp_dp_ep")
    one = _run([sys.executable, "-m", "dsv3", *_args(train_setup, root / "one")], 180)
    assert one.returncode == 0, one.stderr[-3000:]
    four = _torchrun(4, _args(train_setup, root / "pp", "--pp", "2", "--dp", "2", "--ep", "2", "--trace"), 200)
    assert four.returncode == 0, four.stderr[-3000:]
    return root, _losses(root / "one"), four


@pytest.mark.slow
@pytest.mark.timeout(500)  # the first one pays for pp_dp_ep_run: 180 s + 200 s of subprocess limits
def test_torchrun_pp2_dp2_ep2_has_the_losses_of_one_process(pp_dp_ep_run):
    root, ref, four = pp_dp_ep_run
    assert [s for s, _ in ref] == [1, 2, 3, 4]
    assert four.stdout.count("done in") == 1  # rank 0 alone talks
    got = _losses(root / "pp")
    assert [s for s, _ in got] == [1, 2, 3, 4]
    np.testing.assert_allclose([v for _, v in got], [v for _, v in ref], rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in (root / "pp").glob("dcp-*")) == ["dcp-00000002", "dcp-00000004"]
    meta = json.loads((root / "pp" / "dcp-00000004" / "meta.json").read_text())
    assert meta["layout"] == {"pp": 2, "dp": 2, "ep": 2}
    # validation with the EMA weights (a forward-only pipelined pass over each device's stages and its EMA) at
    # steps 0 and 4
    val = [
        [r["val_loss"] for r in read_jsonl(root / run / "metrics.jsonl") if "val_loss" in r] for run in ("one", "pp")
    ]
    assert len(val[0]) == len(val[1]) == 2
    np.testing.assert_allclose(val[1], val[0], rtol=1e-5, atol=1e-6)
    # --trace: the first pipeline's two devices on one timeline
    spans = [e for e in json.loads((root / "pp" / "pipeline_trace.json").read_text())["traceEvents"] if e["ph"] == "X"]
    assert {e["tid"] for e in spans} == {0, 1}


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_pipeline_checkpoint_resumes_in_other_layouts(pp_dp_ep_run, tmp_path):
    """The step-2 DCP checkpoint of the pp2 x dp2 x ep2 run resumes in one process and under torchrun as one
    2-device ZB1P pipeline (dp=1, ep=1; each device holds only its stage) with the losses of the uninterrupted
    run, and the final validation with the EMA restored from the checkpoint (each device reads its stages')."""
    root, ref, _ = pp_dp_ep_run
    single, pipe = tmp_path / "single", tmp_path / "pipe"
    for run in (single, pipe):
        shutil.copytree(root / "pp", run)
        shutil.rmtree(run / "dcp-00000004")
    one = _run(
        [sys.executable, "-m", "dsv3", "train", "--resume", str(single), "--pp", "1", "--ep", "1", "--dp", "1"], 180
    )
    assert one.returncode == 0, one.stderr[-3000:]
    np.testing.assert_allclose([v for _, v in _losses(single)], [v for _, v in ref], rtol=1e-5, atol=1e-6)
    two = _torchrun(
        2, ["train", "--resume", str(pipe), "--pp", "2", "--pipeline", "zb1p", "--ep", "1", "--dp", "1"], 200
    )
    assert two.returncode == 0, two.stderr[-3000:]
    got = _losses(pipe)
    assert [s for s, _ in got] == [1, 2, 3, 4]
    np.testing.assert_allclose([v for _, v in got], [v for _, v in ref], rtol=1e-5, atol=1e-6)
    assert (pipe / "dcp-00000004").is_dir()
    final = [
        [r["val_loss"] for r in read_jsonl(run / "metrics.jsonl") if r.get("step") == 4 and "val_loss" in r]
        for run in (root / "one", single, pipe)
    ]
    assert all(len(v) == 1 for v in final)
    np.testing.assert_allclose(final[1] + final[2], final[0] * 2, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bad_pipeline_layout_fails_on_every_rank_before_writing_with_one_line_from_rank_0(train_setup, tmp_path):
    run_dir = tmp_path / "bad"
    proc = _torchrun(2, _args(train_setup, run_dir, "--pp", "2", "--ep", "2"), 110)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("dsv3: error:")]
    # every rank fails before writing; rank 0 alone prints the line (dsv3.cli._report_once), torchrun stops the rest
    assert len(lines) == 1 and "--ep 2 does not divide the data-parallel degree 1" in lines[0], proc.stderr[-2000:]
    assert not run_dir.exists()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_dcp_checkpoint_of_a_pipeline_holds_each_stage_from_its_own_device(train_setup, tmp_path):
    """Under pp every rank holds and writes only the parameters of its own stages, and the EMA of them; together
    they make a checkpoint that loads into one process whole, with every rank's values, and ``dsv3 export
    --use-ema`` gathers the EMA of all stages from it."""
    import torch
    import torch.distributed.checkpoint as dcp
    from pipeline_worker import save_rank

    from dsv3.config import ModelConfig
    from dsv3.model import DeepseekV3ForCausalLM
    from dsv3.parallel.checkpoint import load_model_sharded

    opts = _opts(train_setup, tmp_path / "unused", global_batch=4, steps=1, ema_decay=0.5)
    session_losses(opts, 0)  # token caches before the spawn
    run_dir = tmp_path / "ckpt"
    run_dir.mkdir()
    runs = run_ranks(save_rank, 2, dict(opts, pp=2, pipeline="1f1b"), str(run_dir), timeout=100)
    (held0, params0, ema0), (held1, params1, ema1) = runs
    assert set(ema0) == set(held0) and set(ema1) == set(held1)  # each rank averages only what it holds
    assert set(held0) & set(held1) <= {"model.embed_tokens.weight"}  # only the embedding MTP uses is on both
    path = run_dir / "dcp-00000001"
    meta = dcp.FileSystemReader(str(path)).read_metadata()
    writers: dict[str, set[int]] = {}
    for index, info in meta.storage_data.items():
        writers.setdefault(index.fqn, set()).add(int(info.relative_path.split("_")[2]))
    for rank, held in ((0, held0), (1, held1)):
        for name in set(held0) | set(held1):
            if f"model/{name}" in writers and rank in writers[f"model/{name}"]:
                assert name in held, f"rank {rank} wrote {name}, a stage it does not run"
    assert "model.embed_tokens.weight" in held0 and "model.norm.weight" in held1 and "model.norm.weight" not in held0
    mcfg = ModelConfig.from_dict(small_config(vocab_size=512).to_dict())
    model = DeepseekV3ForCausalLM(mcfg)
    load_model_sharded(str(path), model)
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        np.testing.assert_array_equal(p.detach().numpy(), {**params0, **params1}[name], err_msg=name)
    from dsv3.checkpoint.state import from_pretrained
    from dsv3.cli import main

    mcfg.save(run_dir / "model_config.json")  # (write=False sessions write no run directory files)
    assert main(["export", str(path), str(tmp_path / "hf"), "--use-ema"]) == 0
    exported = dict(from_pretrained(str(tmp_path / "hf")).named_parameters())
    emas = {**ema0, **ema1}
    assert emas.keys() == exported.keys()
    assert not np.array_equal(emas["model.norm.weight"], params1["model.norm.weight"])  # the EMA lags the weights
    for name, value in emas.items():
        np.testing.assert_array_equal(exported[name].detach().float().numpy(), value, err_msg=name)


def test_layout_of_pipelines_with_expert_and_data_parallelism():
    """rank = pp_idx * dp + edp_idx * ep + ep_idx; one pipeline per data-parallel index."""
    from dsv3.errors import ConfigError
    from dsv3.layout import check_layout, pipeline_devices
    from dsv3.parallel.world import ParallelContext, pipelines_of

    assert pipeline_devices(4, "dualpipev") == 2 and pipeline_devices(4, "1f1b") == 4 and pipeline_devices(1) == 1
    assert check_layout(8, pp=4, ep=2, schedule="dualpipev") == (4, 4, 2)  # 2 devices x dp 4
    assert check_layout(4, pp=2, dp=2, ep=2, n_routed_experts=8, schedule="1f1b") == (2, 2, 2)
    assert pipelines_of(2, 4) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    ctx = ParallelContext(rank=6, world_size=8, pp=4, dp=4, ep=2, pp_devices=2, schedule="dualpipev")
    assert (ctx.pp_rank, ctx.dp_rank, ctx.edp_rank, ctx.ep_rank) == (1, 2, 1, 0)
    assert [6 in p for p in ctx.pipelines] == [False, False, True, False]
    for kwargs, match in [
        (dict(world_size=6, pp=4, schedule="1f1b"), "not a multiple of the 4 pipeline devices"),
        (dict(world_size=4, pp=2, dp=3), "does not factor as 2 pipeline devices x --dp 3"),
        (dict(world_size=6, pp=2, ep=2), "--ep 2 does not divide the data-parallel degree 3"),
        (dict(world_size=8, pp=2, ep=4, n_routed_experts=6), "6 routed experts"),
    ]:
        with pytest.raises(ConfigError, match=match):
            check_layout(**kwargs)


def test_zero_adamw_over_held_parameters_counts_norm_names_once():
    """ZeRO-1 of one pipeline device: shards only for ``names``, the gradient norm over ``norm_names``
    only (float64 reference), and ``held`` tells checkpoints what this device may write."""
    import torch

    from dsv3.model import DeepseekV3ForCausalLM
    from dsv3.parallel.world import ParallelContext
    from dsv3.parallel.zero import ZeroAdamW

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(small_config())
    names = [n for n, _ in model.named_parameters()]
    held = [n for n in names if n.startswith(("model.embed_tokens", "model.layers.0.", "lm_head"))]
    counted = [n for n in held if not n.startswith("lm_head")]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt = ZeroAdamW(model, ParallelContext.single(), names=held, norm_names=counted)
    assert sorted(s.name for s in opt.shards) == sorted(held) and opt.held == set(held)
    params = dict(model.named_parameters())
    want = sum(params[n].grad.double().pow(2).sum() for n in counted).sqrt()
    torch.testing.assert_close(opt.grad_norm().double(), want, rtol=1e-6, atol=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step(1.0)
    for n, p in model.named_parameters():  # only held parameters move
        assert torch.equal(p, before[n]) != (n in held), n


def test_model_state_leaves_out_parameters_a_device_does_not_hold():
    import torch

    from dsv3.model import DeepseekV3ForCausalLM
    from dsv3.parallel.checkpoint import model_state

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(small_config())
    everything = model_state(model)
    held = {n for n, _ in model.named_parameters() if n.startswith("model.layers.1.")}
    part = model_state(model, held)
    buffers = {f"model/{n}" for n, _ in model.named_buffers() if f"model/{n}" in everything}
    assert buffers and buffers <= part.keys()  # router biases are written by every device
    params = set(part) - buffers
    assert params and all(k.startswith("model/model.layers.1.") for k in params)
    assert "model/model.layers.1.mlp.experts.7.down_proj" in part  # experts under global numbers
    assert params == {k for k in everything if k.startswith("model/model.layers.1.")} - buffers
