"""Parameter counts of the planner against hand formulas and the published DeepSeek-V3 numbers."""

from dsv3.config import load_preset
from dsv3.plan.params import count_params

# DeepSeek-V3 dimensions (config.json of deepseek-ai/DeepSeek-V3).
D, V, H, L, DENSE = 7168, 129280, 128, 61, 3
QL, KVL, NOPE, ROPE, VH = 1536, 512, 128, 64, 128
FFN, NR, NS, K, IE = 18432, 256, 1, 8, 2048


def test_deepseek_v3_totals_match_the_published_counts():
    p = count_params(load_preset("deepseek-v3"))
    assert p.total == 671_026_404_352  # main model, no routing biases, no MTP
    assert p.routing_bias == 58 * 256
    assert p.total_with_bias == 671_026_419_200
    # activated: everything but the N_r - K_r routed experts a token skips, in 58 MoE layers
    skipped = (L - DENSE) * (NR - K) * 3 * D * IE
    assert p.activated == p.total - skipped
    assert 37.0e9 < p.activated < 38.0e9


def test_deepseek_v3_components_by_hand():
    c = count_params(load_preset("deepseek-v3")).components()
    assert c["embedding"] == V * D
    assert c["output_head"] == V * D
    assert c["attn.q_a_proj"] == L * QL * D
    assert c["attn.q_b_proj"] == L * H * (NOPE + ROPE) * QL
    assert c["attn.kv_a_proj_with_mqa"] == L * (KVL + ROPE) * D
    assert c["attn.kv_b_proj"] == L * H * (NOPE + VH) * KVL
    assert c["attn.o_proj"] == L * D * H * VH
    assert c["dense_mlp"] == DENSE * 3 * D * FFN
    assert c["router"] == (L - DENSE) * NR * D
    assert c["shared_experts"] == (L - DENSE) * NS * 3 * D * IE
    assert c["routed_experts"] == (L - DENSE) * NR * 3 * D * IE
    assert c["norms"] == L * (2 * D + QL + KVL) + D
    assert sum(c.values()) == 671_026_404_352


def test_deepseek_v3_mtp_module_shares_embedding_and_head():
    p = count_params(load_preset("deepseek-v3"))
    layer = (
        QL * D
        + QL
        + H * (NOPE + ROPE) * QL
        + (KVL + ROPE) * D
        + KVL
        + H * (NOPE + VH) * KVL
        + D * H * VH
        + 2 * D
        + NR * D
        + NS * 3 * D * IE
        + NR * 3 * D * IE
    )
    assert p.mtp_total == 2 * D + 2 * D * D + layer + D  # enorm, hnorm, eh_proj, layer, shared_head.norm
    assert p.mtp_routing_bias == NR
    assert "embedding" not in p.components(p.mtp_tensors)
    assert "output_head" not in p.components(p.mtp_tensors)


def test_v2_lite_uses_a_plain_query_projection_and_no_routing_bias():
    cfg = load_preset("deepseek-v2-lite")
    p = count_params(cfg)
    c = p.components()
    assert "attn.q_a_proj" not in c and "attn.q_b_proj" not in c
    assert c["attn.q_proj"] == 27 * 2048 * 16 * 192
    assert p.routing_bias == 0  # greedy softmax routing has no aux-loss-free bias
    assert p.mtp_total == 0


def test_tiny_components_add_up_and_state_dict_names_are_hf():
    p = count_params(load_preset("tiny"))
    assert sum(p.components().values()) == p.total
    names = {t.name for t in p.main_tensors}
    assert "model.layers.1.mlp.experts.gate_up_proj" in names
    assert "model.layers.0.mlp.gate_proj.weight" in names
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in names
    assert {t.name for t in p.mtp_tensors} >= {"mtp.0.eh_proj.weight", "mtp.0.layer.self_attn.kv_b_proj.weight"}
