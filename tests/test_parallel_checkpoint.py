"""Sharded (DCP) checkpoints: saved at EP=2 on 2 ranks, resumed in one process (and back) with the
losses and the CPU EMA (report 3.2.3) of an uninterrupted run; a half-written checkpoint is ignored."""

from __future__ import annotations

import os

import pytest
import torch
from dist_helpers import run_ranks
from test_parallel_ep import OPT, _batch, _config, _model

from dsv3.config import RECIPE_DEFAULTS

WORLD_BATCH = 2  # the global batch is _batch(2, step): 4 sequences
EMA_DECAY = 0.5  # far from 1, so that every step's parameters weigh in the compared EMA


def _session(world: int, ep: int):
    from dsv3.memory.ema import CPUEMA
    from dsv3.parallel.dispatch import shard_experts
    from dsv3.parallel.world import init_parallel
    from dsv3.parallel.zero import ZeroAdamW

    ctx = init_parallel(dp=world, ep=ep, n_routed_experts=_config().n_routed_experts)
    model = shard_experts(_model(), ctx, dispatcher="alltoall" if ep > 1 else "local")
    return ctx, model, ZeroAdamW(model, ctx, **OPT), CPUEMA(model, EMA_DECAY)


def _global_ema(model, ema):
    """The EMA under global names (experts by global index), independent of the checkpoint code's keys."""
    from dsv3.model import Experts

    shadow, out = ema.shadow(), {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, Experts):
            for leaf, _ in mod.named_parameters():
                t = shadow[f"{mod_name}.{leaf}"]
                out.update({f"{mod_name}.{leaf}#{mod.expert_offset + i}": t[i].clone() for i in range(t.shape[0])})
    out.update({n: t.clone() for n, t in shadow.items() if "experts." not in n})
    return out, ema.num_updates


def _steps(
    ctx,
    model,
    opt,
    steps,
    ema,
    world: int = WORLD_BATCH,
    alpha: float = RECIPE_DEFAULTS["seq_aux_alpha"],
    gamma: float = RECIPE_DEFAULTS["bias_update_speed"],
):
    """Train ``steps`` on this rank's part of ``_batch(world, step)`` with balance factor ``alpha`` and bias update
    speed ``gamma`` (default: the report's); returns the global losses."""
    from dsv3.parallel.zero import all_mean, sync_loads

    losses = []
    for step in steps:
        ids, labels = _batch(world, step)
        per = ids.shape[0] // ctx.dp
        rows = slice(ctx.dp_rank * per, (ctx.dp_rank + 1) * per)
        out = model(ids[rows], labels[rows], seq_aux_alpha=alpha)
        out.loss.backward()
        losses.append(float(all_mean(out.loss.detach().reshape(1), ctx)[0]))
        opt.step(max_norm=1.0)
        opt.zero_grad()
        model.update_router_bias(sync_loads(out.expert_load, ctx), gamma)
        if ema is not None:
            ema.update()
    return losses


def _train_and_save(rank, world, ep, run_dir):
    from dsv3.parallel.checkpoint import save_sharded

    ctx, model, opt, ema = _session(world, ep)
    first = _steps(ctx, model, opt, range(2), ema)
    save_sharded(run_dir, 2, model=model, optimizer=opt, ctx=ctx, extra={"loader": {"position": 8}}, ema=ema)
    losses = first + _steps(ctx, model, opt, range(2, 4), ema)
    return losses, _global_ema(model, ema)


def _resume(rank, world, ep, run_dir):
    from dsv3.parallel.checkpoint import latest_sharded, load_sharded

    ctx, model, opt, ema = _session(world, ep)
    meta = load_sharded(latest_sharded(run_dir), model=model, optimizer=opt, ctx=ctx, ema=ema)
    assert meta["step"] == 2 and meta["loader"] == {"position": 8} and ema.num_updates == 2
    return _steps(ctx, model, opt, range(2, 4), ema), _global_ema(model, ema)


def _same_ema(got, want):
    (g, gn), (w, wn) = got, want
    assert gn == wn == 4
    assert sorted(g) == sorted(w)
    for name in w:
        torch.testing.assert_close(g[name], w[name], rtol=1e-5, atol=1e-6, msg=name)


