"""`--tp-convention`: Megatron-style sharding (today's numbers) and Zhang & Su's accounting (arXiv 2502.07846).

The paper's reference layout is DeepSeek-V3 on PP16 TP2 EP8 ETP1 DP32 (EDP 8),
stages of 4 layers (4,...,4,1), BF16 weights (the router too), FP32
gradients, FP32 master weights and BF16 AdamW moments. Its Table 6 gives the
static parameters of one device of a middle stage (4 MoE layers) and its
Table 8 the weights, gradients and optimizer states under ZeRO 0/1/2/3. The
paper's numbers below are copied as printed; "GB" there is GiB (2^30 bytes).
"""

import json

import pytest
from helpers import assert_one_error, cli

from dsv3.cli import main
from dsv3.config import load_preset
from dsv3.plan.layout import Layout
from dsv3.plan.memory import stage_tensors
from dsv3.plan.params import count_params
from dsv3.plan.planner import make_plan
from dsv3.plan.precision import Precision
from dsv3.plan.states import device_numel

V3 = load_preset("deepseek-v3")
TINY = load_preset("tiny")
PAPER_PRECISION = Precision(router="bf16")  # everything BF16 in the paper, the gate included
PAPER_STAGES = (4,) * 15 + (1,)
GIB = 2**30

# Table 6 (static parameters per device, PP16@TP2@EP8@ETP1, one stage of 4 MoE layers).
TABLE6_RMSNORM = 65_536
TABLE6_MLA = 429_654_016
TABLE6_MOE = 5_820_645_376
TABLE6_TOTAL = 6_250_364_928
TABLE6_TOTAL_BYTES = 12_500_729_856
TABLE6_TOTAL_GB = 11.64
# Table 8: (static parameters, gradients, optimizer states, total) in GB, as printed, for ZeRO 0..3.
TABLE8 = {
    0: ("11.64", "23.3", "46.6", "81.54"),
    1: ("11.64", "23.3", "5.52", "40.46"),
    2: ("11.64", "2.76", "5.52", "19.92"),
    3: ("1.38", "2.76", "5.52", "9.66"),
}


def _paper_layout(zero: int, convention: str) -> Layout:
    return Layout(
        pp=16, tp=2, ep=8, etp=1, dp=32, zero=zero, mtp=False, stage_layers=PAPER_STAGES, tp_convention=convention
    )


def _stage1(zero: int, convention: str):
    plan = make_plan(V3, _paper_layout(zero, convention), PAPER_PRECISION, simulate=False)
    stage = plan.stages[1]
    assert stage.layers == [4, 5, 6, 7] and all(V3.is_moe_layer(i) for i in stage.layers)
    return plan, stage


