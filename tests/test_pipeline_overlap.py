"""The FB op hides the expert-parallel all-to-all (report 3.2.1, Figure 4): MoE layers cut at their exchanges.

Two gloo ranks with ep=2 run one stage holding the whole model (pp=1, each rank its own
micro-batches, experts sharded) through

* ``fb``: F(mb0); FB = F(mb1) interleaved step by step with B(mb0), as the runtime's FB op does;
  B(mb1) as a split B op (expert GEMM weight gradients deferred to a W op);
* ``seq``: F(mb0), F(mb1), B(mb0), B(mb1), no interleaving (the negative control of the event check);
* ``uncut``: ``seq`` with the MoE layers run whole (exchanges inside one step, autograd through them);
* ``full``: ``fb`` under full recomputation (only the attention branch of a communicating layer is
  recomputed);

and every run's per-micro-batch losses and gradients (dense gradients summed over the ranks) must equal
one process running the unsharded model on both ranks' micro-batches with ``(loss / 2).backward()``.
The recorded component events of the FB op must show every exchange started before a component of the
other micro-batch ran and waited after it; a cut MoE feed-forward equals the uncut one, with and
without FP8 dispatch.
"""

from __future__ import annotations

import pytest
import torch
from dist_helpers import run_ranks
from helpers import small_config

B, T, N_MICRO = 2, 16, 2
TOL = dict(rtol=1e-5, atol=1e-6)
_DONE = object()


ALPHA = 0.01  # the sequence-wise balance factor every forward here trains with


def _config():
    return small_config()


def _model():
    from dsv3.model import DeepseekV3ForCausalLM

    model = DeepseekV3ForCausalLM(_config())
    model.reset_parameters(seed=7)
    model.train()
    return model