def _merge_experts(per_rank):
    """One rank's EMA dict per EP rank -> the whole model's (each rank holds its experts)."""
    merged = {}
    for emas, _ in per_rank:
        merged.update(emas)
    return merged, per_rank[0][1]


def _both_ways(rank, a, b):
    """One 2-rank world (EP = 2): train 4 steps saving at step 2 into ``a``, and resume ``b`` (written by one
    process) at step 2."""
    return _train_and_save(rank, 2, 2, a), _resume(rank, 2, 2, b)


@pytest.mark.timeout(150)
def test_checkpoints_move_between_ep2_and_one_process_both_ways(tmp_path):
    """Saved at EP = 2 on 2 ranks and resumed in one process, and saved in one process and resumed at EP = 2:
    the losses and the EMA of the uninterrupted run (the one-process parts run in this process)."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    os.makedirs(a)
    os.makedirs(b)
    one, one_ema = _train_and_save(0, 1, 1, b)
    ranks = run_ranks(_both_ways, 2, a, b, timeout=140)
    # EP = 2 -> one process
    uninterrupted = ranks[0][0][0]
    assert sorted(os.listdir(a)) == ["dcp-00000002"]
    resumed, ema = _resume(0, 1, 1, a)
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(uninterrupted[2:]), rtol=1e-5, atol=1e-6)
    _same_ema(ema, _merge_experts([r[0][1] for r in ranks]))
    # one process -> EP = 2
    back = [r[1] for r in ranks]
    for r, _ in back:
        torch.testing.assert_close(torch.tensor(r), torch.tensor(one[2:]), rtol=1e-5, atol=1e-6)
    _same_ema(_merge_experts([e for _, e in back]), one_ema)


def test_half_written_checkpoint_is_ignored(tmp_path):
    from dsv3.parallel.checkpoint import latest_sharded

    (tmp_path / "dcp-00000004.tmp").mkdir()
    (tmp_path / "dcp-00000006").mkdir()  # no meta.json: never renamed into place by dsv3
    assert latest_sharded(str(tmp_path)) is None


@pytest.mark.timeout(120)
def test_export_writes_the_hugging_face_directory_of_a_sharded_checkpoint(tmp_path):
    from dsv3.cli import main as cli_main
    from dsv3.model import DeepseekV3ForCausalLM
    from dsv3.parallel.checkpoint import save_sharded
    from dsv3.parallel.world import ParallelContext
    from dsv3.parallel.zero import ZeroAdamW

    run = tmp_path / "run"
    run.mkdir()
    model = _model()
    _config().save(run / "model_config.json")
    with torch.no_grad():
        for m in model.moe_layers():
            m.gate.e_score_correction_bias.uniform_(-0.01, 0.01)  # biases travel too
    ctx = ParallelContext.single()
    save_sharded(str(run), 5, model=model, optimizer=ZeroAdamW(model, ctx, **OPT), ctx=ctx)
    assert cli_main(["export", str(run), str(tmp_path / "hf")]) == 0
    loaded = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf")
    ref = dict(model.state_dict())
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, ref[name]), name


@pytest.mark.timeout(120)
def test_a_checkpoint_without_ema_restarts_the_ema_from_the_loaded_weights(tmp_path):
    """A sharded checkpoint written without an EMA (an older dsv3, or a run without --ema-decay) resumed by a
    run with one: the EMA starts from the checkpoint's weights (not the freshly initialised ones), 0 updates."""
    from dsv3.memory.ema import CPUEMA
    from dsv3.parallel.checkpoint import load_sharded, save_sharded
    from dsv3.parallel.world import ParallelContext
    from dsv3.parallel.zero import ZeroAdamW

    ctx = ParallelContext.single()
    saved = _model()
    with torch.no_grad():
        for p in saved.parameters():
            p.add_(0.5)  # unlike a fresh model's weights
    path = save_sharded(str(tmp_path), 3, model=saved, optimizer=ZeroAdamW(saved, ctx, **OPT), ctx=ctx)
    model = _model()
    ema = CPUEMA(model, EMA_DECAY)
    meta = load_sharded(path, model=model, optimizer=ZeroAdamW(model, ctx, **OPT), ctx=ctx, ema=ema)
    assert meta["step"] == 3 and "ema" not in meta and ema.num_updates == 0
    want = dict(saved.named_parameters())
    for name, t in ema.shadow().items():
        assert torch.equal(t, want[name].detach()), name
    ema.close()
