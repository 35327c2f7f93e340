"""ZeRO-1: sharded AdamW state gives exactly the unsharded AdamW's parameters; state balanced by elements (rows of
the last-dim view, experts cut inside), FP32 parameters are their own masters; the state survives DCP resharding."""

from __future__ import annotations

import pytest
import torch
from dist_helpers import run_ranks
from helpers import small_config


def _grads(model, rank: int, step: int):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}


def _model():
    from dsv3.model import DeepseekV3ForCausalLM

    model = DeepseekV3ForCausalLM(small_config())
    model.reset_parameters(seed=11)
    return model


def _zero_worker(rank: int, steps: int):
    """Both moment formats in one spawned world (one process start for both checks)."""
    from dsv3.parallel.world import init_parallel
    from dsv3.parallel.zero import ZeroAdamW

    ctx = init_parallel(dp=2, ep=1)
    out = {}
    for moments in ("fp32", "bf16"):
        model = _model()
        opt = ZeroAdamW(model, ctx, lr=1e-2, weight_decay=0.1, moments_dtype=moments)
        opt.inner._compiled_ok = False  # BF16 moments: the eager path (compiling takes minutes on 2 busy cores)
        norms = []
        for step in range(steps):
            grads = _grads(model, rank, step)
            for n, p in model.named_parameters():
                p.grad = grads[n]
            norms.append(float(opt.step(max_norm=None)))
            opt.zero_grad()
        total = sum(p.numel() for p in model.parameters())
        out[moments] = ({n: p.detach().clone() for n, p in model.named_parameters()}, norms, opt.state_bytes(), total)
    return out


@pytest.fixture(scope="module")
def zero_runs():
    return run_ranks(_zero_worker, 2, 3, timeout=80)


@pytest.mark.timeout(150)  # run_ranks allows 80 s, then joins and kills: its own error comes first
@pytest.mark.parametrize("moments", ["fp32", "bf16"])
def test_zero1_equals_unsharded_adamw_exactly(moments, zero_runs):
    from dsv3.optim import build_optimizer

    results = [r[moments] for r in zero_runs]
    ref = _model()
    opt = build_optimizer(ref, lr=1e-2, weight_decay=0.1, moments_dtype=moments)
    opt._compiled_ok = False
    norms = []
    for step in range(3):
        g0, g1 = _grads(ref, 0, step), _grads(ref, 1, step)
        for n, p in ref.named_parameters():
            p.grad = (g0[n] + g1[n]) / 2
        norms.append(torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1).double() for p in ref.parameters()])))
        opt.step()
        opt.zero_grad()
    for params, got_norms, _, _ in results:
        for n, p in ref.named_parameters():
            assert torch.equal(params[n], p.detach()), n
        torch.testing.assert_close(torch.tensor(got_norms, dtype=torch.float64), torch.stack(norms), rtol=1e-6, atol=0)
    # each rank holds half of the state, up to one row (last dim) per tensor: the FP32 parameters are their own
    # masters, so only the two moments per element
    from dsv3.parallel.zero import rows_shape

    per_elem = 2 * (4 if moments == "fp32" else 2)
    total = results[0][3]
    one_row_each = sum(rows_shape(p.shape)[1] for p in ref.parameters()) * per_elem
    for _, _, state, _ in results:
        assert abs(state - per_elem * total / 2) <= one_row_each / 2
    assert results[0][2] + results[1][2] == per_elem * total


def test_row_bounds_are_balanced_and_cover_every_row():
    from dsv3.parallel.zero import row_bounds

    for rows in (1, 5, 64, 129):
        for n in (1, 2, 3, 8):
            b = row_bounds(rows, n)
            assert b[0][0] == 0 and b[-1][1] == rows and all(b[i][1] == b[i + 1][0] for i in range(n - 1))
            sizes = [e - s for s, e in b]
            assert max(sizes) - min(sizes) <= 1


