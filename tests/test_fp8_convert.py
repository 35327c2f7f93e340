"""convert() on a mock model with the Hugging Face DeepSeek-V3 module names and the dsv3 model protocol.

The mock (defined here, not shipped) has MLA projections, a dense MLP, an MoE with a router,
stacked experts with swappable ``mm``/``act`` and shared experts, an MTP module and an output head.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dsv3.errors import ConfigError
from dsv3.fp8 import FP8Linear, FP8Recipe, convert
from dsv3.fp8.linear import FP8GroupedMM, FP8SwiGLU

D, I_DENSE, I_MOE, E, TOPK, V = 192, 256, 96, 8, 2, 100


def swiglu(gate, up):
    return F.silu(gate) * up


def grouped_mm_loop(x, w, offs):
    out, start = [], 0
    for e, end in enumerate(offs.tolist()):
        out.append(x[start:end] @ w[e].t())
        start = end
    return torch.cat(out)


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Attention(nn.Module):
    def __init__(self, heads=4, dh=32, q_rank=96, kv_rank=64):
        super().__init__()
        self.heads, self.dh, self.kv_rank = heads, dh, kv_rank
        self.q_a_proj = nn.Linear(D, q_rank, bias=False)
        self.q_a_layernorm = RMSNorm(q_rank)
        self.q_b_proj = nn.Linear(q_rank, heads * dh, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, kv_rank + 16, bias=False)
        self.kv_a_layernorm = RMSNorm(kv_rank)
        self.kv_b_proj = nn.Linear(kv_rank, heads * 2 * dh, bias=False)
        self.o_proj = nn.Linear(heads * dh, D, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))).view(b, t, self.heads, self.dh).transpose(1, 2)
        kv = self.kv_b_proj(self.kv_a_layernorm(self.kv_a_proj_with_mqa(x)[..., : self.kv_rank]))
        k, v = kv.view(b, t, self.heads, 2 * self.dh).transpose(1, 2).split(self.dh, dim=-1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, inter):
        super().__init__()
        self.gate_proj = nn.Linear(D, inter, bias=False)
        self.up_proj = nn.Linear(D, inter, bias=False)
        self.down_proj = nn.Linear(inter, D, bias=False)
        self.act = swiglu

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x), self.up_proj(x)))


class Router(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, D) * 0.02)

    def forward(self, x):
        return torch.sigmoid(x @ self.weight.t())


class Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * I_MOE, D) * 0.05)
        self.down_proj = nn.Parameter(torch.randn(E, D, I_MOE) * 0.05)
        self.mm = grouped_mm_loop
        self.act = swiglu

    def forward(self, x_sorted, offs):
        gate, up = self.mm(x_sorted, self.gate_up_proj, offs).chunk(2, dim=-1)
        return self.mm(self.act(gate, up), self.down_proj, offs)


class MoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Router()
        self.experts = Experts()
        self.shared_experts = MLP(I_MOE)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, D)
        scores = self.gate(x)
        weights, idx = scores.topk(TOPK, dim=-1)
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)
        token = order // TOPK
        offs = torch.bincount(flat, minlength=E).cumsum(0).to(torch.int32)
        y = self.experts(x[token], offs) * weights.reshape(-1)[order, None]
        routed = torch.zeros_like(x).index_add(0, token, y)
        return (routed + self.shared_experts(x)).reshape(shape)


class Layer(nn.Module):
    def __init__(self, moe):
        super().__init__()
        self.input_layernorm = RMSNorm(D)
        self.self_attn = Attention()
        self.post_attention_layernorm = RMSNorm(D)
        self.mlp = MoE() if moe else MLP(I_DENSE)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(V, D)
        self.layers = nn.ModuleList([Layer(moe=False), Layer(moe=True)])
        self.norm = RMSNorm(D)


class SharedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = RMSNorm(D)


class MTPModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.enorm, self.hnorm = RMSNorm(D), RMSNorm(D)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self.layer = Layer(moe=True)
        self.shared_head = SharedHead()


class MockForCausalLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = Inner()
        self.lm_head = nn.Linear(D, V, bias=False)
        self.mtp = nn.ModuleList([MTPModule()])

    def forward(self, ids):
        h = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            h = layer(h)
        logits = self.lm_head(self.model.norm(h))
        m = self.mtp[0]
        e = m.enorm(self.model.embed_tokens(ids[:, 1:]))
        hm = m.layer(m.eh_proj(torch.cat([e, m.hnorm(h[:, :-1])], dim=-1)))
        mtp_logits = self.lm_head(m.shared_head.norm(hm))
        return logits, mtp_logits

    def loss(self, ids):
        logits, mtp_logits = self(ids)
        main = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
        mtp = F.cross_entropy(mtp_logits[:, :-1].reshape(-1, V), ids[:, 2:].reshape(-1))
        return main + 0.3 * mtp


EMU = FP8Recipe(backend="emulated")

FP8_LINEARS = [
    f"{p}.{n}"
    for p in ("model.layers.0.self_attn", "model.layers.1.self_attn", "mtp.0.layer.self_attn")
    for n in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
] + [
    f"{p}.{n}"
    for p in ("model.layers.0.mlp", "model.layers.1.mlp.shared_experts", "mtp.0.layer.mlp.shared_experts")
    for n in ("gate_proj", "up_proj", "down_proj")
] + ["mtp.0.eh_proj"]


def test_convert_swaps_the_block_linears_and_keeps_the_rest_high_precision():
    torch.manual_seed(0)
    model = MockForCausalLM()
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
    for p in ("model.layers.1.mlp.experts", "mtp.0.layer.mlp.experts"):
        assert isinstance(modules[p].mm, FP8GroupedMM) and isinstance(modules[p].act, FP8SwiGLU)
    for p in ("model.layers.0.mlp", "model.layers.1.mlp.shared_experts"):
        assert isinstance(modules[p].act, FP8SwiGLU)
    # same Parameter objects, same state-dict keys: master weights and optimiser states untouched
    assert list(model.state_dict()) == keys_before
    for name, p in model.named_parameters():
        assert p is params_before[name]


def test_convert_is_idempotent():
    torch.manual_seed(1)
    model = convert(MockForCausalLM(), EMU)
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
        model = MockForCausalLM()
    convert(model, EMU)
    assert isinstance(model.model.layers[1].self_attn.o_proj, FP8Linear)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_converted_model_trains_close_to_fp32():
    torch.manual_seed(2)
    ref = MockForCausalLM()
    fp8 = MockForCausalLM()
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
    model = convert(MockForCausalLM(), FP8Recipe(backend="emulated", exclude=("lm_head", "*.gate", "*.kv_b_proj")))
    assert type(model.model.layers[0].self_attn.kv_b_proj) is nn.Linear
    assert isinstance(model.model.layers[0].self_attn.q_b_proj, FP8Linear)
    with pytest.raises(ConfigError, match="found no nn.Linear"):
        convert(nn.Sequential(nn.Linear(4, 4)), EMU)


@pytest.mark.parametrize(
    "kwargs", [{"backend": "tpu"}, {"scale_format": "e8m0"}, {"attn_out_format": "bf16"}]
)
def test_bad_recipe_is_a_config_error(kwargs):
    with pytest.raises(ConfigError):
        FP8Recipe(**kwargs)
