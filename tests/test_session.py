"""build_session / train_step: the training step the loop, dsv3 memory and the parallel runtime share."""

from __future__ import annotations

import math

import torch
from helpers import quick_options, read_jsonl

from dsv3.train.config import TrainConfig
from dsv3.train.loop import train
from dsv3.train.session import BatchPrefetcher, build_session, train_step


def _session(setup, tmp_path, **changes):
    opts = quick_options(setup, tmp_path / "run", grad_clip=0.0, **changes)
    return build_session(TrainConfig.from_dict(opts), write=False, prefetch=False)


def test_build_session_writes_nothing_when_asked(train_setup, tmp_path):
    s = _session(train_setup, tmp_path)
    try:
        assert not (tmp_path / "run").exists()
        assert s.step == 0 and s.n_micro(0) == 2  # global 8 / micro 4
    finally:
        s.close()


def test_accumulated_gradients_equal_one_big_batch_in_float64(train_setup, tmp_path):
    """Two micro-batches of 4 give the update of one batch of 8 (equal label counts, mean losses),
    computed independently in float64 with plain autograd (the router computes in
    FP32 whatever the model dtype, hence the 1e-6 tolerances)."""
    a = _session(train_setup, tmp_path, dtype="float32")
    b = _session(train_setup, tmp_path, dtype="float32")
    try:
        a.model.double()
        b.model.double()
        a.begin_step()
        b.begin_step()
        batches, _ = a.next_batches()
        assert len(batches) == 2 and all(ids.shape == (4, 32) for ids, _ in batches)
        assert all(bool((lab != -100).all()) for _, lab in batches)  # packed: every token has a label
        grads = {}
        a.optimizer.step = lambda *args, **kw: grads.update({n: p.grad.clone() for n, p in a.model.named_parameters()})
        stats = train_step(a, batches, gamma=0.0)  # the gradients the optimizer would be handed
        ids = torch.cat([i for i, _ in batches])
        labels = torch.cat([lab for _, lab in batches])
        out = b.model(ids, labels)
        out.loss.backward()
        assert math.isclose(stats.loss, float(out.loss.detach()), rel_tol=1e-6)
        assert math.isclose(stats.lm_loss, float(out.lm_loss.detach()), rel_tol=1e-6)
        assert stats.tokens == 8 * 32 and stats.loss_tokens == 8 * 32 and not stats.skipped
        for name, q in b.model.named_parameters():
            # FP32 router: differences of ~1e-7 of the tensor's scale (their rounding depends on the CPU's kernels)
            scale = float(q.grad.abs().max())
            torch.testing.assert_close(grads[name], q.grad, rtol=1e-5, atol=1e-6 * scale + 1e-12, msg=name)
        assert stats.load is not None and int(stats.load.sum()) == int(out.expert_load.sum())
    finally:
        a.close()
        b.close()


def test_non_finite_step_is_skipped_and_changes_nothing(train_setup, tmp_path):
    s = _session(train_setup, tmp_path)
    try:
        s.begin_step()
        batches, _ = s.next_batches()
        with torch.no_grad():
            s.model.model.norm.weight[0] = float("nan")
        before = [p.detach().clone() for p in s.model.parameters()]
        bias = [m.gate.e_score_correction_bias.clone() for m in s.model.moe_layers()]
        stats = train_step(s, batches)
        assert stats.skipped and not math.isfinite(stats.loss)
        after = list(s.model.parameters())
        assert all(torch.equal(x, y) or (x.isnan() == y.isnan()).all() for x, y in zip(before, after))
        assert all(torch.equal(x, m.gate.e_score_correction_bias) for x, m in zip(bias, s.model.moe_layers()))
        assert all(p.grad is None for p in s.model.parameters())
    finally:
        s.close()


def test_background_prefetch_hands_out_the_same_batches_and_positions(train_setup, tmp_path):
    s = _session(train_setup, tmp_path)
    try:
        start = s.loader.state_dict()
        fg = BatchPrefetcher(s.loader, 4, torch.device("cpu"), background=False)
        ref = [fg.get(n)[0] for n in (2, 1, 3)]
        ref_after = fg.state_after
        s.loader.load_state_dict(start)
        bg = BatchPrefetcher(s.loader, 4, torch.device("cpu"), background=True)
        got = [bg.get(2, 1)[0], bg.get(1, 3)[0], bg.get(3, 2)[0]]  # the last one prefetches a step ahead
        assert bg.state_after == ref_after  # what a checkpoint records ignores the batches fetched ahead
        for r, g in zip(ref, got):
            assert len(r) == len(g) and all(torch.equal(x, y) for (x, _), (y, _) in zip(r, g))
        bg.drain()
        assert s.loader.state_dict() == ref_after
    finally:
        s.close()


def test_metrics_carry_mfu_peak_memory_tokens_and_loss_split(train_setup, tmp_path):
    train(TrainConfig.from_dict(quick_options(train_setup, tmp_path / "run", steps=2)), log=lambda s: None)
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert 0 < r["mfu"] < 1.5 and r["tflops"] > 0  # achieved over the measured matmul peak of this CPU
        assert r["peak_memory_gib"] > 0.05
        assert r["tokens"] == r["step"] * 8 * 32 and r["loss_tokens"] == 8 * 32
        assert math.isclose(r["loss"], r["lm_loss"] + r["mtp_loss"] + r["balance_loss"], rel_tol=1e-5)
