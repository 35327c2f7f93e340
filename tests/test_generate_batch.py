"""Batched generation with left padding, expert-load collection, and models with replicated experts."""

from __future__ import annotations

import pytest
import torch
from helpers import small_config, v2_config

from dsv3.errors import CheckpointError, ConfigError
from dsv3.infer.eplb import rebalance_experts
from dsv3.infer.generate import ExpertLoadCollector, generate, generate_batch, left_pad, token_probs
from dsv3.infer.replicate import ReplicatedRouter, apply_placement
from dsv3.model import DeepseekV3ForCausalLM


def _model(config, seed=0):
    torch.manual_seed(seed)
    return DeepseekV3ForCausalLM(config).double().eval()


PROMPTS = [[5, 9, 100, 7, 300, 2, 11], [42], [8, 8, 8, 260]]


@pytest.mark.parametrize("config", [small_config(), v2_config()], ids=["v3", "v2"])
def test_batched_greedy_equals_each_prompt_alone(config):
    model = _model(config)
    batched = generate_batch(model, PROMPTS, max_new_tokens=12, temperature=0)
    for prompt, got in zip(PROMPTS, batched):
        alone = generate(model, torch.tensor([prompt]), max_new_tokens=12, temperature=0)[0, len(prompt) :].tolist()
        assert got == alone


def test_padded_logits_equal_unpadded_logits():
    """Every real position's logits, prefill and decode, equal the prompt's own run (padding is masked).
    The rows sit at shifted absolute positions; RoPE depends only on position differences, so the only
    difference is the float32 rounding of the shifted cos/sin tables (~1e-7 relative)."""
    model = _model(small_config())
    ids, pad = left_pad(PROMPTS)
    assert pad.tolist() == [0, 6, 3] and ids[1, :6].eq(0).all()
    cache = model.new_cache(3, ids.shape[1] + 1)
    cache.set_padding(pad)
    with torch.no_grad():
        logits = model(ids, cache=cache, start_pos=0).logits
        nxt = torch.tensor([[3], [4], [5]])
        step = model(nxt, cache=cache, start_pos=ids.shape[1]).logits
        for b, prompt in enumerate(PROMPTS):
            alone = model(torch.tensor([prompt + [3 + b]])).logits[0]
            torch.testing.assert_close(logits[b, pad[b] :], alone[:-1], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(step[b, 0], alone[-1], atol=1e-6, rtol=1e-5)


def test_batched_eos_and_bad_prompts():
    model = _model(small_config())
    greedy = generate_batch(model, PROMPTS, max_new_tokens=8, temperature=0)
    eos = greedy[0][3]
    cut = generate_batch(model, PROMPTS, max_new_tokens=8, temperature=0, eos_id=eos)
    for full, got in zip(greedy, cut):
        assert got == (full[: full.index(eos)] if eos in full else full)
    with pytest.raises(ConfigError, match="at least one token"):
        generate_batch(model, [[1], []], max_new_tokens=2)


def test_expert_loads_count_real_tokens_only():
    model = _model(small_config())
    n_moe = len(model.moe_layers())
    with ExpertLoadCollector(model) as loads:
        generate_batch(model, PROMPTS, max_new_tokens=5, temperature=0, loads=loads)
    k = model.config.num_experts_per_tok
    real = sum(len(p) for p in PROMPTS) + 3 * 4  # prompts, then 4 single-token decode steps for 3 rows
    # main layers each route every real token to K experts; the MTP module is not run by plain decoding
    assert loads.load.shape == (n_moe, model.config.n_routed_experts)
    main = model.config.num_hidden_layers - model.config.first_k_dense_replace
    assert loads.load[:main].sum(-1).tolist() == [real * k] * main
    assert loads.load[main:].sum().item() == 0
    # the hooks are gone after the block
    before = loads.load.clone()
    generate(model, torch.tensor([[1, 2]]), max_new_tokens=2, temperature=0)
    assert torch.equal(loads.load, before)


def test_non_finite_logits_raise_a_checkpoint_error():
    model = _model(small_config())
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[0, 0, 0] = float("nan")
        model.model.layers[1].mlp.experts.down_proj[:, 0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="non-finite logits"):
        generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=3, temperature=0)


@pytest.mark.parametrize(
    "bad",
    [
        dict(max_new_tokens=10**12),
        dict(max_new_tokens=0),
        dict(max_new_tokens=2, temperature=float("nan")),
        dict(max_new_tokens=2, temperature=-0.5),
        dict(max_new_tokens=2, top_p=1.5),
    ],
)
def test_generation_length_is_checked_before_allocating(bad):
    model = _model(small_config())
    with pytest.raises(ConfigError):
        generate(model, torch.tensor([[1, 2, 3]]), **{"temperature": 0, **bad})


