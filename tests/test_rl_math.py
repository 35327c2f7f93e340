"""GRPO math against an independent float64 transcription of the DeepSeekMath objective (loops, math module)."""

import math
import statistics

import pytest
import torch

from dsv3.errors import ConfigError
from dsv3.train.rl import group_advantages, grpo_loss, grpo_stats, token_entropy, token_logps

EPS_LOW, EPS_HIGH, L_MAX = 0.2, 0.28, 9


# ----------------------------------------------------------------------------- the reference (plain Python floats)
def ref_advantages(rewards, G, scale="group", eps=1e-4):
    out = []
    batch_std = statistics.stdev(rewards)
    for g in range(0, len(rewards), G):
        group = rewards[g : g + G]
        mu = statistics.fmean(group)
        sd = {"group": statistics.stdev(group), "batch": batch_std, "none": None}[scale]
        out += [(r - mu) if sd is None else (r - mu) / (sd + eps) for r in group]
    return out


def ref_loss_and_grad(lp, old, ref, adv, mask, beta, loss_type, num_items=None):
    """DeepSeekMath eq. 3 per token, aggregated as TRL's loss types; the gradient by hand (d/d logp)."""
    B, T = len(lp), len(lp[0])
    n_row = [sum(row) for row in mask]
    n_all = sum(n_row)
    loss, grad = 0.0, [[0.0] * T for _ in range(B)]
    for i in range(B):
        for t in range(T):
            if not mask[i][t]:
                continue
            rho = math.exp(lp[i][t] - (lp[i][t] if old is None else old[i][t]))
            A = adv[i]
            unclipped, clipped = rho * A, min(max(rho, 1 - EPS_LOW), 1 + EPS_HIGH) * A
            l_it = -min(unclipped, clipped)
            g_it = -A * rho if unclipped <= clipped else 0.0
            if beta:
                d = ref[i][t] - lp[i][t]
                l_it += beta * (math.exp(d) - d - 1)
                g_it += beta * (1 - math.exp(d))
            w = {
                "grpo": 1 / (B * max(n_row[i], 1)),
                "bnpo": 1 / max(n_all, 1),
                "dr_grpo": 1 / (B * L_MAX),
                "dapo": 1 / (num_items if num_items is not None else max(n_all, 1)),
            }[loss_type]
            loss += w * l_it
            grad[i][t] = w * g_it
    return loss, grad


# ----------------------------------------------------------------------------- fixtures
def _batch(seed=0, B=6, T=7):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = lp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)  # ratios well outside [0.8, 1.28]
    ref = lp + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) > 0.3).to(torch.float64)
    mask[1] = 0  # a fully masked row
    mask[2, 3] = 0  # a hole inside a completion
    mask[2, 4] = 1
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 0.75], dtype=torch.float64)[:B]
    return lp, old, ref, mask, rewards


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_group_advantages_match_reference(scale, dtype):
    rewards = [0.0, 1.0, 1.0, 0.25, 3.0, 3.0, 3.0, 3.0, -1.0, 2.0, 0.5, 0.0]
    got = group_advantages(torch.tensor(rewards, dtype=dtype), 4, scale=scale)
    want = ref_advantages([float(torch.tensor(r, dtype=dtype)) for r in rewards], 4, scale)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64), atol=tol, rtol=tol)
    if scale == "group":
        assert torch.all(got[4:8] == 0)  # a group that teaches nothing


def test_group_advantages_bad_input():
    with pytest.raises(ConfigError, match="G >= 2"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ConfigError, match="groups of 3"):
        group_advantages(torch.zeros(4), 3)
    with pytest.raises(ConfigError, match="reward scale"):
        group_advantages(torch.zeros(4), 2, scale="global")


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("off_policy", [False, True])
def test_grpo_loss_value_and_grad_match_reference(loss_type, beta, off_policy):
    lp, old, ref, mask, rewards = _batch()
    adv = group_advantages(rewards, 3)
    lp = lp.clone().requires_grad_(True)
    loss = grpo_loss(
        lp,
        old if off_policy else None,
        ref if beta else None,
        adv,
        mask.bool(),
        beta=beta,
        epsilon_low=EPS_LOW,
        epsilon_high=EPS_HIGH,
        loss_type=loss_type,
        max_completion_length=L_MAX,
    )
    loss.backward()
    want, want_grad = ref_loss_and_grad(
        lp.tolist(), old.tolist() if off_policy else None, ref.tolist(), adv.tolist(), mask.tolist(), beta, loss_type
    )
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(want, rel=1e-12, abs=1e-14)
    assert torch.allclose(lp.grad, torch.tensor(want_grad, dtype=torch.float64), rtol=1e-12, atol=1e-14)
    assert torch.all(lp.grad[1] == 0) and torch.all(lp.grad[mask == 0] == 0)
    if off_policy and not beta:  # the fixture's ratios do clip, so the clipped branch is exercised
        assert (lp.grad[mask.bool()] == 0).any()


