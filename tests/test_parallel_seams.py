"""Model seams for parallelism: per-parameter init, the local dispatcher, per-forward routing statistics."""

from __future__ import annotations

import torch
from helpers import small_config

from dsv3.model import DeepseekV3ForCausalLM, Experts, LocalDispatcher, MoE, RoutingStats


def test_init_is_reproducible_per_parameter_and_per_expert_block():
    config = small_config(num_hidden_layers=3)
    full = DeepseekV3ForCausalLM(config)
    full.reset_parameters(seed=7)
    # a model with another number of layers: the layers both have get the same values (names decide)
    deeper = DeepseekV3ForCausalLM(config.replace(num_hidden_layers=4))
    deeper.reset_parameters(seed=7)
    deeper_params = dict(deeper.named_parameters())
    for name, p in full.named_parameters():
        if name.startswith("model.layers.") or name.startswith("model.embed"):
            assert torch.equal(p, deeper_params[name]), name
    # a rank that holds experts [2, 6) only
    shard = DeepseekV3ForCausalLM(config)
    for moe in shard.moe_layers():
        moe.experts = Experts(4, config.hidden_size, config.moe_intermediate_size, expert_offset=2)
    shard.reset_parameters(seed=7)
    for m_full, m_shard in zip(full.moe_layers(), shard.moe_layers()):
        assert torch.equal(m_shard.experts.gate_up_proj, m_full.experts.gate_up_proj[2:6])
        assert torch.equal(m_shard.experts.down_proj, m_full.experts.down_proj[2:6])
    other = DeepseekV3ForCausalLM(config)
    other.reset_parameters(seed=8)
    assert not torch.equal(other.lm_head.weight, full.lm_head.weight)
    w = full.lm_head.weight
    assert abs(w.std().item() - config.initializer_range) < 0.1 * config.initializer_range


def test_torch_manual_seed_still_decides_the_default_init():
    config = small_config()
    torch.manual_seed(3)
    a = DeepseekV3ForCausalLM(config)
    torch.manual_seed(3)
    b = DeepseekV3ForCausalLM(config)
    c = DeepseekV3ForCausalLM(config)
    assert a.init_seed == b.init_seed != c.init_seed
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_local_dispatcher_matches_a_per_expert_loop_in_float64():
    gen = torch.Generator().manual_seed(0)
    N, K, E, d = 13, 3, 6, 5
    x = torch.randn(N, d, dtype=torch.float64, generator=gen)
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(N)])
    w = torch.rand(N, K, dtype=torch.float64, generator=gen)
    mats = torch.randn(E, d, d, dtype=torch.float64, generator=gen)
    disp = LocalDispatcher(E)
    recv, counts, handle = disp.dispatch(x, idx, w)
    assert counts.tolist() == [int((idx == e).sum()) for e in range(E)]
    offs = counts.cumsum(0)
    y = torch.empty_like(recv)
    start = 0
    for e in range(E):
        y[start : offs[e]] = recv[start : offs[e]] @ mats[e].T * handle.recv_weights[start : offs[e]]
        start = int(offs[e])
    out = disp.combine(y, handle)
    ref = torch.zeros_like(x)
    for t in range(N):
        for k in range(K):
            ref[t] += w[t, k] * (mats[idx[t, k]] @ x[t])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_moe_records_loads_and_balance_loss_per_forward_not_on_the_module():
    config = small_config()
    moe = MoE(config, layer_idx=5).train()
    x = torch.randn(2, 7, config.hidden_size)
    first, second = RoutingStats(alpha=0.01), RoutingStats(alpha=0.01)
    moe(x, first)
    moe(x[:1], second)  # a second micro-batch in flight does not overwrite the first's numbers
    assert first.load[5].sum() == 2 * 7 * config.num_experts_per_tok
    assert second.load[5].sum() == 7 * config.num_experts_per_tok
    assert first.balance[5].requires_grad
    assert not hasattr(moe, "last_load") and not hasattr(moe, "last_balance_loss")
