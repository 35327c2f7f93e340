"""Expert parallelism (all-to-all dispatcher) + ZeRO-1 data parallelism equal one process.

Loss, gradients, parameters after 3 optimizer steps, router biases and expert loads of a tiny
FP32 model at EP=2 (2 ranks) and EP=2 x EDP=2 / EP=4 (4 ranks), each rank taking a disjoint
slice of the global batch, against one process on the whole batch with the unsharded AdamW.
"""

from __future__ import annotations

import pytest
import torch
from dist_helpers import run_ranks
from helpers import small_config

B_PER_RANK, T, STEPS = 2, 16, 3
# eps 1e-3 keeps the AdamW update Lipschitz in the gradient: with eps 1e-8 it maps the ~1e-7 round-off
# of near-zero gradient entries (summed in another order across ranks) to full +-lr steps of either sign
OPT = dict(lr=1e-3, eps=1e-3, weight_decay=0.1)


def _config():
    return small_config()


ALPHA, GAMMA = 0.01, 0.01  # the balance factor and bias update speed the runs train with


def _batch(world: int, step: int):
    gen = torch.Generator().manual_seed(50 + step)
    tokens = torch.randint(0, _config().vocab_size, (world * B_PER_RANK, T + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def _model():
    from dsv3.model import DeepseekV3ForCausalLM

    model = DeepseekV3ForCausalLM(_config())
    model.reset_parameters(seed=5)
    return model


def _full_names(model, ctx=None):
    """Gradient/parameter tensors under global names; expert tensors as {global expert: tensor}."""
    from dsv3.model import Experts

    out = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, Experts):
            for pname, p in mod.named_parameters():
                for i in range(p.shape[0]):
                    out[f"{mod_name}.{pname}.{mod.expert_offset + i}"] = (p, i)
    for name, p in model.named_parameters():
        if "experts." not in name:
            out[name] = (p, None)
    return out


def _take(entries, grad: bool):
    res = {}
    for name, (p, i) in entries.items():
        t = p.grad if grad else p.detach()
        res[name] = (t if i is None else t[i]).clone()
    return res


def _ep_workers(rank: int, world: int, eps: tuple[int, ...]):
    """:func:`_ep_worker` for each ep in one spawned world (one process start for all layouts)."""
    return [_ep_worker(rank, world, ep) for ep in eps]


def _ep_worker(rank: int, world: int, ep: int):
    from dsv3.parallel.dispatch import comm_stats, shard_experts
    from dsv3.parallel.world import init_parallel
    from dsv3.parallel.zero import ZeroAdamW, all_mean, sync_loads

    ctx = init_parallel(dp=world, ep=ep, n_routed_experts=_config().n_routed_experts)  # a new mesh per layout
    model = shard_experts(_model(), ctx, dispatcher="alltoall")
    opt = ZeroAdamW(model, ctx, **OPT)
    losses, loads, grads = [], [], None
    norms = []
    for step in range(STEPS):
        ids, labels = _batch(world, step)
        rows = slice(rank * B_PER_RANK, (rank + 1) * B_PER_RANK)
        out = model(ids[rows], labels[rows], seq_aux_alpha=ALPHA)
        out.loss.backward()
        losses.append(float(all_mean(out.loss.detach().reshape(1), ctx)[0]))
        load = sync_loads(out.expert_load, ctx)
        loads.append(load)
        opt.reduce_gradients()
        if step == 0:
            grads = _take(_full_names(model), grad=True)
        norms.append(float(opt.step(max_norm=1.0, reduce=False)))
        opt.zero_grad()
        model.update_router_bias(load, GAMMA)
    biases = [m.gate.e_score_correction_bias.clone() for m in model.moe_layers()]
    stats = comm_stats(model)
    return {
        "losses": losses,
        "loads": loads,
        "grads": grads,
        "params": _take(_full_names(model), grad=False),
        "biases": biases,
        "norms": norms,
        "nodes": stats.nodes_reached / max(stats.tokens, 1),
        "bytes": stats.bytes_sent,
    }


def _reference(world: int, model=None):
    """One process over the whole global batches (``model``: default :func:`_model`)."""
    from dsv3.optim import build_optimizer, clip_grad_norm

    model = model if model is not None else _model()
    opt = build_optimizer(model, **OPT)
    losses, loads, grads = [], [], None
    norms = []
    for step in range(STEPS):
        ids, labels = _batch(world, step)
        out = model(ids, labels, seq_aux_alpha=ALPHA)
        out.loss.backward()
        losses.append(out.loss.item())
        loads.append(out.expert_load)
        if step == 0:
            grads = _take(_full_names(model), grad=True)
        norms.append(float(clip_grad_norm(list(model.parameters()), 1.0)))
        opt.step()
        opt.zero_grad()
        model.update_router_bias(out.expert_load, GAMMA)
    return {
        "losses": losses,
        "loads": loads,
        "grads": grads,
        "params": _take(_full_names(model), grad=False),
        "biases": [m.gate.e_score_correction_bias.clone() for m in model.moe_layers()],
        "norms": norms,
    }


def _check(results, ref, world, ep):
    tol = dict(rtol=1e-5, atol=1e-6)
    per = _config().n_routed_experts // ep
    for rank, res in enumerate(results):
        torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(ref["losses"]), **tol)
        torch.testing.assert_close(torch.tensor(res["norms"]), torch.tensor(ref["norms"]), **tol)
        for a, b in zip(res["loads"], ref["loads"]):
            assert torch.equal(a, b)
        for a, b in zip(res["biases"], ref["biases"]):
            assert torch.equal(a, b)  # identical global loads -> identical sign updates
        for kind in ("grads", "params"):
            assert set(res[kind]) <= set(ref[kind])
            for name, t in res[kind].items():
                torch.testing.assert_close(t, ref[kind][name], **tol, msg=lambda m, k=kind, n=name: f"{k} {n}: {m}")
            experts = [n for n in res[kind] if ".experts." in n]
            assert len(experts) == len([n for n in ref[kind] if ".experts." in n]) // ep
            assert all(int(n.rsplit(".", 1)[1]) // per == rank % ep for n in experts)  # this rank's block
        assert 1.0 <= res["nodes"] <= ep and res["bytes"] > 0


@pytest.mark.timeout(120)
def test_ep2_forward_backward_and_three_steps_equal_one_process():
    results = run_ranks(_ep_worker, 2, 2, 2, timeout=110)
    _check(results, _reference(2), 2, 2)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_four_ranks_ep_and_zero1_equal_one_process():
    """EP = 2 x EDP = 2 and EP = 4 on one 4-rank world."""
    runs = run_ranks(_ep_workers, 4, 4, (2, 4), timeout=170)
    ref = _reference(4)
    for i, ep in enumerate((2, 4)):
        _check([r[i] for r in runs], ref, 4, ep)


def _recompute_worker(rank: int, policies: tuple[str, ...]):
    """One forward/backward per recompute policy, each on a fresh model, in one spawned world."""
    from dsv3.memory.recompute import apply_recompute
    from dsv3.parallel.dispatch import comm_stats, shard_experts
    from dsv3.parallel.world import init_parallel

    ctx = init_parallel(dp=2, ep=2, n_routed_experts=_config().n_routed_experts)
    ids, labels = _batch(2, 0)
    rows = slice(rank * B_PER_RANK, (rank + 1) * B_PER_RANK)
    out = {}
    for policy in policies:
        model = apply_recompute(shard_experts(_model(), ctx, dispatcher="alltoall"), policy)
        res = model(ids[rows], labels[rows])
        res.loss.backward()
        out[policy] = (
            res.loss.item(),
            comm_stats(model).bytes_sent,
            {n: p.grad.clone() for n, p in model.named_parameters()},
        )
    return out


@pytest.mark.timeout(120)
def test_recomputation_under_ep_repeats_no_all_to_all_and_changes_no_gradient():
    runs = run_ranks(_recompute_worker, 2, ("none", "selective", "full"), timeout=110)
    base = [r["none"] for r in runs]
    for policy in ("selective", "full"):
        got = [r[policy] for r in runs]
        for (l0, b0, g0), (l1, b1, g1) in zip(base, got):
            assert l1 == l0 and b1 == b0  # the same bytes: no dispatch/combine replayed in backward
            for n in g0:
                torch.testing.assert_close(g1[n], g0[n], rtol=1e-6, atol=1e-7)
