"""AdamW (FP32 and BF16 moments), parameter groups, gradient clipping and state round trips."""

import copy
import io

import pytest
import torch
from torch import nn

from dsv3.errors import ConfigError
from dsv3.train.optim import (
    AdamW,
    build_optimizer,
    clip_grad_norm,
    optimizer_state_bytes,
    param_groups,
    resolve_moments_dtype,
    set_lr,
)

BETAS = (0.9, 0.95)


# A miniature of the Hugging Face DeepSeek-V3 module tree, so parameter names are the real ones.
class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_a_proj = nn.Linear(d, d, bias=False)
        self.kv_a_layernorm = RMSNorm(d)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        return self.o_proj(self.kv_a_layernorm(self.q_a_proj(x)))


class Experts(nn.Module):
    def __init__(self, n, d, i):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(n, 2 * i, d) / d**0.5)
        self.down_proj = nn.Parameter(torch.randn(n, d, i) / i**0.5)

    def forward(self, x):  # every expert on every token, mean over experts (enough for gradients)
        h = torch.einsum("td,eid->tei", x, self.gate_up_proj)
        g, u = h.chunk(2, dim=-1)
        return torch.einsum("tei,edi->td", torch.nn.functional.silu(g) * u, self.down_proj) / self.gate_up_proj.shape[0]


class Router(nn.Module):
    def __init__(self, n, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, d) / d**0.5)
        self.register_buffer("e_score_correction_bias", torch.zeros(n))

    def forward(self, x):
        return torch.sigmoid(x @ self.weight.t() + self.e_score_correction_bias)


class MoE(nn.Module):
    def __init__(self, d, n=4, i=6):
        super().__init__()
        self.gate = Router(n, d)
        self.experts = Experts(n, d, i)

    def forward(self, x):
        return self.experts(x) * self.gate(x).mean(-1, keepdim=True)


class Layer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.input_layernorm = RMSNorm(d)
        self.self_attn = Attention(d)
        self.post_attention_layernorm = RMSNorm(d)
        self.mlp = MoE(d)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Inner(nn.Module):
    def __init__(self, vocab, d, n_layers):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Layer(d) for _ in range(n_layers))
        self.norm = RMSNorm(d)


class MTPBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.enorm = RMSNorm(d)
        self.hnorm = RMSNorm(d)
        self.eh_proj = nn.Linear(2 * d, d, bias=True)


class TinyDSV3(nn.Module):
    def __init__(self, vocab=17, d=8, n_layers=2):
        super().__init__()
        self.model = Inner(vocab, d, n_layers)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.mtp = nn.ModuleList([MTPBlock(d)])

    def forward(self, ids):
        h = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            h = layer(h)
        logits = self.lm_head(self.model.norm(h))
        e = self.mtp[0].enorm(self.model.embed_tokens(ids))
        h2 = self.mtp[0].eh_proj(torch.cat([e, self.mtp[0].hnorm(h)], -1))
        return logits, self.lm_head(h2)


def loss_fn(model, ids):
    logits, mtp = model(ids)
    ce = nn.functional.cross_entropy
    return ce(logits[:-1], ids[1:]) + 0.3 * ce(mtp[:-2], ids[2:])


def make_model(seed=0):
    torch.manual_seed(seed)
    return TinyDSV3()


def batches(n, seed=1, length=12, vocab=17):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g) for _ in range(n)]


