"""The Checkpointer: a rank reads only what it holds (``--init-from`` a Hugging Face checkpoint, FP8 too),
ZeRO-1 state is saved as each rank's own chunks, and the one-process ZeRO-1 state is AdamW's."""

from __future__ import annotations

import glob
import json
import math
import os
import re

import pytest
import torch
from dist_helpers import run_ranks
from helpers import small_config
from safetensors import safe_open
from test_parallel_checkpoint import _steps
from test_parallel_ep import ALPHA, GAMMA, OPT, _batch, _config, _reference

STEPS = 3
EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.")
_SIZE = {"F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "I64": 8}


def _header_bytes(path, keep) -> tuple[int, int]:
    """(bytes of the tensors ``keep(name)`` selects, bytes of all tensors), from the safetensors headers."""
    kept = total = 0
    for f in glob.glob(os.path.join(path, "*.safetensors")):
        with safe_open(f, framework="pt") as sf:
            for name in sf.keys():
                sl = sf.get_slice(name)
                n = math.prod(sl.get_shape()) * _SIZE[sl.get_dtype()]
                total += n
                kept += n if keep(name) else 0
    return kept, total


def _held_by(first: int, n_local: int, n_layers: int, absent_layers=()):
    """Which checkpoint tensors a rank holding experts ``[first, first + n_local)`` reads (written from the
    layout rules, not from the loader): every dense tensor of its layers and its own experts; not the
    copies of the embedding / head that the official layout repeats in each MTP layer."""

    def keep(name: str) -> bool:
        layer = re.match(r"model\.layers\.(\d+)\.(.*)", name)
        if layer and int(layer.group(1)) in absent_layers:
            return False
        if (
            layer
            and int(layer.group(1)) >= n_layers
            and layer.group(2) in ("embed_tokens.weight", "shared_head.head.weight")
        ):
            return False
        e = EXPERT.search(name)
        return e is None or first <= int(e.group(1)) < first + n_local

    return keep


def _init_from_worker(rank: int, world: int, path: str):
    from dsv3.model import DeepseekV3ForCausalLM
    from dsv3.parallel.checkpointer import Checkpointer
    from dsv3.parallel.dispatch import shard_experts
    from dsv3.parallel.world import init_parallel
    from dsv3.parallel.zero import ZeroAdamW

    ctx = init_parallel(dp=world, ep=world, n_routed_experts=_config().n_routed_experts)
    model = DeepseekV3ForCausalLM(_config())
    model.reset_parameters(seed=123)  # other values than the checkpoint's: every tensor must be overwritten
    model = shard_experts(model, ctx, dispatcher="alltoall")
    read = Checkpointer.init_from(path, model)
    losses = _steps(ctx, model, ZeroAdamW(model, ctx, **OPT), range(STEPS), None, world=world, alpha=ALPHA, gamma=GAMMA)
    return read, ctx.expert_block(_config().n_routed_experts), losses


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_init_from_under_ep4_reads_only_each_ranks_share_and_trains_the_losses_of_one_process(tmp_path):
    from test_parallel_ep import _model

    from dsv3.checkpoint.state import from_pretrained
    from dsv3.model.hf import save_pretrained

    save_pretrained(_model(), tmp_path, max_shard_size="40KB")  # several shards: the index is followed too
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    results = run_ranks(_init_from_worker, 4, 4, str(tmp_path), timeout=140)
    want = _reference(4, from_pretrained(str(tmp_path)))["losses"][:STEPS]
    cfg = _config()
    for read, (first, end), losses in results:
        share, total = _header_bytes(tmp_path, _held_by(first, end - first, cfg.num_hidden_layers))
        assert read == share < 0.8 * total  # its experts and the replicated tensors, nothing else
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(want), rtol=1e-5, atol=1e-6)


