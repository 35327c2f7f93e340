"""The pipeline runtime (dsv3.parallel.pipeline): stages, weight-gradient split, FB op, executor.

The distributed tests spawn gloo processes on 127.0.0.1 and compare against the plain
single-process model (forward, ``(loss / n).backward()`` per micro-batch, clip, AdamW,
bias update), which uses none of the pipeline code.
"""

from __future__ import annotations

import itertools
import json
import queue
import socket
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from dist_helpers import run_ranks
from pipeline_worker import (
    SEQ,
    batches,
    build_model,
    fb_as_f_then_b,
    reference,
    run_jobs,
    session_losses,
    session_rank,
    swapped_recvs,
)

from dsv3.errors import ConfigError
from dsv3.parallel.pipeline.executor import TraceEvent, chrome_trace, write_chrome_trace
from dsv3.parallel.pipeline.stages import MicroBatch, PipelineStage, StageRecord, stage_layers
from dsv3.parallel.pipeline.train import check_pipeline_layout, pipeline_microbatches
from dsv3.parallel.pipeline.wgrad import WeightGradStore, split_weight_grads
from dsv3.schedules import FB, ScheduleError, build_schedule, validate_schedule
from dsv3.schedules import pipeline_schedule as check_layout

N_MICRO, STEPS, LAYERS = 4, 2, 4
# The module's shared world has its own deadline; the tests that use it allow it in full (the first one pays
# for the fixture), so a slow world fails in one line instead of pytest-timeout killing the xdist worker.
SPAWN_TIMEOUT = 300
WITH_WORLD = SPAWN_TIMEOUT + 120
JOBS = [
    dict(schedule="1f1b", pp=2),
    dict(schedule="zb1p", pp=2),
    dict(schedule="dualpipe", pp=2),
    dict(schedule="dualpipev", pp=4),  # 4 stages on 2 ranks
    dict(schedule="dualpipe", pp=2, variant="fb_as_f_then_b"),
    dict(schedule="dualpipe", pp=2, variant="swapped"),
    # No MTP, output head tied to the embedding: the head on the last stage is the embedding copy.
    dict(schedule="zb1p", pp=2, model=dict(num_nextn_predict_layers=0, tie_word_embeddings=True)),
]
EQUAL_JOBS = [0, 1, 2, 3, 6]
for _job in JOBS:
    _job.update(steps=STEPS, n_micro=N_MICRO, layers=LAYERS)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, jobs: list[dict], timeout: float = SPAWN_TIMEOUT, target=run_jobs, args=None):
    """``target`` on ``world`` spawned ranks; their results by rank. Fails in one line when a rank reports an
    error, dies without reporting, or the world does not finish within ``timeout`` seconds in all."""
    ctx = mp.get_context("spawn")
    reports = ctx.Queue()
    port = _free_port()
    args = (jobs,) if args is None else args
    procs = [ctx.Process(target=target, args=(r, world, port, *args, reports), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline, got = time.monotonic() + timeout, []
    try:
        while len(got) < world:
            left = deadline - time.monotonic()
            assert left > 0, f"the {world} pipeline ranks did not finish in {timeout:.0f} s"
            try:
                got.append(reports.get(timeout=min(left, 1.0)))
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                assert not dead, f"a pipeline rank died with exit code {dead[0]} before reporting"
    finally:
        for p in procs:
            p.join(timeout=20)
            if p.is_alive():
                p.kill()
    errors = [err for _, _, err in got if err]
    assert not errors, errors[0]
    return {rank: results for rank, results, _ in got}


@pytest.fixture(scope="module")
def pp_runs(tmp_path_factory):
    """Every job of JOBS on 2 gloo processes (one spawn for all, within SPAWN_TIMEOUT), and the single-process
    references."""
    jobs = [dict(j) for j in JOBS]
    jobs[3]["trace_path"] = str(tmp_path_factory.mktemp("trace") / "dualpipev.json")
    refs = {i: reference(STEPS, N_MICRO, LAYERS, **JOBS[i].get("model", {})) for i in EQUAL_JOBS}
    return _spawn(2, jobs), refs, jobs[3]["trace_path"]


# ---------------------------------------------------------------------- distributed equality


@pytest.mark.slow
@pytest.mark.timeout(WITH_WORLD)
@pytest.mark.parametrize(
    "job",
    EQUAL_JOBS,
    ids=[f"{JOBS[j]['schedule']}-pp{JOBS[j]['pp']}" + ("-tied" if "model" in JOBS[j] else "") for j in EQUAL_JOBS],
)
def test_pipeline_equals_one_process(pp_runs, job):
    """Per-step losses, gradient norms and final parameters of PP2 1F1B/ZB1P/DualPipe, 4-stage DualPipeV
    and a tied-head model without MTP equal one process; so does the validation loss of the trained model
    through the forward-only pipelined pass. Each device's model holds only its stages' parameters (bytes)."""
    runs, refs, _ = pp_runs
    ref_losses, ref_params, ref_norms, ref_val = refs[job]
    held = set()
    assert min(ref_norms) > 1.0  # clipping is active, so the global norm over the stages matters
    for rank in (0, 1):
        losses, params, _, norms, extras = runs[rank][job]
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(norms, ref_norms, rtol=1e-5)
        np.testing.assert_allclose(extras["val"], ref_val, rtol=1e-5, atol=1e-6)
        for name, value in params.items():
            np.testing.assert_allclose(value, ref_params[name].numpy(), rtol=1e-5, atol=1e-5, err_msg=name)
        assert extras["nbytes"] == sum(ref_params[n].numel() * ref_params[n].element_size() for n in params)
        held |= set(params)
    assert held == set(ref_params)  # together the ranks hold (and trained) every parameter
    if JOBS[job]["schedule"] != "dualpipe":  # DualPipe with pp=2: each device runs both stages (2x parameters)
        whole = sum(t.numel() * t.element_size() for t in ref_params.values())
        assert all(runs[rank][job][4]["nbytes"] < 0.8 * whole for rank in (0, 1))


@pytest.mark.slow
@pytest.mark.timeout(WITH_WORLD)
@pytest.mark.parametrize("job", range(4), ids=[f"{j['schedule']}-pp{j['pp']}" for j in JOBS[:4]])
def test_executed_trace_is_the_schedule(pp_runs, job):
    """Each rank executes exactly its op list of the schedule, SEND/RECV included, every step."""
    runs, _, _ = pp_runs
    schedule = build_schedule(JOBS[job]["schedule"], JOBS[job]["pp"], N_MICRO)
    for rank in (0, 1):
        for trace in runs[rank][job][2]:
            assert trace == list(schedule.ops[rank])


@pytest.mark.slow
@pytest.mark.timeout(WITH_WORLD)
def test_fb_op_equals_f_then_b(pp_runs):
    """DualPipe with every overlapped FB replaced by its F then its BW gives bit-identical results."""
    runs, _, _ = pp_runs
    for rank in (0, 1):
        fb_losses, fb_params, fb_traces = runs[rank][2][:3]
        seq_losses, seq_params, seq_traces = runs[rank][4][:3]
        assert any(op.kind == FB for op in fb_traces[0]) and not any(op.kind == FB for op in seq_traces[0])
        assert fb_losses == seq_losses
        for name in fb_params:
            np.testing.assert_array_equal(fb_params[name], seq_params[name], err_msg=name)


@pytest.mark.slow
@pytest.mark.timeout(WITH_WORLD)
def test_swapped_op_list_is_rejected_before_it_runs(pp_runs):
    """Every rank rejects the out-of-order op list (before any message, so nothing hangs)."""
    runs, _, _ = pp_runs
    for rank in (0, 1):
        message = runs[rank][5]
        assert "another order" in message and "\n" not in message


@pytest.mark.slow
@pytest.mark.timeout(WITH_WORLD)
def test_trace_file_is_a_two_device_timeline(pp_runs):
    """``--trace`` output: every compute op of both devices of the last step, on one time axis."""
    _, _, path = pp_runs
    events = json.loads(open(path).read())["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    schedule = build_schedule("dualpipev", 4, N_MICRO)
    for d in (0, 1):
        assert [e["name"] for e in spans if e["tid"] == d] == [
            f"F{op.microbatch}&B{op.b_microbatch}" if op.kind == FB else f"{op.kind}{op.microbatch}"
            for op in schedule.compute_ops(d)
        ]
    first = {d: min(e["ts"] for e in spans if e["tid"] == d) for d in (0, 1)}
    assert 0.0 <= min(first.values()) and max(first.values()) < 5e6  # one clock: both start within 5 s


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_train_step_through_a_pipeline_equals_one_process(train_setup, tmp_path):
    """dsv3.train.step.train_step with a pipeline attached (2 processes, DualPipe) gives the single
    process's per-step losses and validation loss, and every rank holds its stages of the single process's model."""
    from helpers import quick_options

    # AdamW eps 1e-3 (as in test_parallel_ep): with 1e-8, float rounding noise of ~1e-7 in a near-zero
    # gradient element becomes a full +-lr step, and a single element can then differ by ~1e-5.
    opts = quick_options(train_setup, tmp_path / "run", micro_batch=2, global_batch=8, eps=1e-3)
    # 2 steps: the second one starts from the stepped optimizer state and the updated router biases
    ref_losses, _, ref_params, _, _, _, ref_val = session_losses(opts, 2)  # also builds the token caches
    runs = run_ranks(session_rank, 2, dict(opts, pp=2, pipeline="dualpipe"), 2, timeout=150)
    for rank in (0, 1):
        losses, _, params, _, _, _, val = runs[rank]
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(val, ref_val, rtol=1e-5, atol=1e-6)
        assert params.keys() == ref_params.keys()  # DualPipe with pp=2: both stages on each device
        for name in params:
            np.testing.assert_allclose(params[name], ref_params[name], rtol=1e-5, atol=1e-5, err_msg=name)


# ---------------------------------------------------------------------- single process


def test_pipeline_microbatches_and_layout_errors():
    assert pipeline_microbatches(16, 2, 2) == 4
    with pytest.raises(ConfigError, match="not a multiple"):
        pipeline_microbatches(10, 4, 1)
    assert check_pipeline_layout(4, pp=4, schedule="dualpipev", global_batch=16, micro_batch=2, world_size=4) == 4
    with pytest.raises(ConfigError, match="do not factor"):
        check_pipeline_layout(4, pp=2, schedule="1f1b", global_batch=8, micro_batch=2, world_size=3)
    with pytest.raises(ConfigError, match="micro-batches >= 4"):  # 8 / (2 x dp 2) = 2 < pp
        check_pipeline_layout(4, pp=4, schedule="dualpipev", global_batch=8, micro_batch=2, world_size=4)


def test_swapped_recvs_fail_validation():
    schedule = build_schedule("dualpipe", 2, 4)
    validate_schedule(schedule)
    with pytest.raises(ScheduleError, match="another order"):
        validate_schedule(swapped_recvs(schedule))
    validate_schedule(fb_as_f_then_b(schedule))  # the unoverlapped variant is a valid op list


@pytest.mark.parametrize("name,pp", [("1f1b", 4), ("zb1p", 4), ("dualpipe", 6), ("dualpipe", 8), ("dualpipev", 8)])
def test_built_schedules_keep_message_order(name, pp):
    """The built schedules (DualPipe interleaves activations and gradients on a link) pass the order rule."""
    validate_schedule(build_schedule(name, pp, 2 * pp + 2))


def test_stage_layers_minimise_the_slowest_stage():
    """The balanced split equals a brute-force search over all contiguous splits (forward FLOPs per token)."""
    from dsv3.plan.flops import model_flops

    cfg = build_model(6).config
    flops = model_flops(cfg, SEQ)
    costs = list(flops.layers)
    last = flops.head + sum(flops.mtp)
    for pp in (1, 2, 3, 4, 6):
        best = None
        for cuts in itertools.combinations(range(1, len(costs)), pp - 1):
            bounds = (0, *cuts, len(costs))
            stage_costs = [sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])]
            stage_costs[-1] += last
            key = (max(stage_costs), sum(c * c for c in stage_costs))
            if best is None or key < best[0]:
                best = (key, tuple(b - a for a, b in zip(bounds, bounds[1:])))
        assert stage_layers(cfg, pp, SEQ) == best[1]
    with pytest.raises(ConfigError, match="fewer than pp=7"):
        stage_layers(cfg, 7, SEQ)


@pytest.mark.parametrize(
    "layers,name,pp,m,world,match",
    [
        (2, "1f1b", 3, 4, 3, "fewer than --pp 3"),
        (4, "dualpipe", 3, 6, 3, "even number of pipeline stages"),
        (4, "dualpipev", 4, 2, 2, "micro-batches >= 4"),
        (4, "dualpipe", 2, 3, 2, "even number of micro-batches"),
        (4, "1f1b", 2, 4, 3, "do not factor"),
    ],
)
def test_bad_layouts_are_one_sentence_errors(layers, name, pp, m, world, match):
    with pytest.raises(ConfigError, match=match) as info:
        check_layout(layers, name, pp, m, world)
    assert "\n" not in str(info.value)


def test_check_layout_accepts_and_returns_the_schedule():
    assert check_layout(4, "dualpipev", 4, 4, 4).devices == 2


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_split_weight_grads_defers_then_equals_autograd():
    """Under ``deferring`` the Linear and expert weights get no gradient until the W group runs; then
    every gradient equals plain autograd on an untransformed copy."""
    ids, labels = batches(0, 1)[0]
    plain = build_model(2)
    plain(ids, labels).loss.backward()
    model = build_model(2)
    store = WeightGradStore()
    assert split_weight_grads(model, store) > 0
    loss = model(ids, labels).loss
    with store.deferring():
        loss.backward()
    store.flush("mb0")
    deferred = {n for n, p in model.named_parameters() if p.grad is None}
    assert "model.layers.0.self_attn.o_proj.weight" in deferred
    assert "model.layers.1.mlp.experts.gate_up_proj" in deferred
    assert "model.embed_tokens.weight" not in deferred  # computed in B
    assert store.pop("mb0") > 0 and len(store) == 0
    ref, got = _grads(plain), _grads(model)
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("fp8_gemm", [True, False])
def test_split_weight_grads_of_fp8_linears_equal_their_own_backward(fp8_gemm):
    """FP8 Linears and FP8 grouped expert GEMMs (emulated E4M3 GEMMs, or FP8 storage only): deferred weight
    gradients are bit-identical to the FP8 autograd functions' own backward."""
    from dsv3.fp8.convert import convert
    from dsv3.fp8.recipe import FP8Recipe

    recipe = FP8Recipe(backend="emulated", fp8_gemm=fp8_gemm)
    ids, labels = batches(2, 1)[0]
    plain, model = convert(build_model(2), recipe), convert(build_model(2), recipe)
    plain(ids, labels).loss.backward()
    store = WeightGradStore()
    split_weight_grads(model, store)
    loss = model(ids, labels).loss
    with store.deferring():
        loss.backward()
    store.flush(0)
    from dsv3.fp8.linear import FP8Linear

    assert isinstance(model.model.layers[0].self_attn.o_proj, FP8Linear)
    assert model.model.layers[0].self_attn.o_proj.weight.grad is None  # an FP8 Linear's W is deferred
    assert model.model.layers[1].mlp.experts.gate_up_proj.grad is None  # and an FP8 grouped GEMM's
    store.pop(0)
    ref, got = _grads(plain), _grads(model)
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.equal(got[name], ref[name]), name


def test_split_weight_grads_without_deferring_is_autograd():
    """Outside ``deferring`` a transformed model's gradients are plain autograd's (BW ops, single process)."""
    ids, labels = batches(1, 1)[0]
    plain, model = build_model(2), build_model(2)
    split_weight_grads(model, WeightGradStore())
    plain(ids, labels).loss.backward()
    model(ids, labels).loss.backward()
    ref, got = _grads(plain), _grads(model)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)