def test_param_groups_follow_the_report_rule():
    model = make_model()
    model.model.layers[1].self_attn.o_proj.weight.requires_grad_(False)  # frozen: skipped
    groups = param_groups(model, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    decay = {n for n, _ in groups[0]["params"]}
    no_decay = {n for n, _ in groups[1]["params"]}
    expected_decay = {"lm_head.weight", "mtp.0.eh_proj.weight"}
    expected_no_decay = {
        "model.embed_tokens.weight",
        "model.norm.weight",
        "mtp.0.enorm.weight",
        "mtp.0.hnorm.weight",
        "mtp.0.eh_proj.bias",
    }
    for i in range(2):
        p = f"model.layers.{i}."
        expected_decay |= {
            p + "self_attn.q_a_proj.weight",
            p + "mlp.gate.weight",
            p + "mlp.experts.gate_up_proj",
            p + "mlp.experts.down_proj",
        }
        expected_no_decay |= {
            p + "input_layernorm.weight",
            p + "post_attention_layernorm.weight",
            p + "self_attn.kv_a_layernorm.weight",
        }
    expected_decay.add("model.layers.0.self_attn.o_proj.weight")
    assert decay == expected_decay
    assert no_decay == expected_no_decay
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decay | no_decay == trainable and not decay & no_decay
    assert not any("e_score_correction_bias" in n for n in decay | no_decay)


@pytest.mark.parametrize("steps", [6])
def test_fp32_moments_match_torch_adamw(steps):
    ours_model, ref_model = make_model(), make_model()
    ours = build_optimizer(ours_model, lr=1e-2, weight_decay=0.1)
    # FP32 moments run torch's fused kernel; the reference is torch's AdamW with the same kernel
    # (semantics: decoupled decay, bias correction, the changing learning rate below).
    ref = torch.optim.AdamW(param_groups(ref_model, 0.1), lr=1e-2, betas=BETAS, eps=1e-8, fused=True)
    for step, ids in enumerate(batches(steps)):
        lr = 1e-2 * (step + 1) / steps  # a changing learning rate, as the schedule sets it
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            set_lr(opt, lr)
            opt.zero_grad()
            loss_fn(model, ids).backward()
            opt.step()
    for (name, a), b in zip(ours_model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    for a, b in zip(ours_model.parameters(), ref_model.parameters()):
        sa, sb = ours.state[a], ref.state[b]
        assert sa["exp_avg"].dtype == torch.float32
        assert sa["step"] == int(sb["step"]) == steps
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=1e-6, atol=1e-12)


def _bf16_round_is_ambiguous(x64):
    """Elements whose FP64 value is so close to a BF16 rounding midpoint that FP32 arithmetic may round either way."""
    return (x64 * (1 - 1e-6)).to(torch.bfloat16) != (x64 * (1 + 1e-6)).to(torch.bfloat16)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled-kernel", "eager-fallback"])
def test_bf16_moments_are_fp64_moments_rounded_each_step(compiled):
    model = make_model()
    lr, wd, eps = 1e-2, 0.1, 1e-8
    opt = build_optimizer(model, lr=lr, weight_decay=wd, eps=eps, moments_dtype="bf16")
    opt._compiled_ok = compiled  # False: the multi-tensor path of machines without a compiler
    b1, b2 = BETAS
    ambiguous = total = 0
    for ids in batches(6):
        opt.zero_grad()
        loss_fn(model, ids).backward()
        before = {}
        for group in opt.param_groups:
            for p in group["params"]:
                st = opt.state.get(p, {})
                m = st["exp_avg"].double() if st else torch.zeros_like(p, dtype=torch.float64)
                v = st["exp_avg_sq"].double() if st else torch.zeros_like(p, dtype=torch.float64)
                before[p] = (
                    p.detach().double().clone(),
                    p.grad.double(),
                    m,
                    v,
                    st.get("step", 0) + 1,
                    group["weight_decay"],
                )
        opt.step()
        for p, (p0, g, m0, v0, t, decay) in before.items():
            m64 = b1 * m0 + (1 - b1) * g
            v64 = b2 * v0 + (1 - b2) * g * g
            st = opt.state[p]
            assert st["exp_avg"].dtype == torch.bfloat16 and st["exp_avg_sq"].dtype == torch.bfloat16
            for stored, exact in ((st["exp_avg"], m64), (st["exp_avg_sq"], v64)):
                amb = _bf16_round_is_ambiguous(exact)
                rounded = exact.to(torch.bfloat16)
                assert torch.equal(stored[~amb], rounded[~amb])
                ambiguous += int(amb.sum())
                total += exact.numel()
            # Parameters are FP32 and updated from the unrounded moments of this step.
            p64 = p0 * (1 - lr * decay) - lr / (1 - b1**t) * m64 / ((v64 / (1 - b2**t)).sqrt() + eps)
            torch.testing.assert_close(p.detach().double(), p64, rtol=1e-5, atol=2e-6)
            assert p.dtype == torch.float32
    assert ambiguous < 0.01 * total  # the exemption covers only rounding ties


def test_bf16_moments_halve_optimizer_state_bytes():
    model = make_model()
    numel = sum(p.numel() for p in model.parameters())
    for dtype, per_param in (("fp32", 8), ("bf16", 4)):
        opt = build_optimizer(model, moments_dtype=dtype)
        assert optimizer_state_bytes(opt) == 0
        loss_fn(model, batches(1)[0]).backward()
        opt.step()
        assert optimizer_state_bytes(opt) == per_param * numel
        model.zero_grad()


@pytest.mark.parametrize("moments", ["fp32", "bf16"])
def test_state_dict_round_trip_resumes_bit_for_bit(moments):
    data = batches(8)
    model = make_model()
    opt = build_optimizer(model, lr=3e-3, moments_dtype=moments)

    def train(model, opt, chunk):
        losses = []
        for ids in chunk:
            opt.zero_grad()
            loss = loss_fn(model, ids)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    train(model, opt, data[:4])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buf)
    reference = train(model, opt, data[4:])

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed_model = make_model(seed=123)  # different init, overwritten by the checkpoint
    resumed_model.load_state_dict(saved["model"])
    resumed = build_optimizer(resumed_model, lr=3e-3, moments_dtype=moments)
    resumed.load_state_dict(saved["optim"])
    want = torch.bfloat16 if moments == "bf16" else torch.float32
    assert all(s["exp_avg"].dtype == want and s["exp_avg_sq"].dtype == want for s in resumed.state.values())
    assert all(isinstance(s["step"], int) and s["step"] == 4 for s in resumed.state.values())
    assert train(resumed_model, resumed, data[4:]) == reference
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def test_parameters_without_gradients_are_left_alone():
    model = make_model()
    opt = build_optimizer(model)
    before = model.mtp[0].eh_proj.weight.detach().clone()
    logits, _ = model(batches(1)[0])  # MTP branch unused: its parameters get no gradient
    logits.sum().backward()
    opt.step()
    assert torch.equal(model.mtp[0].eh_proj.weight, before)
    assert model.mtp[0].eh_proj.weight not in opt.state