def test_token_probs_top_p_against_a_hand_computed_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = token_probs(logits, temperature=1.0, top_p=0.7)
    torch.testing.assert_close(p, torch.tensor([[0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]]))
    p = token_probs(logits, temperature=0.5, top_p=1.0)
    ref = torch.tensor([0.5, 0.3, 0.15, 0.05]) ** 2
    torch.testing.assert_close(p[0], ref / ref.sum())


# ----------------------------------------------------------------------------- replicated experts
@pytest.mark.parametrize("config", [small_config(), v2_config()], ids=["v3", "v2"])
def test_replicated_model_logits_equal_the_original(config):
    model = _model(config)
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        n_moe, n_exp = len(model.moe_layers()), config.n_routed_experts
        load = torch.rand(n_moe, n_exp, generator=torch.Generator().manual_seed(1)) ** 3 * 100
        phy2log, log2phy, logcnt = rebalance_experts(load, n_exp + 4, 4 if config.n_group > 1 else 1, 2, 4)
        apply_placement(model, phy2log, log2phy, logcnt)
        assert all(
            isinstance(m.gate, ReplicatedRouter) and m.experts.gate_up_proj.shape[0] == n_exp + 4
            for m in model.moe_layers()
        )
        out = model(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
    # generation works on the replicated model and gives the same greedy tokens
    assert torch.equal(
        generate(model, ids[:1, :4], max_new_tokens=6, temperature=0),
        generate(_model(config), ids[:1, :4], max_new_tokens=6, temperature=0),
    )


def test_replicas_share_their_expert_tokens_evenly():
    model = _model(small_config())
    moe = model.moe_layers()[0]
    n_exp = model.config.n_routed_experts
    # expert 0 gets 3 replicas, expert 1 gets 2, the rest one each
    phy2log = torch.tensor([list(range(n_exp)) + [0, 0, 1]])
    logcnt = torch.ones(1, n_exp, dtype=torch.long)
    logcnt[0, 0], logcnt[0, 1] = 3, 2
    log2phy = torch.full((1, n_exp, 3), -1, dtype=torch.long)
    log2phy[0, :, 0] = torch.arange(n_exp)
    log2phy[0, 0, 1:] = torch.tensor([n_exp, n_exp + 1])
    log2phy[0, 1, 1] = n_exp + 2
    router = ReplicatedRouter(moe.gate, log2phy[0], logcnt[0])
    assert router.n_experts == n_exp + 3 and router.top_k == moe.gate.top_k
    assert router.e_score_correction_bias is moe.gate.e_score_correction_bias
    x = torch.randn(50, model.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        w_ref, idx_ref, s_ref = moe.gate(x)
        w, phys, s = router(x)
    assert torch.equal(w, w_ref) and torch.equal(s, s_ref)
    assert torch.equal(phy2log[0][phys], idx_ref)  # every pair goes to a replica of its own expert
    per_slot = torch.bincount(phys.reshape(-1), minlength=n_exp + 3)
    for expert, slots in ((0, [0, n_exp, n_exp + 1]), (1, [1, n_exp + 2])):
        counts = per_slot[slots]
        assert int(counts.sum()) == int((idx_ref == expert).sum()) and int(counts.max() - counts.min()) <= 1


def test_apply_placement_refuses_a_mismatched_placement():
    model = _model(small_config())
    p2l, l2p, cnt = rebalance_experts(torch.ones(5, 8), 12, 1, 1, 4)  # 5 layers, the model has 3 MoE layers
    with pytest.raises(ConfigError, match="layers"):
        apply_placement(model, p2l, l2p, cnt)


def test_a_placement_with_mtp_layers_applies_to_the_model_without_them():
    model = _model(small_config())
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    load = torch.arange(1.0, 25.0).view(3, 8)  # 2 main MoE layers + the MTP module's
    placement = rebalance_experts(load, 12, 4, 2, 4)
    model.drop_mtp()
    with torch.no_grad():
        ref = model(ids).logits
        apply_placement(model, *placement)
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-10, rtol=1e-9)
    assert [m.experts.gate_up_proj.shape[0] for m in model.moe_layers()] == [12, 12]


def test_expert_loads_leave_out_finished_rows():
    model = _model(small_config())
    greedy = generate_batch(model, PROMPTS, max_new_tokens=5, temperature=0)
    eos = greedy[1][1]  # row 1 finishes at its 2nd new token
    with ExpertLoadCollector(model) as loads:
        generate_batch(model, PROMPTS, max_new_tokens=5, temperature=0, eos_id=eos, loads=loads)
    first_eos = [row.index(eos) if eos in row else 99 for row in greedy]
    # decode forward s (s = 0..3) feeds new token s of each row still running after it
    decoded = sum(1 for b in range(3) for s in range(4) if first_eos[b] > s)
    k = model.config.num_experts_per_tok
    assert loads.load[0].sum().item() == (sum(len(p) for p in PROMPTS) + decoded) * k