def _rank_optimizer(cfg, dtype, dp, ep, rank, moments="fp32"):
    """ZeroAdamW of ``rank`` of a dp x ep layout, built with that rank's context (world_size 1: no
    collectives, the state does not depend on them), after one step."""
    from dsv3.model import DeepseekV3ForCausalLM
    from dsv3.parallel.dispatch import shard_experts
    from dsv3.parallel.world import ParallelContext
    from dsv3.parallel.zero import ZeroAdamW

    model = DeepseekV3ForCausalLM(cfg)
    model.reset_parameters(seed=5)
    model.to(dtype)
    ctx = ParallelContext(rank=rank, world_size=1, dp=dp, ep=ep)
    if ep > 1:
        shard_experts(model, ctx, dispatcher="alltoall")
    opt = ZeroAdamW(model, ctx, lr=1e-2, moments_dtype=moments)
    opt.inner._compiled_ok = False
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step(1.0)
    return model, opt


def _moment_bytes(opt, shards):
    return sum(
        v.numel() * v.element_size()
        for s in shards
        if s.master is not None
        for v in opt.inner.state[s.master].values()
        if isinstance(v, torch.Tensor)
    )


@pytest.mark.parametrize("dp", [4, 8])
def test_expert_state_is_balanced_by_elements_not_whole_experts(dp):
    """6 routed experts at EP 2: 3 local experts per rank, over EDP 2 (dp 4) or EDP 4 > 3 (dp 8). Cut as
    [3 * 2I, d] rows, the edp replicas' expert state differs by at most one row (last dim) per tensor (whole
    experts would give one replica twice the other's, or nothing); together they hold each element once."""
    from dsv3.parallel.zero import rows_shape

    cfg = small_config(n_routed_experts=6, n_group=2, topk_group=1)
    ep, edp = 2, dp // 2
    per_rank, widths, local = [], 0, 0
    for edp_rank in range(edp):
        _, opt = _rank_optimizer(cfg, torch.float32, dp, ep, rank=edp_rank * ep)  # ep index 0
        experts = [s for s in opt.shards if s.expert]
        assert len(experts) == 2 * (cfg.num_hidden_layers - cfg.first_k_dense_replace + 1)  # + the MTP layer
        widths = sum(rows_shape(s.param.shape)[1] for s in experts) * 8  # FP32 moments, one row each
        local = sum(s.param.numel() for s in experts) * 8
        one_expert = sum(s.param[0].numel() for s in experts) * 8
        assert all(s.param.shape[0] == 3 for s in experts)
        per_rank.append(_moment_bytes(opt, experts))
    assert min(per_rank) > 0
    assert max(per_rank) - min(per_rank) <= widths < one_expert
    assert sum(per_rank) == local
    assert abs(max(per_rank) - local / edp) <= widths


def test_fp32_parameters_hold_no_master_copy():
    """FP32 parameters: the master chunk is a view of the parameter's own rows (same storage), the state is the
    moments alone; BF16 parameters keep a separate FP32 master. Bytes against the element count (a formula)."""
    cfg = small_config()
    for dtype, master_bytes in ((torch.float32, 0), (torch.bfloat16, 4)):
        total = 0
        for rank in range(2):
            model, opt = _rank_optimizer(cfg, dtype, 2, 1, rank, moments="bf16")
            for s in opt.shards:
                if s.master is None:
                    continue
                assert s.master.dtype == torch.float32
                shares = s.master.untyped_storage().data_ptr() == s.param.untyped_storage().data_ptr()
                assert shares == (dtype == torch.float32), s.name
                assert s.own_master == (dtype == torch.float32)
            total += opt.state_bytes()
        n = sum(p.numel() for p in model.parameters())
        assert total == n * (2 * 2 + master_bytes), dtype


def test_rows_shape_is_the_last_dim_view():
    from dsv3.parallel.zero import rows_shape

    assert rows_shape(()) == (1, 1)
    assert rows_shape((7,)) == (7, 1)
    assert rows_shape((5, 3)) == (5, 3)
    assert rows_shape((3, 64, 32)) == (192, 32)
    assert rows_shape((2, 3, 4, 5)) == (24, 5)


# ------------------------------------------------------------------ the state through a DCP checkpoint
def _three_expert_model():
    """3 routed experts: at EDP 2 the [3 * 2I, d] rows are cut inside an expert (1.5 experts a rank)."""
    from dsv3.model import DeepseekV3ForCausalLM

    model = DeepseekV3ForCausalLM(small_config(n_routed_experts=3, n_group=1, topk_group=1))
    model.reset_parameters(seed=11)
    return model


