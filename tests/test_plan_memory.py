"""Sharding rules, ZeRO stages, itemised activations and schedule in-flight counts of the planner."""

import math

import pytest

from dsv3.config import load_preset
from dsv3.errors import ConfigError
from dsv3.layout import balanced_stage_layers
from dsv3.plan import activations as act
from dsv3.plan.layout import Layout
from dsv3.plan.params import aggregate, count_params
from dsv3.plan.planner import make_plan
from dsv3.plan.precision import Precision, element_bytes, parse_size
from dsv3.plan.simulate import simulate
from dsv3.plan.states import device_numel, state_bytes

TINY = load_preset("tiny")  # d 192, 4 heads, 16 experts of 96, vocab 4096, 4 layers (first dense)


def _tensor(name):
    return next(t for t in count_params(TINY).main_tensors + count_params(TINY).mtp_tensors if t.name == name)


def test_tensor_parallel_and_expert_parallel_splits_by_hand():
    lay = Layout(tp=2, ep=4, dp=4)
    # MLA up-projections and W^O split over TP, down-projections and norms replicated
    assert device_numel(_tensor("model.layers.1.self_attn.q_b_proj.weight"), lay) == 96 * 4 * 48 // 2
    assert device_numel(_tensor("model.layers.1.self_attn.kv_b_proj.weight"), lay) == 64 * 4 * 64 // 2
    assert device_numel(_tensor("model.layers.1.self_attn.o_proj.weight"), lay) == 192 * 4 * 32 // 2
    assert device_numel(_tensor("model.layers.1.self_attn.q_a_proj.weight"), lay) == 96 * 192
    assert device_numel(_tensor("model.layers.1.self_attn.kv_a_proj_with_mqa.weight"), lay) == 80 * 192
    assert device_numel(_tensor("model.layers.1.input_layernorm.weight"), lay) == 192
    # router and its bias replicated; routed experts: 16 / EP=4 per rank, whole (ETP 1)
    assert device_numel(_tensor("model.layers.1.mlp.gate.weight"), lay) == 16 * 192
    assert device_numel(_tensor("model.layers.1.mlp.experts.gate_up_proj"), lay) == 4 * 192 * 192
    assert device_numel(_tensor("model.layers.1.mlp.experts.gate_up_proj"), lay.replace(etp=2)) == 4 * 192 * 192 // 2
    # shared experts and the dense MLP split over TP like any MLP
    assert device_numel(_tensor("model.layers.1.mlp.shared_experts.down_proj.weight"), lay) == 192 * 96 // 2
    assert device_numel(_tensor("model.layers.0.mlp.up_proj.weight"), lay) == 512 * 192 // 2
    # vocabulary split, padded up to a multiple of TP
    emb = count_params(TINY.replace(vocab_size=4097)).embedding[0]
    assert device_numel(emb, lay) == 2049 * 192
    assert lay.edp == 4 * 2 // 4


def test_zero_stages_shard_dense_states_over_dp_and_expert_states_over_edp():
    p = count_params(TINY)
    lay = Layout(ep=2, dp=4)  # EDP = 2
    groups = aggregate(p.main_tensors)
    prec = Precision()  # bf16 weights, fp32 grads, fp32 master, bf16 moments, fp32 router
    experts = sum(t.numel for t in p.main_tensors if t.shard == "expert") // 2
    router = sum(t.numel for t in p.main_tensors if t.kind == "router")
    bias = sum(t.numel for t in p.main_tensors if t.kind == "buffer")  # routing biases: FP32 always
    rope = sum(t.numel for t in p.main_tensors if t.kind == "wbuffer")  # RoPE frequencies: the weight format
    dense = p.total - router - 2 * experts
    w0 = 2 * (dense + experts) + 4 * router + 4 * bias + 2 * rope
    g0 = 4 * (dense + experts + router)
    o0 = (2 * 2 + 4) * (dense + experts) + 2 * 2 * router  # the FP32 router needs no master copy
    s = {z: state_bytes(groups, lay.replace(zero=z), prec) for z in range(4)}
    assert (s[0].weights, s[0].grads, s[0].optimizer) == (w0, g0, o0)
    o1 = 8 * math.ceil(dense / 4) + 4 * math.ceil(router / 4) + 8 * math.ceil(experts / 2)
    assert (s[1].weights, s[1].grads, s[1].optimizer) == (w0, g0, o1)
    g2 = 4 * (math.ceil((dense + router) / 4) + math.ceil(experts / 2))
    assert (s[2].weights, s[2].grads, s[2].optimizer) == (w0, g2, o1)
    w3 = 2 * math.ceil(dense / 4) + 4 * math.ceil(router / 4) + 2 * math.ceil(experts / 2) + 4 * bias + 2 * rope
    assert (s[3].weights, s[3].grads, s[3].optimizer) == (w3, g2, o1)
    # DualPipe: the two devices holding a stage join the ZeRO group
    assert state_bytes(groups, lay.replace(zero=1), prec, replicas=2).optimizer < s[1].optimizer


