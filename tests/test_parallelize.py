"""``parallelize``: the meta-device build, materialising only what a rank holds, and ZeRO-1 at dp = 1.

References are independent of the code under test: a model built eagerly on the CPU (its per-parameter
seeds), slices of that whole model, ``dsv3 plan --json`` per rank (pure arithmetic), torch's allocations
seen through a dispatch mode, and dsv3's plain AdamW with ``clip_grad_norm`` for one process.
Every rank is built in this process (a ``ParallelContext`` with the rank's place and no process group:
what a rank holds does not depend on communication).
"""

import contextlib
import io
import json

import pytest
import torch
from helpers import small_config
from torch.utils._python_dispatch import TorchDispatchMode

from dsv3.cli import main
from dsv3.layout import pipeline_devices
from dsv3.model import DeepseekV3ForCausalLM
from dsv3.model.moe import Experts
from dsv3.parallel.dispatch import shard_experts
from dsv3.parallel.parallelize import (
    apply_precision,
    apply_recomputation,
    build_meta_model,
    initialize,
    parallelize,
    select_stages,
)
from dsv3.parallel.world import ParallelContext
from dsv3.parallel.zero import ZeroAdamW, sum_of_squares
from dsv3.train.config import TrainConfig
from dsv3.utils.meta import materialize

SEED = 7


def _train_config(**options) -> TrainConfig:
    return TrainConfig.from_dict(dict(seq_len=16, **options))


def _eager(cfg, dtype=torch.float32, fp8=False, init_seed=None):
    """The reference: the whole model built on the CPU and initialised from the per-parameter seeds of
    ``init_seed`` (default: that of ``build_meta_model(cfg, SEED)``, which draws it from ``manual_seed(SEED)``
    without the draws that the eager constructors of nn.Linear make), then cast and converted."""
    model = DeepseekV3ForCausalLM(cfg)
    model.reset_parameters(build_meta_model(cfg, SEED).init_seed if init_seed is None else init_seed)
    model = model.to(dtype)
    if fp8:
        from dsv3.fp8 import convert

        convert(model)
    return model


class _Allocations(TorchDispatchMode):
    """The element counts of every tensor created on a real device (factory ops) while active."""

    def __init__(self):
        super().__init__()
        self.numels: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.empty, torch.ops.aten.empty_strided) and not out.is_meta:
            self.numels.append(out.numel())
        return out


def _rank_model(cfg, ctx, config, *, dispatcher="alltoall"):
    """Steps 1-5 of ``parallelize`` for one rank of ``ctx`` (no process group: no pipeline runtime)."""
    model = build_meta_model(cfg, SEED)
    apply_precision(model, config)
    apply_recomputation(model, config)
    shard_experts(model, ctx, dispatcher=dispatcher if ctx.ep > 1 else "local")
    select_stages(model, ctx, config)
    materialize(model, torch.device("cpu"))
    return initialize(model, cfg)


@pytest.mark.parametrize(
    "options", [dict(), dict(dtype="bfloat16", fp8=True, recompute="selective")], ids=["fp32", "bf16-fp8-selective"]
)
def test_one_process_meta_build_equals_the_eager_model(options):
    cfg = small_config(tie_word_embeddings=True)
    config = _train_config(**options)
    got = parallelize(build_meta_model(cfg, SEED), ParallelContext.single(), config, mcfg=cfg).model
    want = _eager(cfg, getattr(torch, config.precision.dtype), fp8=config.precision.fp8)
    assert got.lm_head.weight is got.model.embed_tokens.weight  # the tie survives materialisation
    assert not any(t.is_meta for t in list(got.parameters()) + list(got.buffers()))
    assert [type(m).__name__ for m in got.modules()] == [type(m).__name__ for m in want.modules()]
    want_tensors = dict(want.named_parameters()) | dict(want.named_buffers())
    for name, t in list(got.named_parameters()) + list(got.named_buffers()):
        assert t.dtype == want_tensors[name].dtype and torch.equal(t, want_tensors[name]), name
    policy = {"none": "NoneType", "selective": "SelectiveRecompute"}[config.memory.recompute]
    assert {type(m.recompute).__name__ for m in got.model.layers} == {policy}


