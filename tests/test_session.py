"""build_session / train_step: the training step the loop, dsv3 memory and the parallel runtime share."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from helpers import quick_options, read_jsonl

from dsv3.train.config import TrainConfig
from dsv3.train.loop import train
from dsv3.train.prefetch import BatchPrefetcher
from dsv3.train.session import build_session
from dsv3.train.step import train_step


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


def _hand_losses(model, ids: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """L_Main and L^1 (D = 1) of ``model`` on one micro-batch in float64, from its modules and F.cross_entropy."""
    with torch.no_grad():
        h = model(ids).hidden_states  # h^0, before the final norm
        v = model.config.vocab_size
        main = F.cross_entropy(model.lm_head(model.model.norm(h)).reshape(-1, v), labels.reshape(-1))
        n = ids.shape[1] - 1
        cos, sin = model.model.rotary_emb(torch.arange(n))
        mtp = model.mtp[0]
        h1 = mtp(h[:, :n], model.model.embed_tokens(ids[:, 1:]), cos[None], sin[None])
        depth1 = F.cross_entropy(model.lm_head(mtp.shared_head.norm(h1)).reshape(-1, v), labels[:, 1:].reshape(-1))
    return float(main), float(depth1)


def test_mtp_weight_reaches_the_loss_as_an_argument_and_switches_mid_run(train_setup, tmp_path):
    """lambda 0.3 for the first half of a 2-step run, then 0.1: each step's MTP loss is lambda * L^1 of the
    float64 hand computation. The model config.json carries old extension keys: its lambda (0.7) loses to the
    run's, its alpha (0) is the run's default (no balance loss); nothing writes the model config."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    data = json.loads(Path(train_setup["model"]).read_text())
    data.update(mtp_loss_weight=0.7, seq_aux_alpha=0.0, bias_update_speed=0.0)
    (model_dir / "config.json").write_text(json.dumps(data))
    setup = dict(train_setup, model=str(model_dir / "config.json"))
    s = _session(setup, tmp_path, steps=2, mtp_loss_weight=0.3, mtp_loss_weight_late=0.1, mtp_switch=0.5)
    try:
        s.model.double()
        config_before = s.model.config.to_dict()
        for step, lam in ((0, 0.3), (1, 0.1)):
            _, gamma = s.begin_step()
            assert gamma == 0.0  # the config.json's bias_update_speed, the run leaves it unset
            batches, _ = s.next_batches()
            hand = [_hand_losses(s.model, ids, labels) for ids, labels in batches]
            stats = train_step(s, batches)
            main = sum(m for m, _ in hand) / len(hand)
            mtp = sum(lam * d for _, d in hand) / len(hand)
            assert math.isclose(stats.lm_loss, main, rel_tol=1e-5)
            assert math.isclose(stats.mtp_loss, mtp, rel_tol=1e-5), (step, stats.mtp_loss, mtp)
            assert stats.balance_loss == 0.0 and math.isclose(stats.loss, main + mtp, rel_tol=1e-5)
            s.step += 1
        assert s.model.config.to_dict() == config_before
    finally:
        s.close()