def _buffer_bytes(cfg, layers: int) -> int:
    """Buffers a stage of MoE layers holds besides parameters (the paper does not count them): the FP32
    routing biases b_i (N_r per layer) and the RoPE inverse frequencies (d_h^R / 2, in the weight format)."""
    return 4 * cfg.n_routed_experts * layers + 2 * (cfg.qk_rope_head_dim // 2)


def _decimals(text: str) -> int:
    return len(text.split(".")[1])


def test_table6_by_hand_from_the_papers_symbols():
    """The paper's sums, from its symbols (h, d_cq, d_c, d_h, d_hr, n_h, h_E, N, N_s): the reference is arithmetic."""
    h, dcq, dc, dh, dhr, nh, he, n, ns = 7168, 1536, 512, 128, 64, 128, 2048, 256, 1
    layers, tp, ep = 4, 2, 8
    norms = layers * (2 * h + dcq + dc)
    split = layers * (dh * nh * dcq + 2 * dh * nh * dc + h * dh * nh) // tp  # W^UQ, W^UK, W^UV, W^O
    whole = layers * (dcq * h + dc * h + dhr * nh * dcq + dhr * h)  # W^DQ, W^DKV, W^QR, W^KR
    moe = layers * ((n // ep + ns) * 3 * h * he + n * h)  # 32 routed + 1 shared expert, and the gate
    assert (norms, split + whole, moe) == (TABLE6_RMSNORM, TABLE6_MLA, TABLE6_MOE)
    assert norms + split + whole + moe == TABLE6_TOTAL and 2 * TABLE6_TOTAL == TABLE6_TOTAL_BYTES


def test_zhang_su_reproduces_table6():
    plan, stage = _stage1(0, "zhang-su")
    assert stage.params_per_device == TABLE6_TOTAL
    # row by row, from the planner's own per-tensor split
    lay = plan.layout
    params = count_params(V3)
    from dsv3.plan.memory import stage_parts

    part = stage_parts(V3, lay, PAPER_STAGES)[1]
    rows = {"norms": 0, "mla": 0, "moe": 0}
    for t in stage_tensors(params, part):
        if not t.trainable:
            continue
        key = "norms" if t.component == "norms" else "mla" if t.component.startswith("attn.") else "moe"
        rows[key] += device_numel(t, lay)
    assert rows == {"norms": TABLE6_RMSNORM, "mla": TABLE6_MLA, "moe": TABLE6_MOE}
    # BF16 weights: the paper's bytes, plus the buffers it does not count
    assert stage.weights == TABLE6_TOTAL_BYTES + _buffer_bytes(V3, 4)
    assert round(stage.weights / GIB, 2) == TABLE6_TOTAL_GB


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_zhang_su_reproduces_the_zero_table(zero):
    _, stage = _stage1(zero, "zhang-su")
    params = stage.weights - _buffer_bytes(V3, 4)
    printed = TABLE8[zero]
    for ours, text in zip((params, stage.grads, stage.optimizer), printed[:3]):
        assert round(ours / GIB, _decimals(text)) == float(text)
    # The paper's total is the sum of its rounded columns (81.54 = 11.64 + 23.3 + 46.6); the exact sum
    # differs from it by that rounding only.
    assert round(sum(float(x) for x in printed[:3]), 2) == float(printed[3])
    assert abs((params + stage.grads + stage.optimizer) / GIB - float(printed[3])) < 0.05
    # ZeRO shards non-MoE states over DP = 32 and the whole MoE block over EDP = 8 (the paper's section 4)
    sharded = (TABLE6_RMSNORM + TABLE6_MLA) // 32 + TABLE6_MOE // 8
    assert stage.optimizer == 8 * (sharded if zero >= 1 else TABLE6_TOTAL)
    assert stage.grads == 4 * (sharded if zero >= 2 else TABLE6_TOTAL)
    assert params == 2 * (sharded if zero >= 3 else TABLE6_TOTAL)


# Today's numbers (computed with the planner before --tp-convention existed): stage 1 of the paper's
# layout under the default (megatron) convention, (params, weights, grads, optimizer) bytes per ZeRO stage.
MEGATRON_STAGE1 = {
    0: (6_137_118_720, 12_274_241_600, 24_548_474_880, 49_096_949_760),
    1: (6_137_118_720, 12_274_241_600, 24_548_474_880, 5_762_138_112),
    2: (6_137_118_720, 12_274_241_600, 2_881_069_056, 5_762_138_112),
    3: (6_137_118_720, 1_440_538_688, 2_881_069_056, 5_762_138_112),
}
# and the peak device of docs/planner.md's worked example (the report's layout, default precision); a DualPipe
# device holds the RoPE table of its two stages once (64 bytes and their 10 % allowance less than two copies).
MEGATRON_REPORT_PEAK = 45_827_933_496.4 - 64 * 1.1


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_megatron_keeps_todays_numbers(zero):
    _, stage = _stage1(zero, "megatron")
    assert (stage.params_per_device, stage.weights, stage.grads, stage.optimizer) == MEGATRON_STAGE1[zero]
    assert Layout().tp_convention == "megatron"
    # the difference to the paper: Megatron splits the shared expert and W^QR over TP = 2
    h, he, dhr, nh, dcq = 7168, 2048, 64, 128, 1536
    assert TABLE6_TOTAL - stage.params_per_device == 4 * (3 * h * he + dhr * nh * dcq) // 2


def test_megatron_keeps_the_documented_worked_example():
    lay = Layout(pp=16, ep=64, dp=128, zero=1, schedule="dualpipe", recompute="full", fp8=True, global_batch=15360)
    assert make_plan(V3, lay).peak_device_bytes == pytest.approx(MEGATRON_REPORT_PEAK, rel=1e-12)


def test_zhang_su_split_of_single_tensors_by_hand():
    cfg = TINY
    lay = Layout(tp=2, ep=4, dp=4, tp_convention="zhang-su")
    tensors = {t.name: t for t in count_params(cfg).main_tensors}
    q_b = tensors["model.layers.1.self_attn.q_b_proj.weight"]
    h, nope, rope, r = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.q_lora_rank
    assert device_numel(q_b, lay) == h * nope * r // 2 + h * rope * r  # W^UQ split, W^QR whole
    assert device_numel(q_b, lay.replace(tp_convention="megatron")) == h * (nope + rope) * r // 2
    shared = tensors["model.layers.1.mlp.shared_experts.down_proj.weight"]
    assert device_numel(shared, lay) == shared.numel
    assert device_numel(shared, lay.replace(tp_convention="megatron")) == shared.numel // 2
    for name in (
        "model.layers.1.self_attn.kv_b_proj.weight",
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.1.mlp.experts.gate_up_proj",
        "model.layers.1.self_attn.kv_a_proj_with_mqa.weight",
    ):
        assert device_numel(tensors[name], lay) == device_numel(tensors[name], lay.replace(tp_convention="megatron"))


def test_cli_reports_the_convention_in_plan_and_search(capsys):
    assert main(["plan", "--preset", "tiny", "--tp", "2", "--tp-convention", "zhang-su", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["layout"]["tp_convention"] == "zhang-su"
    assert main(["plan", "--preset", "tiny", "--tp", "2"]) == 0
    out = capsys.readouterr().out
    assert "zhang-su" not in out.splitlines()[0]
    assert main(["plan", "--preset", "tiny", "--tp", "2", "--tp-convention", "zhang-su"]) == 0
    assert "zhang-su" in capsys.readouterr().out.splitlines()[0]
    assert (
        main(
            [
                "plan",
                "search",
                "--preset",
                "tiny",
                "--gpus",
                "4",
                "--gpu-memory",
                "1GiB",
                "--seq-len",
                "256",
                "--schedule",
                "1f1b",
                "--recompute",
                "none",
                "--tp-convention",
                "zhang-su",
                "--json",
            ]
        )
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    assert doc["tp_convention"] == "zhang-su"
    assert {c["layout"]["tp_convention"] for c in doc["fits"] + doc["rejected"]} == {"zhang-su"}
    code, _, err = cli(["plan", "--preset", "tiny", "--tp-convention", "nvidia"], capsys)  # an argparse error
    assert_one_error(code, err, "zhang-su")