def test_an_expert_rank_holds_its_block_of_the_one_process_values_and_never_the_whole_layer():
    cfg = small_config(n_routed_experts=8, moe_intermediate_size=128)  # an expert layer is the largest tensor
    whole = _eager(cfg)
    full = {n: m for n, m in whole.named_modules() if isinstance(m, Experts)}
    n_full = next(iter(full.values())).gate_up_proj.numel()
    assert n_full > max(p.numel() for n, p in whole.named_parameters() if "experts." not in n)
    for rank in range(4):
        ctx = ParallelContext(rank=rank, world_size=1, dp=4, ep=4)
        with _Allocations() as seen:
            model = _rank_model(cfg, ctx, _train_config())
        assert max(seen.numels) == n_full // 4  # its expert block; never a whole expert layer
        for name, m in ((n, m) for n, m in model.named_modules() if isinstance(m, Experts)):
            start, end = ctx.expert_block(cfg.n_routed_experts)
            assert m.expert_offset == start and m.gate_up_proj.shape[0] == end - start
            assert torch.equal(m.gate_up_proj, full[name].gate_up_proj[start:end])
            assert torch.equal(m.down_proj, full[name].down_proj[start:end])
        for name, p in model.named_parameters():  # dense parameters: replicated, the one-process values
            if "experts." not in name:
                assert torch.equal(p, whole.get_parameter(name)), name


def _plan(tmp_path, cfg, *args) -> dict:
    path = tmp_path / "config.json"
    cfg.save(path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert (
            main(
                [
                    "plan",
                    "--config",
                    str(path),
                    "--seq-len",
                    "16",
                    "--precision",
                    "weights=fp32,grads=fp32,moments=fp32,router=fp32,master=none",
                    "--json",
                    *args,
                ]
            )
            == 0
        )
    return json.loads(out.getvalue())


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "pp,dp,ep,schedule",
    [(1, 1, 1, "1f1b"), (1, 4, 4, "1f1b"), (2, 2, 2, "1f1b"), (4, 2, 2, "dualpipev")],
    ids=["one-process", "dp4-ep4", "pp2-dp2-ep2", "dualpipev-pp4-dp2-ep2"],
)
def test_every_rank_holds_the_parameters_gradients_and_optimizer_bytes_dsv3_plan_gives(tmp_path, pp, dp, ep, schedule):
    """Weights (with the routing-bias and RoPE buffers), gradients and ZeRO-1 state of every rank equal
    ``dsv3 plan --json``'s device entry to the byte (optimizer: its ``optimizer_by_dp_rank``)."""
    cfg = small_config(num_hidden_layers=4, n_routed_experts=8, vocab_size=509)  # 509: uneven ZeRO-1 rows
    doc = _plan(
        tmp_path,
        cfg,
        "--pp",
        str(pp),
        "--dp",
        str(dp),
        "--ep",
        str(ep),
        "--schedule",
        schedule,
        "--global-batch",
        str(2 * pp * dp),
    )
    config = _train_config(pp=pp, ep=ep, pipeline=schedule)
    ndev = pipeline_devices(pp, schedule)
    for rank in range(ndev * dp):
        ctx = ParallelContext(rank=rank, world_size=1, pp=pp, dp=dp, ep=ep, pp_devices=ndev, schedule=schedule)
        model = _rank_model(cfg, ctx, config)
        opt = ZeroAdamW(model, ctx, names=[n for n, _ in model.named_parameters()])
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step(1.0)
        dev = doc["devices"][ctx.pp_rank]["memory_bytes"]
        weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
        by_rank = dev.get("optimizer_by_dp_rank") or [dev["optimizer"]] * dp
        assert (weights, grads, opt.state_bytes()) == (dev["weights"], dev["grads"], by_rank[ctx.dp_rank]), rank


def _tiny_model_and_batch():
    cfg = small_config()
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    return cfg, ids, torch.roll(ids, -1, 1)