def test_weight_grad_store_is_first_in_first_out():
    store = WeightGradStore()
    ran = []
    store.put(lambda: ran.append("a"))
    store.flush(("mb", 0))
    store.put(lambda: ran.append("b"))
    store.flush(("mb", 1))
    with pytest.raises(RuntimeError, match="first-in first-out"):
        store.pop(("mb", 1))
    store = WeightGradStore()
    with pytest.raises(RuntimeError, match="no deferred"):
        store.pop()


def _micro(model, step):
    ids, labels = batches(step, 1)[0]
    cos, sin = model.model.rotary_emb(torch.arange(SEQ))
    return MicroBatch(ids, labels, cos.unsqueeze(0), sin.unsqueeze(0), 0.5)


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_stage_forward_backward_equals_the_model(recompute):
    """One whole-model stage, run step by step with deferred weight gradients (a B op, then its W),
    gives the plain model's loss, loads and gradients (pp=1), under every recomputation policy."""
    from dsv3.memory.recompute import apply_recompute

    plain, model = build_model(2), build_model(2)
    apply_recompute(model, recompute)
    store = WeightGradStore()
    split_weight_grads(model, store)
    mb = _micro(model, 0)
    out = plain(mb.ids, mb.labels)
    (out.loss * 0.5).backward()
    stage = PipelineStage(model, 0, 1, [0, 1])
    rec = StageRecord()
    for _ in stage.forward_steps(None, mb, rec):
        pass
    torch.testing.assert_close(sum(rec.parts), out.loss, rtol=1e-6, atol=0)  # lm + mtp + every balance loss
    torch.testing.assert_close(rec.parts[0], out.lm_loss)
    torch.testing.assert_close(rec.parts[1], out.mtp_loss)
    torch.testing.assert_close(rec.parts[2], out.balance_loss)
    assert torch.equal(torch.stack([rec.loads[i] for i in sorted(rec.loads)]), out.expert_load)
    with store.deferring():
        for _ in stage.backward_steps(rec, None, 0.5):
            pass
    store.flush(0)
    assert rec.output is None and not rec.steps  # the first stage has no input gradient
    assert model.model.layers[0].self_attn.o_proj.weight.grad is None  # deferred to W
    store.pop(0)
    ref, got = _grads(plain), _grads(model)
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)


