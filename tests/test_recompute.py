"""Recomputation policies: same results, fewer bytes; the activation measurements agree."""

from __future__ import annotations

import pytest
import torch
from helpers import small_config

from dsv3.errors import ConfigError
from dsv3.memory.measure import activation_bytes
from dsv3.memory.recompute import apply_recompute
from dsv3.model import DeepseekV3ForCausalLM


def _run(policy, config, ids):
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(config)
    apply_recompute(model, policy)
    live, saved = activation_bytes(model, ids, ids)  # forward + backward, measured
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    out = model(ids, ids)
    load = out.expert_load.clone()
    model.update_router_bias(load, 0.001)
    biases = [m.gate.e_score_correction_bias.clone() for m in model.moe_layers()]
    return live, saved, grads, load, biases, out.loss.detach()


@pytest.fixture(scope="module")
def runs():
    config = small_config(num_nextn_predict_layers=1)
    ids = torch.randint(0, config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(1))
    return {p: _run(p, config, ids) for p in ("none", "selective", "full")}


@pytest.mark.parametrize("policy", ["selective", "full"])
def test_recomputation_changes_no_result(runs, policy):
    _, _, g0, load0, b0, loss0 = runs["none"]
    _, _, g1, load1, b1, loss1 = runs[policy]
    assert torch.equal(loss0, loss1)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-6, atol=1e-7, msg=name)
    assert torch.equal(load0, load1)  # every token counted once, also with recomputation
    for a, b in zip(b0, b1):
        assert torch.equal(a, b)


def test_activation_bytes_fall_with_each_policy(runs):
    live = {p: runs[p][0] for p in runs}
    assert live["none"] > live["selective"] > live["full"]
    assert live["selective"] < 0.65 * live["none"]


def test_live_bytes_equal_saved_tensor_bytes_without_recomputation(runs):
    live, saved = runs["none"][0], runs["none"][1]
    assert abs(live - saved) < 0.01 * saved


def test_recompute_policy_is_reversible_and_checked():
    model = DeepseekV3ForCausalLM(small_config())
    apply_recompute(model, "full")
    assert all(type(layer.recompute).__name__ == "FullRecompute" for layer in model.model.layers)
    apply_recompute(model, "none")
    assert all(layer.recompute is None and "forward" not in layer.__dict__ for layer in model.model.layers)
    with pytest.raises(ConfigError, match="recompute policy"):
        apply_recompute(model, "some")


def test_recomputed_model_still_decodes_with_cache():
    config = small_config()
    model = DeepseekV3ForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, 12))
    with torch.no_grad():
        ref = model(ids).logits
    apply_recompute(model, "selective")
    cache = model.new_cache(1, 16)
    with torch.no_grad():
        out = model(ids, cache=cache).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_recomputation_with_fp8_changes_no_gradient():
    from dsv3.config import load_preset
    from dsv3.fp8 import FP8Recipe, convert

    config = load_preset("tiny").replace(num_hidden_layers=2)
    ids = torch.randint(0, config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    grads = {}
    for policy in ("none", "selective", "full"):
        torch.manual_seed(0)
        model = DeepseekV3ForCausalLM(config)
        convert(model, FP8Recipe(backend="emulated"))
        apply_recompute(model, policy)
        model(ids, ids).loss.backward()
        grads[policy] = [p.grad.clone() for p in model.parameters()]
    for policy in ("selective", "full"):
        assert all(torch.equal(a, b) for a, b in zip(grads["none"], grads[policy]))