@pytest.mark.parametrize("clip", [None, 1e-3], ids=["no-clip", "clipped"])
def test_zero_adamw_at_dp1_is_adamw(clip):
    """One process: ZeroAdamW(ParallelContext.single()) takes AdamW's steps (with clip_grad_norm when clipping),
    bit for bit without clipping, and its state dict is AdamW's (loads either way)."""
    from dsv3.optim import build_optimizer, clip_grad_norm

    cfg, ids, labels = _tiny_model_and_batch()
    ref, got = _eager(cfg), _eager(cfg)
    adamw = build_optimizer(ref, lr=1e-2, weight_decay=0.1)
    zero = ZeroAdamW(got, ParallelContext.single(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        for model in (ref, got):
            model(ids, labels).loss.backward()
        clip_grad_norm(list(ref.parameters()), clip)
        adamw.step()
        zero.step(clip)
        adamw.zero_grad(set_to_none=True)
        zero.zero_grad(set_to_none=True)
    for (name, p), q in zip(ref.named_parameters(), got.parameters()):
        if clip is None:
            assert torch.equal(p, q), name
        else:  # the norms differ in the last bits (FP32 vs row-wise float64 sums): so do the clip factors
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7, msg=name)
    want, have = adamw.state_dict(), zero.state_dict()
    assert [g["param_names"] for g in want["param_groups"]] == [g["param_names"] for g in have["param_groups"]]
    for i, st in want["state"].items():
        assert st["step"] == have["state"][i]["step"] and st["exp_avg"].shape == have["state"][i]["exp_avg"].shape
    fresh = ZeroAdamW(_eager(cfg), ParallelContext.single(), lr=1e-2)
    fresh.load_state_dict(want)  # a one-process AdamW checkpoint loads
    for i, st in fresh.state_dict()["state"].items():
        assert torch.equal(st["exp_avg_sq"], want["state"][i]["exp_avg_sq"])


def test_zero_adamw_at_dp1_keeps_bf16_masters_in_its_state_dict():
    cfg, ids, labels = _tiny_model_and_batch()
    model = _eager(cfg, torch.bfloat16)
    opt = ZeroAdamW(model, ParallelContext.single(), lr=1e-2)
    model(ids, labels).loss.backward()
    opt.step(1.0)
    sd = opt.state_dict()
    other = ZeroAdamW(_eager(cfg, torch.bfloat16), ParallelContext.single(), lr=1e-2)
    other.load_state_dict(sd)
    for a, b in zip(opt.shards, other.shards):
        assert torch.equal(a.master, b.master) and a.master.dtype == torch.float32


def test_sum_of_squares_matches_float64():
    torch.manual_seed(0)
    for t in (torch.randn(3000, 7), torch.randn(5), torch.randn(2048).to(torch.bfloat16), torch.randn(1500).double()):
        want = t.double().pow(2).sum()
        assert torch.isclose(sum_of_squares(t), want, rtol=1e-6 if t.dtype != torch.float64 else 1e-12), t.shape
    big = torch.randn(4_000_000)  # where one FP32 sum over the whole tensor drifts
    assert torch.isclose(sum_of_squares(big), big.double().pow(2).sum(), rtol=1e-6)


def test_init_from_reads_only_the_experts_a_rank_holds(tmp_path):
    """``parallelize(..., init_from=...)`` on an expert-parallel rank: the held tensors equal the checkpoint's,
    and of the routed experts only the rank's are read from the files."""
    from dsv3.model import hf

    cfg = small_config(n_routed_experts=8)
    whole = _eager(cfg)
    whole.save_pretrained(tmp_path / "ckpt")
    read: list[str] = []
    original = hf._Reader.get

    def counting(self, name, *args, **kwargs):
        read.append(name)
        return original(self, name, *args, **kwargs)

    ctx = ParallelContext(rank=1, world_size=1, dp=2, ep=2)
    model = build_meta_model(cfg, SEED + 1)  # another seed: every value must come from the checkpoint
    shard_experts(model, ctx, dispatcher="alltoall")
    materialize(model, torch.device("cpu"))
    hf._Reader.get = counting
    try:
        initialize(model, cfg, str(tmp_path / "ckpt"), partial=True)
    finally:
        hf._Reader.get = original
    experts = sorted({int(n.split(".experts.")[1].split(".")[0]) for n in read if ".experts." in n})
    assert experts == [4, 5, 6, 7]
    for name, t in model.state_dict().items():
        if name.endswith(("gate_up_proj", "down_proj")):
            assert torch.equal(t, whole.state_dict()[name][4:8]), name
        elif not name.endswith("inv_freq"):
            assert torch.equal(t, whole.state_dict()[name]), name


def test_gradient_buckets_are_bounded_and_keep_the_order():
    from types import SimpleNamespace

    from dsv3.parallel.zero import _buckets

    sizes = [3, 4, 10, 1, 1, 2, 5]
    shards = [SimpleNamespace(param=torch.zeros(n)) for n in sizes]
    got = [[s.param.numel() for s in b] for b in _buckets(shards, 5)]
    assert got == [[3], [4], [10], [1, 1, 2], [5]]  # at most 5 elements, or one larger gradient alone