def test_fp32_training_has_no_master_copy():
    p = count_params(TINY)
    s = state_bytes(aggregate(p.main_tensors), Layout(zero=0), Precision.parse("weights=fp32,moments=fp32,master=fp32"))
    assert s.optimizer == 8 * p.total  # two FP32 moments, the weights are their own master
    assert s.weights == 4 * (p.total + p.routing_bias + 16 // 2)  # + the RoPE inverse frequencies


def test_activation_items_of_a_dense_layer_by_hand():
    lay = Layout(seq_len=64)  # one sequence of 64 tokens
    items = act.decoder_layer_items(TINY, lay, Precision(), moe=False)
    d, q, kv, rope, h, qk, v, i = 192, 96, 64, 16, 4, 48, 32, 512
    # BF16 tensors (2 bytes) and FP32 statistics (4 bytes) per token; values and the attention output are
    # zero-padded from d_v = 32 to the key width 48 for the fused kernel, the o_proj input is an unpadded copy,
    # and each layer casts the FP32 RoPE tables to BF16 for q^R and k^R (d_h^R per position each).
    attn = (
        2 * d
        + 4
        + 2 * d  # input RMSNorm: input, rstd, output (the down-projections' input)
        + 2 * q
        + 4
        + 2 * q  # q_a_proj output, q_a_layernorm rstd and output
        + 2 * (kv + rope)
        + 4
        + 2 * kv  # kv_a_proj output, kv_a_layernorm rstd and output
        + 2 * 2 * rope  # cos/sin casts
        + 2 * h * qk * 3
        + 2 * h * qk
        + 4 * h  # q, k, padded v; padded output, logsumexp
        + 2 * h * v
    )  # o_proj input
    ffn = 2 * d + 4 + 2 * d + 2 * 2 * i + 2 * i  # post-attention RMSNorm: input, rstd, output; gate, up; product
    assert act.bytes_per_token(items, "none") == attn + ffn
    # selective: region 1 keeps the layer input and the down-projection outputs, region 2 the SDPA output and
    # logsumexp; the FFN region its input and GEMM outputs (gate, up and the down-projection output)
    kept = 2 * d + 2 * q + 2 * (kv + rope) + 2 * h * qk + 4 * h + 2 * d + 2 * 2 * i + 2 * d
    assert act.bytes_per_token(items, "selective") == kept
    assert act.bytes_per_token(items, "full") == 2 * d  # only the layer input
    # eager attention keeps the s x s softmax (FP32) and BF16 probabilities, unpadded values, no logsumexp/output
    eager = act.decoder_layer_items(TINY, lay.replace(attention="eager"), Precision(), moe=False)
    s = 64
    assert act.bytes_per_token(eager, "none") - (attn + ffn) == h * s * (4 + 2) - 2 * h * (qk - v) - 4 * h - 2 * h * qk


def test_activation_items_of_an_moe_layer_by_hand():
    lay = Layout(seq_len=64)
    items = {i.name: i for i in act.decoder_layer_items(TINY, lay, Precision(), moe=True)}
    d, n_r, k, ie, t = 192, 16, 4, 96, 64
    ffn = [n for n in items if not n.startswith(("input_layernorm", "self_attn"))]
    none = {n: items[n].bytes_per_token for n in ffn if items[n].kept("none")}
    assert none == {
        "post_attention_layernorm.input": 2 * d,
        "post_attention_layernorm.rstd": 4,
        "post_attention_layernorm.output": 2 * d,  # the shared experts' gate/up input
        "mlp.gate.input": 4 * d,  # the router runs in FP32 on an FP32 copy of its input
        "mlp.gate.scores": 4 * n_r,
        "mlp.gate.topk_index": 8 * k,
        "mlp.gate.topk_weight": 4 * k,
        "mlp.gate.topk_sum": 4,
        "mlp.gate.score_sum": 4,
        "mlp.gate.balance_f": 4 * n_r / t,
        "mlp.load": 8 * n_r / t,
        "mlp.balance_loss": 4 / t,
        "mlp.shared_experts.swiglu.input": 2 * 2 * ie,
        "mlp.shared_experts.down_proj.input": 2 * ie,
        "mlp.experts.input": 2 * k * d,
        "mlp.experts.swiglu.input": 2 * k * 2 * ie,
        "mlp.experts.weight": 4 * k,
        "mlp.experts.down_proj.input": 2 * k * ie,
        "mlp.experts.index": 8 * k,
        "mlp.experts.order": 8 * k,
        "mlp.experts.offsets": 4 * n_r / t,
    }
    selective = {n for n in ffn if items[n].kept("selective")}
    assert selective == {
        "post_attention_layernorm.input",
        "mlp.gate.logits",
        "mlp.shared_experts.swiglu.input",
        "mlp.shared_experts.down_proj.output",
        "mlp.experts.swiglu.input",
        "mlp.experts.down_proj.output",
        "mlp.load",
        "mlp.balance_loss",
    }
    assert items["mlp.experts.down_proj.output"].bytes_per_token == 2 * k * d
    assert {n for n in ffn if items[n].kept("full")} == {"mlp.load", "mlp.balance_loss"}
    # alpha = 0 (Layout.balance_loss False): no sequence-wise balance loss, none of its three tensors
    off = {i.name for i in act.decoder_layer_items(TINY, lay.replace(balance_loss=False), Precision(), moe=True)}
    assert set(items) - off == {"mlp.gate.score_sum", "mlp.gate.balance_f", "mlp.balance_loss"}


def test_activation_items_split_over_tp_and_cached_in_fp8():
    base = {i.name: i for i in act.decoder_layer_items(TINY, Layout(), Precision(), moe=True)}
    tp2 = {i.name: i for i in act.decoder_layer_items(TINY, Layout(tp=2, dp=2), Precision(), moe=True)}
    assert tp2["input_layernorm.input"].elems == base["input_layernorm.input"].elems / 2  # sequence parallel
    assert tp2["self_attn.query"].elems == base["self_attn.query"].elems / 2  # heads
    assert tp2["self_attn.q_a_proj.output"].elems == base["self_attn.q_a_proj.output"].elems  # latent, replicated
    # balanced routing: K_r token copies per token, regrouped from TP into ETP
    assert base["mlp.experts.input"].elems == 4 * 192
    assert tp2["mlp.experts.input"].elems == 4 * 192 / 2
    # FP8, 4096 tokens: every tile full, so a cached element costs 1 byte plus 4/128 of a scale
    fp8 = {i.name: i for i in act.decoder_layer_items(TINY, Layout(fp8=True), Precision(), moe=True)}
    assert fp8["mlp.experts.input"].bytes_per_token == 4 * 192 * (1 + 4 / 128)
    assert fp8["self_attn.q_a_proj.input"].bytes_per_token == 192 * (1 + 4 / 128)
    assert fp8["self_attn.kv_a_proj_with_mqa.input"].bytes_per_token == 192 * (1 + 4 / 128)  # its own copy
    assert "input_layernorm.output" not in fp8  # no BF16 copy is kept
    assert fp8["self_attn.o_proj.input"].dtype == "e5m6"  # the Linear after attention (report 3.3.3)
    assert fp8["self_attn.o_proj.input"].bytes_per_token == 1.5 * 128 + 4  # 4 heads x 32, one scale
    assert fp8["self_attn.output"].dtype == "bf16"  # the padded kernel output stays BF16
    assert fp8["input_layernorm.input"].dtype == "bf16"
    assert element_bytes("fp8") == 1 + 4 / 128
    # 64 tokens: token tiles are padded to 128 rows; each of the 16 experts gets 16 copies, one tile each;
    # SwiGLU's 1x128 tiles pad the 96-wide expert rows to 128
    short = {i.name: i for i in act.decoder_layer_items(TINY, Layout(fp8=True, seq_len=64), Precision(), moe=True)}
    assert short["self_attn.q_a_proj.input"].bytes_per_token == 128 * 192 * (1 + 4 / 128) / 64
    assert short["mlp.experts.input"].bytes_per_token == (4 * 64 * 192 + 16 * 192 * 4) / 64
    assert short["mlp.experts.swiglu.gate"].bytes_per_token == 4 * (128 + 4)
    # with FP8 caching the selective policy leaves the FFN alone: it keeps what `none` keeps there
    ffn = [i for n, i in short.items() if n.startswith(("post_attention", "mlp"))]
    assert act.bytes_per_token(ffn, "selective") == act.bytes_per_token(ffn, "none")


def test_mtp_module_and_head_items():
    lay = Layout(seq_len=64)
    prec = Precision()
    head = {i.name: i for i in act.head_items(TINY, lay, prec)}
    # the fused cross-entropy keeps dL/dh [N, d] and dL/dW [V, d] (BF16 head weight), no logits
    assert head["loss.grad_hidden"].bytes_per_token == 2 * 192
    assert head["loss.grad_weight"].bytes_per_token == 2 * 4096 * 192 / 64
    assert all(i.kept("full") for i in head.values())
    mtp = act.mtp_items(TINY, lay, prec, 0, moe=True, shares_embedding=True)
    names = {i.name for i in mtp}
    assert "mtp.0.eh_proj.input" in names and "mtp.0.embed_tokens.input" not in names
    # under full recomputation the module (eh_proj included) is re-run: only its head stays
    assert {i.name for i in mtp if i.kept("full")} == {
        "mtp.0.shared_head.norm.input",
        "mtp.0.shared_head.norm.rstd",
        "mtp.0.loss.grad_hidden",
        "mtp.0.loss.grad_weight",
        "mtp.0.layer.mlp.load",
        "mtp.0.layer.mlp.balance_loss",
    }
    # built for its 63 positions: per token of the micro-batch, per-token items scale by 63/64, dL/dW does not
    by_name = {i.name: i for i in mtp}
    assert by_name["mtp.0.shared_head.norm.input"].bytes_per_token == 2 * 192 * 63 / 64
    assert by_name["mtp.0.loss.grad_weight"].bytes_per_token == pytest.approx(2 * 4096 * 192 / 64)


@pytest.mark.parametrize("schedule,pp,m", [("1f1b", 4, 8), ("zb1p", 4, 8), ("dualpipe", 4, 8), ("dualpipev", 4, 8)])
def test_in_flight_micro_batches_come_from_the_simulator(schedule, pp, m):
    cfg = load_preset("small")
    lay = Layout(pp=pp, dp=1, seq_len=256, global_batch=m, schedule=schedule)
    plan = make_plan(cfg, lay)
    res = simulate(schedule, pp=pp, microbatches=m)
    assert plan.schedule.peak_activations == res.peak_activations
    # the step time is the simulator's makespan for the planner's stage times
    st = plan.schedule
    timed = simulate(schedule, pp=pp, microbatches=m, f=st.f, b=st.b, w=st.w, fb=st.fb, comm=st.comm)
    assert st.makespan == timed.makespan and st.bubble == timed.bubble
    assert plan.step_time_s == pytest.approx(timed.makespan + plan.dp_sync_s)
    for dev in plan.devices:
        held = [plan.stages[s] for s in dev.stages]
        if len(held) == 1:  # one stage per device: peak count x per-micro-batch bytes
            assert held[0].microbatches_in_flight == res.peak_activations[dev.device]
            assert dev.activations == pytest.approx(
                held[0].microbatches_in_flight * held[0].activations_per_microbatch + held[0].recompute_working_set
            )
    if schedule == "1f1b":  # the classic count: stage i holds PP - i micro-batches
        assert [s.microbatches_in_flight for s in plan.stages] == [pp - i for i in range(pp)]
    if schedule == "dualpipe":  # device 0 holds PP sets of its first stage and one of the last
        d0 = plan.devices[0]
        first, last = plan.stages[0], plan.stages[pp - 1]
        assert sorted(d0.stages) == [0, pp - 1]
        assert d0.activations == pytest.approx(
            pp * first.activations_per_microbatch
            + last.activations_per_microbatch
            + max(first.recompute_working_set, last.recompute_working_set)
        )


def test_stage_split_puts_embedding_first_and_head_mtp_last():
    cfg = load_preset("deepseek-v3")
    plan = make_plan(cfg, Layout(pp=16, ep=64, dp=128, schedule="dualpipe", global_batch=128 * 32))
    assert sum(plan.stage_layers) == 61 and len(plan.stage_layers) == 16
    assert plan.stages[0].extras == ["embedding"] and plan.stages[-1].extras == ["head", "mtp"]
    assert sorted(plan.devices[0].stages) == [0, 15]  # DualPipe: embedding and head on the same device
    explicit = make_plan(cfg, Layout(pp=4, ep=64, dp=64, stage_layers=(16, 16, 16, 13)))
    assert [len(s.layers) for s in explicit.stages] == [16, 16, 16, 13]
    assert explicit.stages[3].layers[-1] == 60


def test_balanced_split_minimises_the_slowest_stage():
    assert balanced_stage_layers([1.0] * 8, 0.0, 0.0, 4) == (2, 2, 2, 2)
    split = balanced_stage_layers([1.0] * 8, 0.0, 2.0, 4)
    costs = [split[0], split[1], split[2], split[3] + 2.0]
    assert max(costs) == 3.0 and sum(c * c for c in costs) == 26.0 and split[3] == 1


@pytest.mark.parametrize(
    "layout,needle",
    [
        (Layout(ep=3, dp=3), "16 routed experts cannot be split over --ep 3"),
        (Layout(tp=3, dp=1), "4 attention heads cannot be split over --tp 3"),
        (Layout(pp=5), "4 layers cannot fill --pp 5 stages"),
        (Layout(pp=2, stage_layers=(1, 2)), "--stage-layers 1,2 sums to 3 but the model has 4 layers"),
        (Layout(ep=4, dp=2), "EP x ETP = 4 must divide DP x TP = 2"),
        (Layout(pp=3, schedule="dualpipe"), "needs an even number of pipeline stages"),
        (Layout(dp=2, global_batch=5), "--global-batch 5 is not a multiple"),
        (Layout(schedule="gpipe"), "unknown schedule 'gpipe'"),
        (Layout(zero=4), "--zero must be 0, 1, 2 or 3"),
    ],
)
def test_layouts_that_do_not_fit_the_model_raise_one_sentence(layout, needle):
    with pytest.raises(ConfigError) as info:
        layout.replace(seq_len=512).validate(TINY)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_sizes_parse_with_units():
    assert parse_size("80GiB") == 80 * 2**30
    assert parse_size("80 GB") == 80 * 10**9
    assert parse_size("1.5TiB") == int(1.5 * 2**40)
    assert parse_size("80G") == 80 * 2**30
    for bad in ("80", "eighty GiB", "80 parsecs", ""):
        with pytest.raises(ConfigError):
            parse_size(bad)