def test_clip_grad_norm_returns_pre_clip_norm_and_scales():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(7)), nn.Parameter(torch.randn(2))]
    params[2].grad = None
    for p in params[:2]:
        p.grad = torch.randn_like(p) * 3
    grads64 = [p.grad.double().clone() for p in params[:2]]
    norm64 = torch.sqrt(sum((g * g).sum() for g in grads64))
    norm = clip_grad_norm(params, 1.0)
    assert norm.dtype == torch.float32 and norm.ndim == 0
    torch.testing.assert_close(norm.double(), norm64, rtol=1e-6, atol=0)
    clipped = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params[:2]))
    torch.testing.assert_close(clipped, torch.tensor(1.0, dtype=torch.float64), rtol=1e-5, atol=0)
    for p, g in zip(params[:2], grads64):  # direction kept
        torch.testing.assert_close(p.grad.double(), g / norm64 * clipped, rtol=1e-5, atol=1e-7)
    # Below the threshold, or with no threshold: unchanged.
    before = [p.grad.clone() for p in params[:2]]
    assert clip_grad_norm(params, 100.0) == clip_grad_norm(params, None)
    assert all(torch.equal(p.grad, b) for p, b in zip(params[:2], before))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_clip_grad_norm_leaves_non_finite_gradients_for_the_skip_logic(bad):
    p, q = nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, bad, 2.0, 3.0])
    q.grad = torch.full((3,), 10.0)
    norm = clip_grad_norm([p, q], 1.0)
    assert not torch.isfinite(norm)
    assert torch.equal(q.grad, torch.full((3,), 10.0))  # untouched, not NaN-poisoned


def test_clip_grad_norm_without_gradients_is_zero():
    assert float(clip_grad_norm([nn.Parameter(torch.ones(2))], 1.0)) == 0.0


def test_bad_settings_raise_one_sentence_config_errors():
    model = make_model()
    for kwargs in (
        {"moments_dtype": "fp16"},
        {"betas": (0.9, 1.5)},
        {"lr": -1.0},
        {"eps": 0.0},
        {"weight_decay": float("nan")},
    ):
        with pytest.raises(ConfigError) as info:
            build_optimizer(model, **kwargs)
        message = str(info.value)
        assert "\n" not in message and message.count(". ") == 0
    frozen = copy.deepcopy(model).requires_grad_(False)
    with pytest.raises(ConfigError):
        build_optimizer(frozen)
    assert resolve_moments_dtype("BF16") is torch.bfloat16 and resolve_moments_dtype(torch.float32) is torch.float32


def test_load_state_dict_casts_to_configured_precision():
    model = make_model()
    opt = build_optimizer(model, moments_dtype="bf16")
    loss_fn(model, batches(1)[0]).backward()
    opt.step()
    sd = opt.state_dict()
    assert sd["moments_dtype"] == "bfloat16"
    fp32 = AdamW(param_groups(model, 0.1), moments_dtype=torch.float32)
    fp32.load_state_dict(sd)
    for p in model.parameters():
        assert fp32.state[p]["exp_avg"].dtype == torch.float32
        assert torch.equal(fp32.state[p]["exp_avg"], opt.state[p]["exp_avg"].float())  # exact widening