def test_chrome_trace_has_one_event_per_compute_op(tmp_path):
    schedule = build_schedule("dualpipe", 2, 4)
    traces = {
        d: [TraceEvent(op, i * 0.001, i * 0.001 + 0.0005) for i, op in enumerate(schedule.ops[d])] for d in range(2)
    }
    path = tmp_path / "trace.json"
    write_chrome_trace(str(path), traces)
    events = json.loads(path.read_text())["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    assert len(spans) == sum(len(schedule.compute_ops(d)) for d in range(2))
    assert {e["tid"] for e in spans} == {0, 1}
    assert spans[0]["dur"] == pytest.approx(500.0)
    assert any("&" in e["name"] for e in spans)  # overlapped F&B pairs
    assert chrome_trace(traces) == json.loads(path.read_text())


# ---------------------------------------------------------------------- dsv3 train --pp


def _train_argv(setup, run_dir, *extra):
    return [
        "-m",
        "dsv3",
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
        "4",
        "--warmup-steps",
        "1",
        "--eval-every",
        "2",
        "--eval-batches",
        "2",
        "--save-every",
        "4",
        "--sample-tokens",
        "0",
        "--no-progress",
        "--no-tensorboard",
        "--run-dir",
        str(run_dir),
        *extra,
    ]


def _env():
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(__import__("sys").path))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "extra,world,match",
    [
        (["--pp", "5"], 5, "fewer than --pp 5"),
        (["--pp", "3", "--pipeline", "dualpipev"], 2, "even number of pipeline stages"),
        (["--pp", "2", "--pipeline", "dualpipe", "--global-batch", "4"], 2, "even number of micro-batches >= 4"),
        (["--pp", "2"], 3, "3 processes do not factor"),
        (["--pp", "2"], 1, "launch a multiple of 2 with torchrun"),
        (["--pp", "2", "--dp", "3"], 4, "does not factor as 2 pipeline devices x --dp 3"),
        (["--pp", "2", "--ep", "2"], 2, "--ep 2 does not divide the data-parallel degree 1"),
        (["--pp", "2", "--ep", "3"], 6, "--ep 3 does not divide the model's 8 routed"),
        (["--pp", "2", "--pipeline", "dualpipe"], 4, "even number of micro-batches >= 4"),  # 8 / (2 x dp 2) = 2
        (["--pp", "2", "--batch-ramp-start", "4"], 2, "does not support the batch-size ramp"),
    ],
)
def test_train_rejects_bad_layouts_before_writing(train_setup, tmp_path, monkeypatch, capsys, extra, world, match):
    """One line on stderr, exit code 2, no run directory (WORLD_SIZE as torchrun would set it)."""
    from dsv3.cli import main

    run_dir = tmp_path / "run"
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    if world > 1:
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("RANK", "0")
    assert main(_train_argv(train_setup, run_dir, *extra)[2:]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and match in err and err.startswith("dsv3: error:")
    assert not run_dir.exists()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_torchrun_train_pp2_equals_one_process(train_setup, tmp_path, capsys):
    """``torchrun --nproc-per-node 2 -m dsv3 train --pp 2 --pipeline dualpipe --trace``: the metrics (losses,
    grad norms, validation) and the final (DCP) checkpoint's weights equal a one-process ``dsv3 train``."""
    import os
    import subprocess
    import sys

    from dsv3.train.metrics import read_metrics

    one, pp = tmp_path / "one", tmp_path / "pp"
    subprocess.run(
        [sys.executable, *_train_argv(train_setup, one)], check=True, capture_output=True, timeout=120, env=_env()
    )
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run(
        [
            torchrun,
            "--nproc-per-node",
            "2",
            "--master-port",
            str(_free_port()),
            *_train_argv(train_setup, pp, "--pp", "2", "--pipeline", "dualpipe", "--trace"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref, got = read_metrics(str(one)), read_metrics(str(pp))
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for key in ("loss", "lm_loss", "mtp_loss", "balance_loss", "grad_norm", "val_loss"):
        a = [r[key] for r in ref if key in r]
        b = [r[key] for r in got if key in r]
        assert len(a) == len(b) > 0, key
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=key)
    # the final DCP checkpoint (each rank wrote its own stages) holds the one-process weights
    from dsv3.checkpoint.state import latest_checkpoint, load_checkpoint_state
    from dsv3.config import ModelConfig
    from dsv3.model import DeepseekV3ForCausalLM
    from dsv3.parallel.checkpoint import latest_sharded, load_model_sharded

    mcfg = ModelConfig.from_json_file(str(one / "model_config.json"))
    ref_model, got_model = DeepseekV3ForCausalLM(mcfg), DeepseekV3ForCausalLM(mcfg)
    load_checkpoint_state(latest_checkpoint(str(one)), model=ref_model, optimizer=None, ema=None)
    load_model_sharded(latest_sharded(str(pp)), got_model)
    got_w, ref_w = got_model.state_dict(), ref_model.state_dict()
    for name in ref_w:
        torch.testing.assert_close(got_w[name], ref_w[name], rtol=1e-5, atol=1e-5, msg=name)
    spans = [e for e in json.loads((pp / "pipeline_trace.json").read_text())["traceEvents"] if e["ph"] == "X"]
    assert {e["tid"] for e in spans} == {0, 1}
    from helpers import assert_one_error, cli

    code, _, err = cli(["export", latest_sharded(str(pp)), tmp_path / "hf", "--use-ema"], capsys)
    assert_one_error(code, err, "holds no EMA weights")
    assert not (tmp_path / "hf").exists()


def _stage_bytes(model, prefixes):
    """Bytes of ``model``'s parameters under the module ``prefixes`` (each tensor once)."""
    return sum(
        p.numel() * p.element_size()
        for n, p in model.named_parameters()
        if any(n.startswith(pre + ".") for pre in prefixes)
    )


@pytest.mark.parametrize(
    "schedule,pp,device,layers,ends",
    [
        ("1f1b", 2, 0, [0, 1], {"model.embed_tokens"}),
        ("1f1b", 2, 1, [2, 3], {"model.embed_tokens", "model.norm", "lm_head", "mtp"}),  # MTP embeds on the last stage
        ("zb1p", 4, 2, [2], set()),  # a middle stage: only its layer
        ("dualpipev", 4, 1, [1, 2], set()),  # stages 1 and 2 of 4 on device 1 of 2
        ("dualpipe", 4, 3, [0, 3], {"model.embed_tokens", "model.norm", "lm_head", "mtp"}),  # stages 3 and 0: 2x
    ],
)
def test_select_stages_keeps_only_the_stages_a_device_runs(schedule, pp, device, layers, ends):
    """A device's model holds exactly the parameters of its stages (counted in bytes against the whole model):
    the layers of its stages (one layer per stage here), the embedding where its first or last stage uses it,
    the norm, head and MTP on the last stage. Removed layers keep their slots (global names and indices), the
    router biases of held MoE layers stay, and the forward of a removed layer says who holds it."""
    from types import SimpleNamespace

    from dsv3.parallel.pipeline.stages import RemovedBlock, select_stages

    whole, model = build_model(4), build_model(4)
    ctx = SimpleNamespace(pp=pp, schedule=schedule, pp_rank=device)
    held = select_stages(model, ctx, seq_len=SEQ, layers=(1,) * 4 if pp == 4 else (2, 2))
    prefixes = [f"model.layers.{i}" for i in layers] + sorted(ends)
    assert held == [n for n, _ in model.named_parameters()]
    assert _stage_bytes(model, [""] + prefixes) == _stage_bytes(whole, prefixes) > 0
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in whole.parameters())
    want = {n: p for n, p in whole.named_parameters()}
    for name, p in model.named_parameters():  # global names, the whole model's values
        torch.testing.assert_close(p, want[name], rtol=0, atol=0, msg=name)
    assert len(model.model.layers) == 4 and [isinstance(b, RemovedBlock) for b in model.model.layers] == [
        i not in layers for i in range(4)
    ]
    assert [m.layer_idx for m in model.moe_layers()] == [i for i in layers if i >= 1] + ([4] if "mtp" in ends else [])
    removed = next(i for i in range(4) if i not in layers)
    with pytest.raises(RuntimeError, match=f"layer {removed} is held by another pipeline device"):
        model.model.layers[removed](torch.zeros(1, 2, 64), None, None)
    assert select_stages(model, ctx, seq_len=SEQ, layers=(1,) * 4 if pp == 4 else (2, 2)) == held  # idempotent


def test_select_stages_on_the_meta_device_allocates_nothing_and_refuses_a_model_cut_for_another_device():
    from types import SimpleNamespace

    from dsv3.model.transformer import DeepseekV3ForCausalLM
    from dsv3.parallel.pipeline.stages import select_stages

    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(build_model(4).config)
    held = select_stages(model, SimpleNamespace(pp=2, schedule="1f1b", pp_rank=0), seq_len=SEQ, layers=(2, 2))
    assert all(p.is_meta for p in model.parameters()) and "model.layers.2.input_layernorm.weight" not in held
    with pytest.raises(ConfigError, match="no longer holds model.layers.2"):
        select_stages(model, SimpleNamespace(pp=2, schedule="1f1b", pp_rank=1), seq_len=SEQ, layers=(2, 2))


@pytest.mark.parametrize(
    "name,pp", [("1f1b", 4), ("zb1p", 3), ("dualpipe", 4), ("dualpipe", 6), ("dualpipev", 4), ("dualpipev", 8)]
)
def test_validation_pass_uses_only_links_the_schedule_has(name, pp):
    """The forward-only pass sends stage s-1's activation from its device to stage s's (each stage on the lowest
    device holding it, which does hold it); every such hop between two devices is a forward link of the schedule,
    so it has its process group, and the pass visits the stages in order."""
    from dsv3.parallel.pipeline.stages import StageLayout
    from dsv3.schedules import FORWARD, SEND

    schedule = build_schedule(name, pp, 2 * pp)
    layout = StageLayout((1,) * pp, schedule.device_stages, 1, True)
    links = {
        (d, op.peer) for d, ops in enumerate(schedule.ops) for op in ops if op.kind == SEND and op.direction == FORWARD
    }
    for s in range(pp):
        assert s in schedule.device_stages[layout.eval_device(s)]
        if s and layout.eval_device(s - 1) != layout.eval_device(s):
            assert (layout.eval_device(s - 1), layout.eval_device(s)) in links, (name, pp, s)


def test_bias_update_of_a_cut_model_uses_its_layers_rows():
    """``update_router_bias`` with the whole model's [n_moe, N_r] load updates a cut model's MoE layers (last stage:
    layers 2, 3 and the MTP module) exactly as the whole model's."""
    from types import SimpleNamespace

    from dsv3.parallel.pipeline.stages import select_stages

    whole, model = build_model(4), build_model(4)
    select_stages(model, SimpleNamespace(pp=2, schedule="1f1b", pp_rank=1), seq_len=SEQ, layers=(2, 2))
    load = torch.randint(0, 50, (len(whole.moe_layers()), 8))
    whole.update_router_bias(load, 0.01)
    model.update_router_bias(load, 0.01)
    biases = dict(whole.named_buffers())
    got = {n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}
    assert len(got) == 3 and any(b.abs().sum() > 0 for b in got.values())
    for name, b in got.items():
        torch.testing.assert_close(b, biases[name], rtol=0, atol=0, msg=name)


def test_stage_forward_eval_chained_equals_the_model_lm_loss():
    """The validation forward of stages 0 and 1 (two layers each), chained, gives ``model(ids, labels).lm_loss``."""
    model = build_model(4).eval()
    ids, labels = batches(0, 1)[0]
    cos, sin = model.model.rotary_emb(torch.arange(SEQ))
    mb = MicroBatch(ids, labels, cos.unsqueeze(0), sin.unsqueeze(0), 1.0)
    s0, s1 = PipelineStage(model, 0, 2, [0, 1]), PipelineStage(model, 1, 2, [2, 3])
    got = s1.forward_eval(s0.forward_eval(None, mb), mb)
    with torch.no_grad():
        want = model(ids, labels).lm_loss
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_pp_without_torchrun_is_a_config_error(train_setup, tmp_path, monkeypatch):
    from helpers import quick_options

    from dsv3.train.config import TrainConfig
    from dsv3.train.session import build_session

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    opts = quick_options(train_setup, tmp_path / "run", pp=2)
    with pytest.raises(ConfigError, match="launch a multiple of 2 with torchrun"):
        build_session(TrainConfig.from_dict(opts), write=False, prefetch=False)


def test_runtime_rejects_a_bad_explicit_split():
    from dsv3.parallel.pipeline.executor import PipelineRuntime

    with pytest.raises(ConfigError, match="summing to the model's 4 layers"):
        PipelineRuntime(build_model(4), "1f1b", 2, seq_len=SEQ, layers=(1, 2))
