"""``dsv3 plan`` reports the optimizer state dsv3's ZeRO-1 runtime holds on each data-parallel rank.

dsv3's ZeroAdamW (``parallel/zero.py``) cuts every tensor along dim 0 (dense tensors over DP, the rank's
expert block over EDP = DP / EP), so on a config with odd row counts the ranks hold different bytes and
the busiest one more than the flat ``ceil(n / G)`` split of the ZeRO paper. The references here are
``ZeroAdamW(...).state_bytes()`` of models built in-process for each rank (a ``ParallelContext`` with the
rank's place and no process group: the state does not depend on communication) and sums done by hand.
"""

import json

import pytest
from helpers import small_config

from dsv3.cli import main
from dsv3.plan.layout import Layout
from dsv3.plan.params import ParamTensor
from dsv3.plan.planner import make_plan
from dsv3.plan.precision import Precision
from dsv3.plan.states import (
    FLAT_MODEL,
    RUNTIME_MODEL,
    zero1_optimizer_bytes_by_rank,
    zero1_rank_state_bytes,
    zero1_runtime_applies,
)

#: the formats dsv3 trains in with --dtype bf16 --moments bf16 (the router is stored in the model's dtype).
BF16 = "weights=bf16,grads=bf16,moments=bf16,router=bf16"
PREC = Precision.parse(BF16)


def _odd_config():
    """Odd row counts: vocabulary 509, N_r / EP = 3 experts a rank at EP 2, kv_a_proj 35 + 8 rows."""
    return small_config(
        vocab_size=509, n_routed_experts=6, n_group=2, topk_group=1, qk_rope_head_dim=8, kv_lora_rank=35
    )


@pytest.fixture(scope="module")
def odd_config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("planrank") / "config.json"
    _odd_config().save(path)
    return str(path)