def _fp8_checkpoint(path, config):
    """An FP8 (E4M3, 128x128 blocks) copy of a random model's checkpoint and the float64 reference of q * s."""
    from safetensors.torch import load_file, save_file

    from dsv3.model import DeepseekV3ForCausalLM
    from dsv3.model.hf import save_pretrained

    model = DeepseekV3ForCausalLM(config)
    model.reset_parameters(seed=7)
    save_pretrained(model, path)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    reference = {}
    for name in list(tensors):
        t = tensors[name]
        if t.dim() == 2 and name.endswith("proj.weight"):
            m, n = t.shape
            scale = torch.rand(-(-m // 128), -(-n // 128)) * 1e-3 + 1e-4
            full = scale.repeat_interleave(128, 0)[:m].repeat_interleave(128, 1)[:, :n]
            tensors[name] = (t / full).clamp(-448, 448).to(torch.float8_e4m3fn)
            tensors[name[: -len("weight")] + "weight_scale_inv"] = scale
            reference[name] = tensors[name].double() * full.double()
    save_file(tensors, os.path.join(path, "model.safetensors"))
    cfg = json.loads(open(os.path.join(path, "config.json")).read())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    return reference


def test_partial_load_of_an_fp8_checkpoint_reads_and_dequantises_only_the_held_block(tmp_path):
    """A rank holding experts 2..3 of 8 and not layer 2 (another pipeline stage's) reads exactly those tensors
    (FP8 weights with their inverse scales) and gets q * s of each, checked against float64."""
    from dsv3.model import DeepseekV3ForCausalLM, Experts
    from dsv3.model.hf import load_state_into

    config = small_config(hidden_size=160, q_lora_rank=144)
    reference = _fp8_checkpoint(tmp_path, config)
    config.quantization_config = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    model = DeepseekV3ForCausalLM(config)
    for moe in model.moe_layers():
        old = moe.experts
        moe.experts = Experts(2, old.gate_up_proj.shape[2], old.down_proj.shape[2], expert_offset=2)
    model.model.layers[2] = torch.nn.Identity()  # a layer this rank does not hold
    read = load_state_into(model, str(tmp_path), partial=True)
    share, total = _header_bytes(tmp_path, _held_by(2, 2, config.num_hidden_layers, absent_layers=(2,)))
    assert read == share < 0.7 * total
    state = model.state_dict()
    for name, ref in reference.items():
        e = EXPERT.search(name)
        layer = int(name.split(".")[2])
        if layer == 2 or layer >= config.num_hidden_layers or (e and not 2 <= int(e.group(1)) < 4):
            continue
        if e:
            mod = name[: e.start()] + ".mlp.experts."
            i, proj = int(e.group(1)) - 2, name.rsplit(".", 2)[1]
            inter = config.moe_intermediate_size
            got = {
                "down_proj": state[mod + "down_proj"][i],
                "gate_proj": state[mod + "gate_up_proj"][i, :inter],
                "up_proj": state[mod + "gate_up_proj"][i, inter:],
            }[proj]
        else:
            got = state[name]
        torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=0)


def _save_worker(rank: int, world: int, path: str):
    from test_parallel_ep import _model

    from dsv3.parallel.checkpoint import save_sharded
    from dsv3.parallel.dispatch import shard_experts
    from dsv3.parallel.world import init_parallel
    from dsv3.parallel.zero import ZeroAdamW

    ctx = init_parallel(dp=world, ep=world, n_routed_experts=_config().n_routed_experts)
    model = shard_experts(_model(), ctx, dispatcher="alltoall")
    opt = ZeroAdamW(model, ctx, **OPT)
    _steps(ctx, model, opt, range(1), None, world=world)
    save_sharded(path, 1, model=model, optimizer=opt, ctx=ctx, extra={"loader": None})
    return {s.name: s.bounds for s in opt.shards if not s.expert}


@pytest.mark.timeout(90)
def test_zero1_state_is_saved_as_each_ranks_own_chunks(tmp_path):
    """Nothing is gathered: DCP's metadata holds one chunk per rank at the rank's row offset."""
    from torch.distributed.checkpoint import FileSystemReader

    bounds = run_ranks(_save_worker, 2, 2, str(tmp_path), timeout=80)[0]
    md = FileSystemReader(str(tmp_path / "dcp-00000001")).read_metadata().state_dict_metadata
    name = "model.embed_tokens.weight"
    for kind in ("master", "exp_avg", "exp_avg_sq"):
        chunks = sorted(tuple(c.offsets) for c in md[f"optim/{name}/{kind}"].chunks)
        assert chunks == [(start, 0) for start, _ in bounds[name]]
    assert len(md[f"model/{name}"].chunks) == 1  # a replicated parameter: written once


def test_one_process_zero1_state_is_adamws(tmp_path):
    """At dp = 1 ZeroAdamW's state_dict is AdamW's (moments shaped like the parameters, same order),
    so a one-process checkpoint is the same whichever optimizer wrote it; and it loads back."""
    from test_parallel_ep import _model

    from dsv3.optim import build_optimizer
    from dsv3.parallel.world import ParallelContext
    from dsv3.parallel.zero import ZeroAdamW

    models = [_model(), _model()]
    plain, zero = build_optimizer(models[0], **OPT), ZeroAdamW(models[1], ParallelContext.single(), **OPT)
    ids, labels = _batch(1, 0)
    for model, opt in zip(models, (plain, zero)):
        model(ids, labels).loss.backward()
        opt.step()
    want, got = plain.state_dict(), zero.state_dict()
    assert [g["param_names"] for g in got["param_groups"]] == [g["param_names"] for g in want["param_groups"]]
    for i, st in want["state"].items():
        assert got["state"][i]["step"] == st["step"]
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got["state"][i][k], st[k], rtol=1e-6, atol=1e-9)
    fresh = ZeroAdamW(_model(), ParallelContext.single(), **OPT)
    fresh.load_state_dict(want)
    for i, st in fresh.state_dict()["state"].items():
        assert torch.equal(st["exp_avg_sq"], want["state"][i]["exp_avg_sq"])