def test_dapo_num_items_and_lower_precision():
    lp, old, ref, mask, rewards = _batch(seed=3)
    adv = group_advantages(rewards, 2)
    kw = dict(beta=0.04, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, max_completion_length=L_MAX)
    got = grpo_loss(lp, old, ref, adv, mask, loss_type="dapo", num_items=100.0, **kw)
    want, _ = ref_loss_and_grad(
        lp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), 0.04, "dapo", num_items=100.0
    )
    assert got.item() == pytest.approx(want, rel=1e-12)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        low = lp.to(dtype).requires_grad_(True)
        out = grpo_loss(low, old.to(dtype), ref.to(dtype), adv.to(dtype), mask, loss_type="grpo", **kw)
        out.backward()
        want, _ = ref_loss_and_grad(
            low.double().tolist(),
            old.to(dtype).double().tolist(),
            ref.to(dtype).double().tolist(),
            adv.to(dtype).double().tolist(),
            mask.tolist(),
            0.04,
            "grpo",
        )
        assert out.dtype == torch.float32 and low.grad.dtype == dtype
        assert out.item() == pytest.approx(want, rel=tol, abs=tol)


def test_grpo_loss_bad_input():
    lp, old, ref, mask, rewards = _batch()
    kw = dict(epsilon_low=0.2, epsilon_high=0.2, max_completion_length=L_MAX)
    with pytest.raises(ConfigError, match="reference"):
        grpo_loss(lp, None, None, rewards, mask, beta=0.1, loss_type="grpo", **kw)
    with pytest.raises(ConfigError, match="loss type"):
        grpo_loss(lp, None, None, rewards, mask, beta=0.0, loss_type="ppo", **kw)
    with pytest.raises(ConfigError, match="mask"):
        grpo_loss(lp, None, None, rewards, mask[:, :3], beta=0.0, loss_type="grpo", **kw)


def test_grpo_stats_counts_clipped_tokens_and_kl():
    lp, old, ref, mask, rewards = _batch(seed=0)
    adv = group_advantages(rewards, 3)
    s = grpo_stats(lp, old, ref, adv, mask, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH)
    low = high = 0
    kl = 0.0
    for i in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            if mask[i, t]:
                rho = math.exp(lp[i, t] - old[i, t])
                low += rho < 1 - EPS_LOW and adv[i] < 0
                high += rho > 1 + EPS_HIGH and adv[i] > 0
                d = float(ref[i, t] - lp[i, t])
                kl += math.exp(d) - d - 1
    assert s["tokens"].item() == mask.sum().item()
    assert (s["clip_low"].item(), s["clip_high"].item(), s["clip_region"].item()) == (low, high, low + high)
    assert low > 0 and high > 0
    assert s["kl"].item() == pytest.approx(kl, rel=1e-5)
    on = grpo_stats(lp, None, None, adv, mask, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH)
    assert on["clip_region"].item() == 0 and on["kl"].item() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_token_logps_and_entropy_match_formula(dtype):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 3, 5, generator=g) * 3).to(dtype)
    targets = torch.randint(0, 5, (2, 3), generator=g)
    lp, ent = token_logps(logits, targets), token_entropy(logits)
    assert lp.dtype == ent.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for b in range(2):
        for t in range(3):
            z = [float(v) for v in logits[b, t]]
            lse = math.log(sum(math.exp(v) for v in z))
            assert lp[b, t].item() == pytest.approx(z[targets[b, t]] - lse, abs=1e-5)
            assert ent[b, t].item() == pytest.approx(-sum(math.exp(v - lse) * (v - lse) for v in z), abs=1e-5)