def _data(rank: int, mb: int):
    gen = torch.Generator().manual_seed(100 + 10 * rank + mb)
    tokens = torch.randint(0, _config().vocab_size, (B, T + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def _grads(model, dense_sum=None) -> dict[str, torch.Tensor]:
    """Gradients under global names (experts split per global expert); ``dense_sum`` sums the others over ranks."""
    from dsv3.model import Experts

    out = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, Experts):
            for pname, p in mod.named_parameters():
                for i in range(p.shape[0]):
                    out[f"{mod_name}.{pname}.{mod.expert_offset + i}"] = p.grad[i].clone()
    for name, p in model.named_parameters():
        if "experts." in name and "shared_experts" not in name:
            continue
        g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        if dense_sum is not None:
            dense_sum(g)
        out[name] = g
    return out


def _drive(stage, mbs, mode: str, store):
    """Run the micro-batches ``mbs`` through ``stage`` in ``mode``; returns per-micro-batch losses and the FB events."""
    from dsv3.parallel.pipeline.stages import StageRecord

    recs = [StageRecord() for _ in mbs]

    def run(gen):
        for _ in gen:
            pass

    events = None
    if mode in ("fb", "full"):
        run(stage.forward_steps(None, mbs[0], recs[0]))
        stage.events = events = []
        fwd, bwd = stage.forward_steps(None, mbs[1], recs[1]), stage.backward_steps(recs[0], None, mbs[0].scale)
        active = [fwd, bwd]
        while active:  # the runtime's FB op: one step of each in turn
            for gen in list(active):
                if next(gen, _DONE) is _DONE:
                    active.remove(gen)
        stage.events = None
        losses = [float(sum(r.parts)) for r in recs]
        steps = stage.backward_steps(recs[1], None, mbs[1].scale)
        while True:  # a B op: expert and Linear weight gradients queued
            with store.deferring():
                if next(steps, _DONE) is _DONE:
                    break
        store.flush("mb1")
        assert store.pop("mb1") > 0  # the W op
    else:  # F(mb0), then the FB op's two halves one after the other (recorded), then B(mb1)
        run(stage.forward_steps(None, mbs[0], recs[0]))
        stage.events = events = []
        run(stage.forward_steps(None, mbs[1], recs[1]))
        run(stage.backward_steps(recs[0], None, mbs[0].scale))
        stage.events = None
        losses = [float(sum(r.parts)) for r in recs]
        run(stage.backward_steps(recs[1], None, mbs[1].scale))
    return losses, events


def _worker(rank: int):
    import torch.distributed as dist

    from dsv3.memory.recompute import apply_recompute
    from dsv3.parallel.dispatch import shard_experts
    from dsv3.parallel.pipeline.stages import MicroBatch, PipelineStage
    from dsv3.parallel.pipeline.wgrad import WeightGradStore, split_weight_grads
    from dsv3.parallel.world import init_parallel

    ctx = init_parallel(dp=2, ep=2, n_routed_experts=_config().n_routed_experts, timeout_s=30)
    out = {}
    for mode in ("fb", "seq", "uncut", "full"):
        model = shard_experts(_model(), ctx, dispatcher="alltoall")
        if mode == "full":
            apply_recompute(model, "full")
        store = WeightGradStore()
        split_weight_grads(model, store)
        n_layers = model.config.num_hidden_layers
        stage = PipelineStage(model, 0, 1, list(range(n_layers)), cut_moe=mode != "uncut")
        stage.seq_aux_alpha = ALPHA
        cos, sin = model.model.rotary_emb(torch.arange(T))
        mbs = [MicroBatch(*_data(rank, i), cos.unsqueeze(0), sin.unsqueeze(0), 1.0 / N_MICRO) for i in range(N_MICRO)]
        losses, events = _drive(stage, mbs, mode, store)
        out[mode] = {"losses": losses, "grads": _grads(model, lambda g: dist.all_reduce(g)), "events": events}
    out["ffn"] = {fp8: _ffn_pair(ctx, fp8) for fp8 in (False, True)}
    out["exchange"] = _exchange_rows(ctx)
    return out


def _exchange_rows(ctx):
    """``exchange_start`` of known rows with uneven splits (and an empty one), plain and FP8."""
    from dsv3.parallel.dispatch import AllToAllDispatcher

    disp = AllToAllDispatcher(ctx.ep_group, 2, ctx.ep_rank, 8)
    in_splits = [[3, 0], [1, 2]][ctx.rank]  # rank 0 sends 3 rows to itself and none to rank 1
    rows = torch.arange(sum(in_splits) * 256, dtype=torch.float32).view(-1, 256) / 7 + 100 * ctx.rank
    out_splits = [[3, 1], [0, 2]][ctx.rank]
    return {fp8: (rows, disp.exchange_start(rows, in_splits, out_splits, fp8=fp8).wait()) for fp8 in (False, True)}


def _ffn_pair(ctx, fp8: bool):
    """One MoE feed-forward step, cut (three components each way) and uncut, on the same input and output grad."""
    from dsv3.model.moe import RoutingStats
    from dsv3.parallel.dispatch import shard_experts
    from dsv3.parallel.pipeline.overlap import CutMoE

    gen = torch.Generator().manual_seed(3 + ctx.rank)
    x = torch.randn(B, T, _config().hidden_size, generator=gen)
    g = torch.randn(B, T, _config().hidden_size, generator=gen)
    res = []
    for cut in (True, False):
        model = shard_experts(_model(), ctx, dispatcher="alltoall", fp8=fp8)
        layer = model.model.layers[1]
        h = x.clone().requires_grad_(True)
        stats = RoutingStats(ALPHA)
        if cut:
            ffn = CutMoE(layer, h, stats)
            ffn.dispatch()
            ffn.mlp()
            out = ffn.combine()
            ffn.backward_combine(g)
            ffn.backward_mlp()
            ffn.backward_dispatch(0.5)
        else:
            out = h + layer.ffn(h, stats)
            torch.autograd.backward([out, stats.balance[1]], [g, torch.tensor(0.5)])
        grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
        res.append(
            {
                "out": out.detach(),
                "h_grad": h.grad.clone(),
                "grads": grads,
                "load": stats.load[1],
                "balance": stats.balance[1].detach(),
            }
        )
    return res


def _reference():
    """One process, unsharded model, both ranks' micro-batches, ``(loss / N_MICRO).backward()`` each."""
    model = _model()
    losses = {}
    for rank in range(2):
        for mb in range(N_MICRO):
            out = model(*_data(rank, mb), seq_aux_alpha=ALPHA)
            (out.loss / N_MICRO).backward()
            losses[(rank, mb)] = out.loss.item()
    return losses, _grads(model)


@pytest.fixture(scope="module")
def overlap_runs():
    return run_ranks(_worker, 2, timeout=150), _reference()


@pytest.mark.slow
@pytest.mark.timeout(200)
@pytest.mark.parametrize("mode", ["fb", "seq", "uncut", "full"])
def test_fb_op_with_ep_equals_one_process(overlap_runs, mode):
    results, (ref_losses, ref_grads) = overlap_runs
    for rank, res in enumerate(results):
        got = res[mode]
        want = torch.tensor([ref_losses[(rank, i)] for i in range(N_MICRO)])
        torch.testing.assert_close(torch.tensor(got["losses"]), want, **TOL)
        assert set(got["grads"]) <= set(ref_grads)
        assert len([n for n in got["grads"] if ".experts." in n and "shared" not in n]) > 0
        for name, t in got["grads"].items():
            torch.testing.assert_close(t, ref_grads[name], **TOL, msg=lambda m, n=name: f"{mode} {n}: {m}")


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_fb_interleaving_equals_f_then_b(overlap_runs):
    results, _ = overlap_runs
    for res in results:
        for name, t in res["fb"]["grads"].items():
            torch.testing.assert_close(t, res["seq"]["grads"][name], **TOL, msg=name)
        assert res["fb"]["losses"] == pytest.approx(res["seq"]["losses"], rel=1e-6)


def _exchanges(events):
    """(phase, exchange, start time, wait time) of every exchange, starts and waits paired in order."""
    open_: dict[tuple[str, str], list[float]] = {}
    pairs = []
    for phase, name, t0, _ in sorted(events, key=lambda e: e[2]):
        if name.endswith(".start"):
            open_.setdefault((phase, name[:-6]), []).append(t0)
        elif name.endswith(".wait"):
            start = open_[(phase, name[:-5])].pop(0)
            pairs.append((phase, name[:-5], start, t0))
    assert all(not v for v in open_.values()), "an exchange was started and never waited"
    return pairs


@pytest.mark.slow
@pytest.mark.timeout(200)
@pytest.mark.parametrize("mode", ["fb", "full"])
def test_every_exchange_is_in_flight_while_the_other_microbatch_computes(overlap_runs, mode):
    results, _ = overlap_runs
    n_moe = _config().num_hidden_layers - _config().first_k_dense_replace
    for res in results:
        events = res[mode]["events"]
        pairs = _exchanges(events)
        # forward: dispatch and combine of every cut layer; backward: their gradient exchanges
        assert sorted((p, n) for p, n, _, _ in pairs) == sorted(
            [(ph, n) for ph in "FB" for n in ("dispatch", "combine")] * n_moe
        )
        spans = [(p, n, t0, t1) for p, n, t0, t1 in events if "." not in n]
        assert {n for _, n, _, _ in spans} >= {"EMB", "ATTN", "DISPATCH", "MLP", "COMBINE", "HEAD"}
        for phase, name, start, wait in pairs:
            assert _hidden(spans, phase, start, wait), (
                f"{phase} {name} exchange was not in flight during a component of the other micro-batch"
            )


def _hidden(spans, phase, start, wait) -> bool:
    """Whether a component of the other phase (micro-batch) ran between an exchange's start and its wait."""
    other = "B" if phase == "F" else "F"
    return any(s[0] == other and s[2] >= start and s[3] <= wait for s in spans)


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_event_check_fails_without_interleaving(overlap_runs):
    """The same ops run one after the other (F then B): the same exchanges, none hidden."""
    results, _ = overlap_runs
    for res in results:
        events = res["seq"]["events"]
        pairs = _exchanges(events)
        assert len(pairs) == 4 * (_config().num_hidden_layers - _config().first_k_dense_replace)
        spans = [e for e in events if "." not in e[1]]
        assert not any(_hidden(spans, phase, start, wait) for phase, _, start, wait in pairs)


@pytest.mark.slow
@pytest.mark.timeout(200)
@pytest.mark.parametrize("fp8", [False, True])
def test_cut_moe_equals_the_uncut_moe(overlap_runs, fp8):
    results, _ = overlap_runs
    for res in results:
        cut, whole = res["ffn"][fp8]
        assert torch.equal(cut["load"], whole["load"])
        torch.testing.assert_close(cut["balance"], whole["balance"], **TOL)
        torch.testing.assert_close(cut["out"], whole["out"], **TOL)
        torch.testing.assert_close(cut["h_grad"], whole["h_grad"], **TOL)
        assert cut["grads"].keys() == whole["grads"].keys() and len(cut["grads"]) > 0
        for name in cut["grads"]:
            torch.testing.assert_close(cut["grads"][name], whole["grads"][name], **TOL, msg=name)


@pytest.mark.slow
@pytest.mark.timeout(200)
@pytest.mark.parametrize("fp8", [False, True])
def test_exchange_start_moves_rows_by_splits(overlap_runs, fp8):
    from dsv3.fp8.comm import quantize_for_dispatch

    results, _ = overlap_runs
    sent = [res["exchange"][fp8][0] for res in results]
    expect = [torch.cat([sent[0][:3], sent[1][:1]]), sent[1][1:3]]  # rank 0: its own 3 rows, rank 1's first
    for rank, res in enumerate(results):
        got = res["exchange"][fp8][1]
        want = quantize_for_dispatch(expect[rank]).dequantize(torch.float32) if fp8 else expect[rank]
        assert got.dtype == torch.float32 and torch.equal(got, want)
        if fp8:
            assert not torch.equal(got, expect[rank])  # really quantised


def test_cuts_only_layers_that_exchange_tokens():
    """``cuts``: an MoE layer with the local dispatcher (one process) or without gradients is not cut; a dense
    layer never is."""
    from dsv3.model import DeepseekV3ForCausalLM
    from dsv3.parallel.pipeline.overlap import cuts

    model = DeepseekV3ForCausalLM(_config())
    dense, moe = model.model.layers[0], model.model.layers[1]
    assert not cuts(dense) and not cuts(moe)

    class Exchanging:  # what makes a dispatcher communicate: a process group and start/wait halves
        group = object()

        def dispatch_start(self, *a):
            raise AssertionError("not called")

    moe.mlp.dispatcher = Exchanging()
    assert cuts(moe)
    with torch.no_grad():
        assert not cuts(moe)


def test_span_and_mark_record_timed_events():
    from dsv3.parallel.pipeline.overlap import mark, span

    events = []
    with span(events, "F", "MLP"):
        mark(events, "F", "dispatch.wait")
    with span(None, "B", "MLP"):  # None: nothing recorded, no error
        mark(None, "B", "x")
    (p1, n1, t0, t1), (p2, n2, s0, s1) = events
    assert (p1, n1, t0 == t1) == ("F", "dispatch.wait", True)
    assert (p2, n2) == ("F", "MLP") and s0 <= t0 <= s1