def _save_two_steps(rank: int, run_dir: str):
    """dp = 2, ep = 1 (experts over EDP 2): two ZeRO-1 steps on FP32 parameters, then a sharded checkpoint."""
    from dsv3.parallel.checkpoint import save_sharded
    from dsv3.parallel.world import init_parallel
    from dsv3.parallel.zero import ZeroAdamW

    ctx = init_parallel(dp=2, ep=1)
    model = _three_expert_model()
    opt = ZeroAdamW(model, ctx, lr=1e-2, weight_decay=0.1, moments_dtype="fp32")
    for step in range(2):
        grads = _grads(model, rank, step)
        for n, p in model.named_parameters():
            p.grad = grads[n]
        opt.step(max_norm=None)
        opt.zero_grad()
    save_sharded(run_dir, 2, model=model, optimizer=opt, ctx=ctx)
    return True


@pytest.mark.timeout(150)  # run_ranks allows 80 s, then joins and kills: its own error comes first
def test_checkpointed_state_reshards_into_other_layouts_exactly(tmp_path):
    """Saved by 2 ranks (dp 2: dense and expert rows cut in two, inside an expert), loaded by one process, by
    each rank of dp 3 (other cuts) and of dp 3 x ep 3 (one expert a rank): every chunk's master (the parameter's
    own rows), exp_avg and exp_avg_sq equal those of unsharded AdamW run on the mean gradients, exactly."""
    from dsv3.model import Experts
    from dsv3.optim import build_optimizer
    from dsv3.parallel.checkpoint import latest_sharded, load_sharded
    from dsv3.parallel.dispatch import shard_experts
    from dsv3.parallel.world import ParallelContext
    from dsv3.parallel.zero import ZeroAdamW, rows_shape

    run_dir = str(tmp_path)
    assert run_ranks(_save_two_steps, 2, run_dir, timeout=80) == [True, True]
    ref = _three_expert_model()
    opt = build_optimizer(ref, lr=1e-2, weight_decay=0.1, moments_dtype="fp32")
    for step in range(2):
        g0, g1 = _grads(ref, 0, step), _grads(ref, 1, step)
        for n, p in ref.named_parameters():
            p.grad = (g0[n] + g1[n]) / 2
        opt.step()
        opt.zero_grad()
    want = {
        n: {"master": p.detach(), **{k: opt.state[p][k] for k in ("exp_avg", "exp_avg_sq")}}
        for n, p in ref.named_parameters()
    }
    checked = 0
    for dp, ep in ((1, 1), (3, 1), (3, 3)):
        for rank in range(dp):
            ctx = ParallelContext(rank=rank, world_size=1, dp=dp, ep=ep)  # no collectives on load
            model = _three_expert_model()
            if ep > 1:
                shard_experts(model, ctx, dispatcher="alltoall")
            zero = ZeroAdamW(model, ctx, lr=1e-2, weight_decay=0.1, moments_dtype="fp32")
            load_sharded(latest_sharded(run_dir), model=model, optimizer=zero, ctx=ctx)
            offsets = {
                f"{m}.{leaf}": mod.expert_offset
                for m, mod in model.named_modules()
                if isinstance(mod, Experts)
                for leaf, _ in mod.named_parameters()
            }
            for s in zero.shards:
                if s.master is None:
                    continue
                assert s.own_master
                start, end = s.bounds[ctx.edp_rank if s.expert else ctx.dp_rank]
                st = zero.inner.state[s.master]
                assert st["step"] == 2
                for kind, got in (("master", s.master), ("exp_avg", st["exp_avg"]), ("exp_avg_sq", st["exp_avg_sq"])):
                    full = want[s.name][kind]
                    if s.expert:
                        full = full[offsets[s.name] : offsets[s.name] + s.param.shape[0]]
                    assert torch.equal(got, full.reshape(rows_shape(s.param.shape))[start:end]), (dp, ep, rank, s.name)
                    checked += 1
    assert checked > 0