def _plan_json(capsys, config: str, *args: str) -> dict:
    assert main(["plan", "--config", config, "--seq-len", "16", "--precision", BF16, "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def _runtime_state_bytes(cfg, dp: int, ep: int) -> list[int]:
    """``ZeroAdamW.state_bytes()`` of each DP rank after one step, every rank built in this process."""
    torch = pytest.importorskip("torch")
    from dsv3.model.transformer import DeepseekV3ForCausalLM
    from dsv3.parallel.dispatch import shard_experts
    from dsv3.parallel.world import ParallelContext
    from dsv3.parallel.zero import ZeroAdamW

    out = []
    for rank in range(dp):
        ctx = ParallelContext(rank=rank, world_size=1, dp=dp, ep=ep)  # world_size 1: no collectives
        torch.manual_seed(0)
        model = DeepseekV3ForCausalLM(cfg).to(torch.bfloat16)
        if ep > 1:
            shard_experts(model, ctx, dispatcher="alltoall")
        opt = ZeroAdamW(model, ctx, moments_dtype="bf16")
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step(1.0)
        out.append(opt.state_bytes())
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dp,ep", [(4, 2), (6, 3), (3, 1)])
def test_plan_json_gives_every_rank_the_runtime_optimizer_bytes(capsys, odd_config_file, dp, ep):
    doc = _plan_json(capsys, odd_config_file, "--dp", str(dp), "--ep", str(ep))
    measured = _runtime_state_bytes(_odd_config(), dp, ep)
    assert len(set(measured)) > 1  # the chunks are uneven: the layout tells ranks apart
    for mem in (doc["stages"][0]["memory_bytes"], doc["devices"][0]["memory_bytes"]):
        assert mem["optimizer_model"] == RUNTIME_MODEL
        assert mem["optimizer_by_dp_rank"] == measured
        assert mem["optimizer"] == max(measured)
        assert mem["optimizer_busiest_dp_rank"] == measured.index(max(measured))
        assert (mem["optimizer_min"], mem["optimizer_max"]) == (min(measured), max(measured))
        assert mem["optimizer_flat"] != mem["optimizer"]  # the flat ceil(n/G) split kept beside it, and different
    # the busiest rank's bytes are in the device's total (and so in the peak that decides whether it fits)
    flat = _plan_json(capsys, odd_config_file, "--dp", str(dp), "--ep", str(ep), "--fragmentation", "0")
    dev = flat["devices"][0]["memory_bytes"]
    assert dev["total"] == pytest.approx(
        dev["weights"] + dev["grads"] + max(measured) + dev["activations"] + dev["comm_buffers"], rel=1e-12
    )


@pytest.mark.timeout(120)
def test_each_pipeline_device_holds_what_the_plan_says():
    """PP 2 (1F1B) x DP 4 x EP 2 without MTP: every (pipeline device, DP rank)'s ZeroAdamW over the parameters
    its stage holds (the runtime's ``owned``: ``PipelineStage.parameter_names``) equals the plan's stage bytes.
    (With MTP the runtime's last stage also holds the embedding, which the planner's stages do not count.)"""
    torch = pytest.importorskip("torch")
    from dsv3.model.transformer import DeepseekV3ForCausalLM
    from dsv3.parallel.dispatch import shard_experts
    from dsv3.parallel.pipeline.stages import PipelineStage, stage_layers
    from dsv3.parallel.world import ParallelContext
    from dsv3.parallel.zero import ZeroAdamW

    cfg = small_config(
        vocab_size=509,
        n_routed_experts=6,
        n_group=2,
        topk_group=1,
        qk_rope_head_dim=8,
        kv_lora_rank=35,
        num_hidden_layers=4,
        num_nextn_predict_layers=0,
    )
    pp, dp, ep = 2, 4, 2
    split = stage_layers(cfg, pp, 16, mtp=False)
    plan = make_plan(
        cfg,
        Layout(pp=pp, dp=dp, ep=ep, zero=1, seq_len=16, global_batch=4 * dp, stage_layers=split, mtp=False),
        PREC,
        simulate=False,
    )
    for d in range(pp):
        layers = list(range(sum(split[:d]), sum(split[: d + 1])))
        measured = []
        for r in range(dp):
            ctx = ParallelContext(rank=d * dp + r, world_size=1, pp=pp, dp=dp, ep=ep, pp_devices=pp)
            model = DeepseekV3ForCausalLM(cfg).to(torch.bfloat16)
            shard_experts(model, ctx, dispatcher="alltoall")
            opt = ZeroAdamW(
                model, ctx, moments_dtype="bf16", names=PipelineStage(model, d, pp, layers).parameter_names()
            )
            for p in model.parameters():
                p.grad = torch.ones_like(p)
            opt.step(1.0)
            measured.append(opt.state_bytes())
        assert list(plan.stages[d].ranks.by_rank) == measured, d
        assert plan.devices[d].optimizer == max(measured)


def test_by_rank_bytes_by_hand():
    """A dense tensor of 5 rows x 3 and an expert tensor of 6 experts x 4 x 2 at DP 4, EP 2 (EDP 2):
    dense rows 1,1,1,2 over the DP ranks; each EP rank's 3 experts are the 2-D view [3 * 4, 2] = 12 rows
    of 2, split 6,6 over its EDP replicas (EDP rank = DP rank // EP), inside an expert, not by whole
    experts. Bytes per element: two BF16 moments + an FP32 master = 8."""
    dense = ParamTensor("d.weight", "dense_mlp", (5, 3))
    experts = ParamTensor("e.gate_up_proj", "routed_experts", (6, 4, 2), shard="expert")
    buffer = ParamTensor("b", "router", (6,), kind="buffer")
    lay = Layout(dp=4, ep=2, zero=1)
    dense_rows, expert_rows = [1, 1, 1, 2], [6, 6, 6, 6]
    want = [8 * (3 * d + 2 * e) for d, e in zip(dense_rows, expert_rows)]
    assert zero1_optimizer_bytes_by_rank([dense, experts, buffer], lay, PREC) == want
    assert [zero1_rank_state_bytes([dense, experts], lay, PREC, r).optimizer for r in range(4)] == want
    assert zero1_optimizer_bytes_by_rank([dense, experts], lay.replace(zero=0), PREC) == [8 * (15 + 8 * 3)] * 4
    with pytest.raises(ValueError):
        zero1_optimizer_bytes_by_rank([dense], lay.replace(tp=2, dp=2), PREC)


@pytest.mark.parametrize(
    "changes,applies",
    [
        (dict(), True),
        (dict(zero=0), False),
        (dict(zero=2), False),
        (dict(tp=2, dp=2), False),
        (dict(etp=2, ep=1, dp=4), False),
        (dict(pp=2, schedule="dualpipe"), False),
        (dict(pp=2, schedule="dualpipev"), True),
    ],
)
def test_the_flat_split_stays_where_the_runtime_does_not_run(changes, applies):
    """TP/ETP > 1, ZeRO-2/3 and DualPipe's replica ZeRO group keep the ZeRO paper's flat ceil(n/G) split
    (the paper's tables, tests/test_plan_conventions.py); ZeRO 0 shards nothing, so the two agree."""
    cfg = small_config()
    lay = Layout(dp=4, ep=2, zero=1, seq_len=16).replace(**changes)
    assert zero1_runtime_applies(lay, 2 if lay.schedule == "dualpipe" else 1) == applies
    plan = make_plan(cfg, lay, PREC, simulate=False)
    for s in plan.stages:
        mem = s.to_dict()["memory_bytes"]
        assert mem["optimizer_model"] == (RUNTIME_MODEL if applies else FLAT_MODEL)
        if not applies:
            assert s.ranks is None and mem["optimizer_flat"] == s.optimizer


def test_a_device_holding_two_stages_adds_them_rank_by_rank():
    """DualPipeV: one device holds stages 0 and 1; its busiest rank is the max of the per-rank sums, where the
    embedding of stage 0 and the last stage's copy of it (the MTP modules embed tokens) count once: on the
    device they are one tensor (report 3.2.1)."""
    cfg = _odd_config()
    plan = make_plan(
        cfg, Layout(pp=2, dp=4, ep=2, zero=1, schedule="dualpipev", seq_len=16, global_batch=8), PREC, simulate=False
    )
    (dev,) = plan.devices
    assert dev.stages == [0, 1]
    a, b = (s.ranks.by_rank for s in plan.stages)
    emb = zero1_optimizer_bytes_by_rank(plan.params.embedding, plan.layout, PREC)
    both = [x + y - e for x, y, e in zip(a, b, emb)]
    assert dev.ranks.by_rank == tuple(both) and dev.optimizer == max(both) == dev.ranks.high
    assert dev.ranks.busiest == both.index(max(both)) and dev.ranks.low == min(both)
    flat_emb = -(-cfg.vocab_size * cfg.hidden_size // 4) * (2 + 2 + 4)  # ceil(n / dp) x (BF16 m, v + FP32 master)
    assert dev.optimizer_flat == sum(s.optimizer_flat for s in plan.stages) - flat_emb


def test_the_table_says_which_rank_and_the_flat_split(capsys, odd_config_file):
    assert (
        main(["plan", "--config", odd_config_file, "--seq-len", "16", "--precision", BF16, "--dp", "4", "--ep", "2"])
        == 0
    )
    out = capsys.readouterr().out
    measured = _runtime_state_bytes(_odd_config(), 4, 2)
    busiest = measured.index(max(measured))
    assert "runtime (dsv3 ZeRO-1 row chunks" in out
    assert f"DP rank {busiest} holds" in out and f"({max(measured):,} B;" in out
    assert "flat ceil(n/G) split (ZeRO paper)" in out
    assert main(["plan", "--preset", "tiny", "--tp", "2", "--seq-len", "16"]) == 0
    assert "optimizer: flat ceil(n/G) split of the ZeRO paper" in capsys.readouterr().out


def test_long_rank_lists_stay_out_of_the_json(monkeypatch):
    """Above MAX_RANKS_LISTED DP ranks the per-rank list is left out; the busiest rank, min and max stay."""
    import dsv3.plan.states as states

    cfg = _odd_config()
    lay = Layout(dp=4, ep=2, zero=1, seq_len=16)
    full = make_plan(cfg, lay, PREC, simulate=False).stages[0].ranks
    monkeypatch.setattr(states, "MAX_RANKS_LISTED", 3)
    mem = make_plan(cfg, lay, PREC, simulate=False).stages[0].to_dict()["memory_bytes"]
    assert mem["optimizer_by_dp_rank"] is None
    assert (mem["optimizer_busiest_dp_rank"], mem["optimizer_min"], mem["optimizer_max"]) == (
        full.busiest,
        full.low,
        full.high,
    )


def test_search_fits_layouts_by_the_busiest_rank():
    """``plan search`` decides with the same bytes: a GPU one byte smaller than the plan's peak (which holds
    the busiest rank's optimizer state) rejects the layout, though the flat split would have fitted."""
    from dsv3.plan.search import search

    cfg = _odd_config()
    lay = Layout(dp=4, ep=2, zero=1, seq_len=16)
    plan = make_plan(cfg, lay, PREC, simulate=False)
    dev = plan.devices[0]
    assert dev.optimizer > dev.optimizer_flat
    peak = plan.peak_device_bytes
    flat_peak = peak - (1 + 0.10) * (dev.optimizer - dev.optimizer_flat)  # the default 10 % fragmentation allowance
    grid = dict(pp=[1], tp=[1], ep=[2], etp=[1], zero=[1], recompute=["none"], schedule=["1f1b"])
    for memory, fits in ((int(peak) + 1, True), (int(flat_peak) + 1, False)):
        assert flat_peak < memory
        res = search(cfg, 4, memory, grid=grid, seq_len=16, precision=PREC)
        (c,) = [c for c in res.candidates if c.layout.ep == 2 and c.layout.dp == 4]
        assert c.fits == fits and c.peak_bytes == pytest.approx(peak, rel=1e-12)


def test_step_transients_by_hand():
    """grad_accumulation: the largest gradient autograd makes beside .grad (a dense tensor whole, routed experts
    WGRAD_PIECE_ELEMS or one expert at a time), only with more than one micro-batch; zero1_reduce: one FP32
    bucket of at most ZERO1_BUCKET_ELEMS elements, only with DP > 1 (a larger BF16 gradient is cast whole)."""
    from dsv3.plan.states import WGRAD_PIECE_ELEMS, ZERO1_BUCKET_ELEMS, step_transient_bytes

    fp32 = Precision.parse("weights=fp32,grads=fp32,moments=fp32,router=fp32,master=none")
    dense = ParamTensor("d.weight", "dense_mlp", (3000, 1000))  # 3M elements
    experts = ParamTensor("e.down_proj", "routed_experts", (8, 1024, 1536), shard="expert")  # 1.5M per expert
    per_expert = 1024 * 1536
    piece = per_expert * (WGRAD_PIECE_ELEMS // per_expert)  # 2 experts of the 4 an EP rank holds
    lay = Layout(dp=2, ep=2, zero=1, seq_len=16, micro_batch=1, global_batch=8)
    got = step_transient_bytes([dense, experts], lay, fp32)
    assert got == {"grad_accumulation": 4 * max(3_000_000, piece), "zero1_reduce": 4 * ZERO1_BUCKET_ELEMS}
    assert step_transient_bytes([dense], lay.replace(global_batch=2), fp32) == {"zero1_reduce": 4 * 3_000_000}
    assert step_transient_bytes([dense], lay.replace(dp=1, ep=1, global_batch=1), fp32) == {}
    big = ParamTensor("emb.weight", "embedding", (8192, 1024))  # 8M elements, over one bucket
    bf16 = Precision.parse(BF16)
    assert step_transient_bytes([big], lay, bf16)["zero1_reduce"] == 4 * 8192 * 1024
    assert step_transient_bytes([big], lay, fp32)["zero1_reduce"] == 4 * ZERO1_BUCKET_ELEMS  # reduced in place


def test_the_plans_step_constants_are_the_runtimes():
    from dsv3.model.ops import WGRAD_PIECE_ELEMS
    from dsv3.parallel.zero import REDUCE_BUCKET_ELEMS
    from dsv3.plan import states

    assert (states.WGRAD_PIECE_ELEMS, states.ZERO1_BUCKET_ELEMS) == (WGRAD_PIECE_ELEMS, REDUCE_BUCKET_ELEMS)


def test_after_backward_transients_count_only_above_the_backwards_own():
    from dsv3.plan.memory import step_buffers
    from dsv3.plan.states import StateBytes

    sb = StateBytes(0, 0, 0, 0, 0, 0, transients={"grad_accumulation": 10.0, "zero1_reduce": 50.0})
    assert step_buffers({"ep_all_to_all": 5.0}, [sb], 0.0, 20.0) == {
        "ep_all_to_all": 5.0,
        "grad_accumulation": 10.0,
        "after_backward": 15.0,  # 50 - (20 + 5 + 10)
    }
    assert step_buffers({}, [sb], 80.0, 20.0)["after_backward"] == 50.0  # the pipeline's shared gradients: 80 - 30
    assert "after_backward" not in step_buffers({}, [sb], 0.0, 60.0)
