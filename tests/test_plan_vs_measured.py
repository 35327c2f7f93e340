"""The planner against what the real model and optimizer allocate (bench/plan_vs_measured.py, tiny preset).

Weights, gradients and optimizer states must be equal to the byte. Activations: the planner's bytes per
micro-batch against the storages a forward leaves alive for backward (``live``, which includes what
recomputation keeps) and, without recomputation, against the storages autograd saves
(``saved_tensors_hooks``, each storage once). The issue asks for 10 %; the itemised table matches the
implementation to the byte on these runs (balanced-enough routing), so the bound here is 2 %, tight enough
to catch an operator that starts (or stops) keeping a tensor.
"""

import importlib.util
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

_BENCH = Path(__file__).resolve().parents[1] / "bench" / "plan_vs_measured.py"
_spec = importlib.util.spec_from_file_location("plan_vs_measured", _BENCH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

TOLERANCE = 0.02


def _check(r):
    for item in ("weights", "grads", "optimizer"):
        assert r["planned"][item] == r["measured"][item], item
    assert r["ratio"]["activations"] == pytest.approx(1.0, abs=TOLERANCE)
    if r["recompute"] == "none":
        assert r["ratio"]["saved_tensors"] == pytest.approx(1.0, abs=TOLERANCE)
    assert bench.row_ok(r)


@pytest.mark.parametrize("policy", ["none", "selective", "full"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_planner_matches_the_tiny_model(dtype, policy):
    _check(bench.measure("tiny", seq_len=64, micro_batch=2, dtype=dtype, moments=dtype, recompute=policy))


@pytest.mark.parametrize("policy", ["none", "selective", "full"])
def test_planner_matches_the_fp8_recipe(policy):
    # 100 x 3 tokens: the FP8 token tiles are padded (300 -> 384 rows) and MTP runs on 297 tokens.
    _check(bench.measure("tiny", seq_len=100, micro_batch=3, dtype="bf16", moments="bf16", recompute=policy,
                         fp8="storage"))


@pytest.mark.parametrize("dtype,policy", [("fp32", "none"), ("bf16", "selective")])
def test_planner_matches_a_v2_style_model(dtype, policy):
    """DeepSeek-V2-Lite's structure, shrunk: no query compression (q_proj), softmax gating without
    normalised top-k weights, two shared experts, no MTP."""
    from dsv3.config import load_preset

    cfg = load_preset("deepseek-v2-lite").replace(
        hidden_size=128, num_hidden_layers=3, vocab_size=1024, intermediate_size=256, moe_intermediate_size=64,
        n_routed_experts=8, num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        bos_token_id=0, eos_token_id=1)  # V2-Lite's ids (100000, 100001) lie beyond the smaller vocabulary
    assert cfg.q_lora_rank is None and cfg.scoring_func == "softmax" and not cfg.norm_topk_prob
    _check(bench.measure(cfg, seq_len=64, micro_batch=2, dtype=dtype, moments=dtype, recompute=policy))


def test_saved_tensor_hooks_do_not_see_inside_recomputed_regions():
    """Why recomputed runs are compared with the live bytes: the checkpoint packs the saved tensors of its
    region into nothing, so the hooks miss the region's cached GEMM outputs; the live count has them."""
    r = bench.measure("tiny", seq_len=64, micro_batch=2, recompute="selective")
    assert r["measured"]["saved_tensors"] < 0.8 * r["measured"]["activations"]
    none = bench.measure("tiny", seq_len=64, micro_batch=2, recompute="none")
    assert none["measured"]["saved_tensors"] == pytest.approx(none["measured"]["activations"], rel=1e-3)
    assert r["measured"]["activations"] < none["measured"]["activations"]
