"""convert() on the real dsv3 model (DeepseekV3ForCausalLM with the Hugging Face DeepSeek-V3 module names):
MLA projections, a dense MLP, an MoE with a router, stacked experts and shared experts, an MTP module
and the output head."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import small_config

from dsv3.errors import ConfigError
from dsv3.fp8 import FP8Linear, FP8Recipe, convert
from dsv3.fp8.linear import FP8GroupedMM, FP8SwiGLU
from dsv3.model import DeepseekV3ForCausalLM
from dsv3.model.moe import Router
from dsv3.model.norm import RMSNorm

# Two blocks (dense, then MoE) and one MTP module; d = 192 is not a multiple of the 128-wide FP8 tiles.
CONFIG = small_config(num_hidden_layers=2, hidden_size=192, vocab_size=100)
V = CONFIG.vocab_size


class RealModel(DeepseekV3ForCausalLM):
    """The real model with a ``loss(ids)`` shortcut (main + lambda * MTP + balance)."""

    def __init__(self):
        super().__init__(CONFIG)

    def loss(self, ids):
        return self(ids, ids).loss


EMU = FP8Recipe(backend="emulated")

FP8_LINEARS = (
    [
        f"{p}.{n}"
        for p in ("model.layers.0.self_attn", "model.layers.1.self_attn", "mtp.0.self_attn")
        for n in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
    ]
    + [
        f"{p}.{n}"
        for p in ("model.layers.0.mlp", "model.layers.1.mlp.shared_experts", "mtp.0.mlp.shared_experts")
        for n in ("gate_proj", "up_proj", "down_proj")
    ]
    + ["mtp.0.eh_proj"]
)


def test_convert_swaps_the_block_linears_and_keeps_the_rest_high_precision():
    torch.manual_seed(0)
    model = RealModel()
    params_before = dict(model.named_parameters())
    keys_before = list(model.state_dict())
    assert convert(model, EMU) is model
    modules = dict(model.named_modules())
    for name in FP8_LINEARS:
        assert isinstance(modules[name], FP8Linear), name
    assert type(modules["lm_head"]) is nn.Linear
    assert type(modules["model.embed_tokens"]) is nn.Embedding
    assert type(modules["model.layers.1.mlp.gate"]) is Router
    assert type(modules["model.norm"]) is RMSNorm
    remaining = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert remaining == ["lm_head"]
    # o_proj inputs are cached in E5M6, every other Linear in E4M3
    for name in FP8_LINEARS:
        assert modules[name].input_cache == ("e5m6" if name.endswith("o_proj") else "e4m3")
    # experts and MLPs use the FP8 grouped GEMM and SwiGLU
    for p in ("model.layers.1.mlp.experts", "mtp.0.mlp.experts"):
        assert isinstance(modules[p].mm, FP8GroupedMM) and isinstance(modules[p].act, FP8SwiGLU)
    for p in ("model.layers.0.mlp", "model.layers.1.mlp.shared_experts"):
        assert isinstance(modules[p].act, FP8SwiGLU)
    # same Parameter objects, same state-dict keys: master weights and optimiser states untouched
    assert list(model.state_dict()) == keys_before
    for name, p in model.named_parameters():
        assert p is params_before[name]


def test_convert_is_idempotent():
    torch.manual_seed(1)
    model = convert(RealModel(), EMU)
    ids = torch.randint(0, V, (2, 33))
    with torch.no_grad():
        before = model.loss(ids)
    structure = [(n, type(m)) for n, m in model.named_modules()]
    convert(model, EMU)
    assert [(n, type(m)) for n, m in model.named_modules()] == structure
    with torch.no_grad():
        assert torch.equal(model.loss(ids), before)
    recipe = FP8Recipe(backend="emulated", scale_format="ue8m0")
    convert(model, recipe)
    assert model.model.layers[0].self_attn.q_a_proj.recipe is recipe  # re-converting updates the recipe


def test_convert_works_on_the_meta_device():
    with torch.device("meta"):
        model = RealModel()
    convert(model, EMU)
    assert isinstance(model.model.layers[1].self_attn.o_proj, FP8Linear)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_converted_model_trains_close_to_fp32():
    torch.manual_seed(2)
    ref = RealModel()
    fp8 = RealModel()
    fp8.load_state_dict(ref.state_dict())
    convert(fp8, EMU)
    ids = torch.randint(0, V, (2, 65))
    l_ref, l_fp8 = ref.loss(ids), fp8.loss(ids)
    assert abs(l_fp8.item() - l_ref.item()) / l_ref.item() < 0.01
    l_ref.backward()
    l_fp8.backward()
    cosines = []
    for (name, p_ref), p_fp8 in zip(ref.named_parameters(), fp8.parameters(), strict=True):
        assert p_fp8.grad is not None, name
        assert p_fp8.grad.dtype == torch.float32
        cos = F.cosine_similarity(p_ref.grad.flatten(), p_fp8.grad.flatten(), dim=0).item()
        assert cos > 0.9, (name, cos)  # routers: a near-tie top-k choice may flip for a few tokens
        cosines.append(cos)
    assert torch.tensor(cosines).median().item() > 0.99


def test_excluding_more_modules_and_scope_errors():
    model = convert(RealModel(), FP8Recipe(backend="emulated", exclude=("lm_head", "*.gate", "*.kv_b_proj")))
    assert type(model.model.layers[0].self_attn.kv_b_proj) is nn.Linear
    assert isinstance(model.model.layers[0].self_attn.q_b_proj, FP8Linear)
    with pytest.raises(ConfigError, match="found no nn.Linear"):
        convert(nn.Sequential(nn.Linear(4, 4)), EMU)


@pytest.mark.parametrize("kwargs", [{"backend": "tpu"}, {"scale_format": "e8m0"}, {"attn_out_format": "bf16"}])
def test_bad_recipe_is_a_config_error(kwargs):
    with pytest.raises(ConfigError):
        FP8Recipe(**kwargs)
