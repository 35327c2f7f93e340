"""ZeRO-1: sharded AdamW state gives exactly the unsharded AdamW's parameters; state balanced by elements."""

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


@pytest.mark.timeout(90)
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
    # each rank holds half of the state (FP32 master + two moments per element), up to one row per tensor
    per_elem = 4 + 2 * (4 if moments == "fp32" else 2)
    total = results[0][3]
    for _, _, state, _ in results:
        assert abs(state - per_elem * total / 2) <= 0.02 * per_elem * total


def test_row_bounds_are_balanced_and_cover_every_row():
    from dsv3.parallel.zero import row_bounds

    for rows in (1, 5, 64, 129):
        for n in (1, 2, 3, 8):
            b = row_bounds(rows, n)
            assert b[0][0] == 0 and b[-1][1] == rows and all(b[i][1] == b[i + 1][0] for i in range(n - 1))
            sizes = [e - s for s, e in b]
            assert max(sizes) - min(sizes) <= 1
