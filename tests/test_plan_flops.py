"""FLOPs per token, MFU, GPU-hours and cost against hand formulas."""

import pytest

from dsv3.config import load_preset
from dsv3.errors import ConfigError
from dsv3.plan.cost import Hardware, budget, parse_count, throughput
from dsv3.plan.flops import model_flops, training_flops_per_token
from dsv3.plan.params import count_params

V3 = load_preset("deepseek-v3")
D, V, H, L = 7168, 129280, 128, 61


def _attention(s_ctx: float) -> float:
    return 2 * H * (128 + 64) * s_ctx + 2 * H * 128 * s_ctx  # q.k^T and p.v per token and layer


def test_deepseek_v3_training_flops_causal_and_non_causal():
    p = count_params(V3)
    norms = p.components()["norms"]
    gemm = p.activated - p.components()["embedding"] - norms  # every activated matrix but the lookup table
    s = 4096
    causal = 6 * gemm + 3 * L * _attention((s + 1) / 2)
    full = 6 * gemm + 3 * L * _attention(s)
    assert training_flops_per_token(V3, s, causal=True, mtp=False) == pytest.approx(causal, rel=1e-12)
    assert training_flops_per_token(V3, s, causal=False, mtp=False) == pytest.approx(full, rel=1e-12)
    assert 245e9 < causal < 255e9


def test_mtp_adds_its_layer_eh_proj_and_a_second_pass_through_the_head():
    p = count_params(V3)
    mtp_gemm = p.mtp_activated - p.components(p.mtp_tensors)["norms"]
    extra = 6 * (mtp_gemm + V * D) + 3 * _attention(4096.0)
    with_mtp = training_flops_per_token(V3, 4096, causal=False, mtp=True)
    assert with_mtp - training_flops_per_token(V3, 4096, causal=False, mtp=False) == pytest.approx(extra, rel=1e-12)


def test_recompute_adds_hardware_flops():
    mf = model_flops(V3, 4096)
    assert mf.recompute_extra("none") == 0
    assert mf.recompute_extra("full", mtp=False) == pytest.approx(sum(mf.layers))
    up = 2 * L * (1536 * H * 192 + 512 * H * 256)  # W^UQ and W^UK/W^UV GEMMs of every layer
    assert mf.recompute_extra("selective", mtp=False) == pytest.approx(up)


def test_mfu_gpu_hours_and_cost():
    hw = Hardware(peak_tflops=989.0)
    flops = 250e9
    t = throughput(flops, hw, tokens_per_s_per_gpu=1500.0)
    assert t.mfu == pytest.approx(1500 * 250e9 / 989e12)
    t2 = throughput(flops, hw, mfu=0.4)
    assert t2.tokens_per_s_per_gpu == pytest.approx(0.4 * 989e12 / 250e9)
    b = budget(14.8e12, 2048, t, price_per_gpu_hour=2.0)
    assert b["gpu_hours"] == pytest.approx(14.8e12 / 1500 / 3600)
    assert b["wall_clock_hours"] == pytest.approx(b["gpu_hours"] / 2048)
    assert b["cost"] == pytest.approx(2 * b["gpu_hours"])
    assert parse_count("14.8T", "--tokens") == pytest.approx(14.8e12)
    assert parse_count("2e12", "--tokens") == 2e12
    with pytest.raises(ConfigError):
        parse_count("lots", "--tokens")
    with pytest.raises(ConfigError):
        throughput(flops, hw, mfu=1.5)


@pytest.mark.parametrize("policy", ["selective", "full"])
def test_recompute_flops_are_what_the_backward_runs(policy):
    """The GEMM FLOPs the recompute policy adds, against torch's FLOP counter on the tiny model's backward.

    The counter sees the dense GEMMs (``aten.mm``), not the experts' grouped GEMM or the attention
    core, so the full policy is compared on those GEMMs: the MLA projections, router, dense and
    shared-expert projections of every layer and the MTP eh_proj (everything but the routed experts).
    """
    torch = pytest.importorskip("torch")
    from torch.utils.flop_counter import FlopCounterMode

    from dsv3.memory.recompute import apply_recompute
    from dsv3.model.transformer import DeepseekV3ForCausalLM

    cfg = load_preset("tiny")
    seq, batch = 32, 2

    def backward_mm_flops(pol: str) -> int:
        torch.manual_seed(0)
        model = apply_recompute(DeepseekV3ForCausalLM(cfg), pol)
        ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
        loss = model(ids[:, :-1], ids[:, 1:]).loss
        with FlopCounterMode(display=False) as counter:
            loss.backward()
        return counter.get_total_flops()

    extra = backward_mm_flops(policy) - backward_mm_flops("none")
    p = count_params(cfg)
    f = model_flops(cfg, seq, params=p)
    main, mtp = batch * seq, batch * (seq - 1)  # tokens through the main layers and the MTP module
    if policy == "selective":
        expected = main * sum(f.recompute_selective) + mtp * sum(f.mtp_recompute_selective)
    else:

        def dense_gemms(tensors):
            return 2.0 * sum(t.numel for t in tensors if t.is_matmul and t.component != "routed_experts")

        expected = main * sum(dense_gemms(t) for t in p.layers) + mtp * sum(dense_gemms(t) for t in p.mtp)
        # PyTorch stops recomputing once the last tensor the backward needs is rebuilt: the dense layer's
        # down_proj input is, so its GEMM (the layer's last op) is not re-run. The planner counts it
        # (2 I d per token of each dense layer: an upper bound, 0.2 % of DeepSeek-V3's executed FLOPs).
        expected -= main * 2 * cfg.intermediate_size * cfg.hidden_size * cfg.first_k_dense_replace
    assert extra == pytest.approx(expected, rel=1e-9)