def _load_worker(rank: int, world: int, path: str):
    """Load the dp2 x ep2 checkpoint at dp2 x ep2 and record what each rank asks DCP for."""
    import torch.distributed.checkpoint as dcp
    from test_parallel_ep import _model

    from dsv3.parallel.checkpoint import RowChunk, load_sharded
    from dsv3.parallel.dispatch import shard_experts
    from dsv3.parallel.world import init_parallel
    from dsv3.parallel.zero import ZeroAdamW

    asked = {}
    real = dcp.load

    def spy(state, **kwargs):
        asked.update(
            {k: (tuple(v.offsets), tuple(v.local.shape)) if isinstance(v, RowChunk) else None for k, v in state.items()}
        )
        return real(state, **kwargs)

    dcp.load = spy
    ctx = init_parallel(dp=world, ep=world, n_routed_experts=_config().n_routed_experts)
    model = shard_experts(_model(), ctx, dispatcher="alltoall")
    opt = ZeroAdamW(model, ctx, **OPT)
    load_sharded(os.path.join(path, "dcp-00000001"), model=model, optimizer=opt, ctx=ctx)
    return (
        asked,
        ctx.expert_block(_config().n_routed_experts),
        {s.name: s.bounds[ctx.dp_rank] for s in opt.shards if not s.expert},
    )


@pytest.mark.timeout(120)
def test_a_sharded_resume_asks_dcp_only_for_what_the_rank_holds(tmp_path):
    """DCP reads only the keys it is given: each rank gives its own experts and its own ZeRO-1 rows."""
    run_ranks(_save_worker, 2, 2, str(tmp_path), timeout=80)
    for asked, (first, end), dense_rows in run_ranks(_load_worker, 2, 2, str(tmp_path), timeout=80):
        experts = {int(m.group(1)) for k in asked if (m := re.search(r"\.experts\.(\d+)\.", k))}
        assert experts == set(range(first, end))  # model and optimizer keys of its experts only
        start, stop = dense_rows["model.embed_tokens.weight"]
        for kind in ("master", "exp_avg", "exp_avg_sq"):
            assert asked[f"optim/model.embed_tokens.weight/{kind}"] == (
                (start, 0),
                (stop - start, _config().hidden_size),
            )
