"""FP8 Linear / grouped expert GEMM / SwiGLU: forward and every gradient against float64 math
on the dequantised operands, Parameter sharing, and the bytes cached for backward."""

import contextlib
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dsv3.fp8 import FP8Linear, FP8Recipe, fp8_grouped_mm, fp8_linear, fp8_swiglu
from dsv3.fp8.formats import round_e5m6
from dsv3.fp8.quant import quantize_act, quantize_tokens, quantize_weight

EMU = FP8Recipe(backend="emulated")


def f64(q):
    return q.dequantize(torch.float64)


def close(got, ref, tol=1e-5):
    err = ((got.double() - ref).norm() / ref.norm()).item()
    assert err < tol, err


@pytest.mark.parametrize("scale_format", ["fp32", "ue8m0"])
def test_fp8_linear_forward_and_gradients_match_float64_on_dequantised_operands(scale_format):
    torch.manual_seed(0)
    recipe = FP8Recipe(backend="emulated", scale_format=scale_format)
    pow2 = scale_format == "ue8m0"
    x = torch.randn(3, 70, 300, requires_grad=True)  # 210 tokens, 300 channels: nothing whole
    lin = nn.Linear(300, 136, bias=True)
    y = FP8Linear(lin, recipe)(x)
    dy = torch.randn_like(y)
    y.backward(dy)

    x2, dy2, w = x.detach().reshape(-1, 300), dy.reshape(-1, 136), lin.weight.detach()
    xq, wq = quantize_act(x2, pow2), quantize_weight(w, pow2)
    close(y.detach().reshape(-1, 136), f64(xq) @ f64(wq).t() + lin.bias.double())
    close(x.grad.reshape(-1, 300), f64(quantize_act(dy2, pow2)) @ f64(wq))
    close(lin.weight.grad, f64(quantize_tokens(dy2, pow2)).t() @ f64(quantize_tokens(x2, pow2)))
    close(lin.bias.grad, dy2.double().sum(0))
    assert lin.weight.grad.dtype == torch.float32
    # FP8-accurate against the exact float64 product too
    assert (
        (y.detach().double().reshape(-1, 136) - (x2.double() @ w.double().t() + lin.bias.double())).norm()
        / (x2.double() @ w.double().t()).norm()
    ).item() < 0.06


def test_attention_output_linear_caches_e5m6_and_retiles_for_wgrad():
    torch.manual_seed(1)
    x = torch.randn(256, 192, requires_grad=True)
    lin = nn.Linear(192, 64, bias=False)
    y = FP8Linear(lin, EMU, input_cache="e5m6")(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    xq = quantize_act(x.detach(), pow2=True)  # Fprop tiles use power-of-two scales
    wq = quantize_weight(lin.weight.detach())
    close(y.detach(), f64(xq) @ f64(wq).t())
    # Wgrad sees x rounded to E5M6 (scaled by the power-of-two tile scales), then token-tiled.
    s = xq.scale.repeat_interleave(128, 1)[:, :192]
    x_e5m6 = round_e5m6(x.detach() / s) * s
    close(lin.weight.grad, f64(quantize_tokens(dy)).t() @ f64(quantize_tokens(x_e5m6)))
    close(x.grad, f64(quantize_act(dy)) @ f64(wq))


def test_fp8_linear_shares_the_parameters_and_state_dict():
    lin = nn.Linear(130, 20, bias=False)
    f = FP8Linear(lin, EMU)
    assert f.weight is lin.weight and f.bias is None
    assert list(f.state_dict()) == list(lin.state_dict()) == ["weight"]
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2)
    f(torch.randn(5, 130)).sum().backward()
    opt.step()
    assert opt.state[lin.weight]["exp_avg"].dtype == torch.float32  # optimiser state untouched, FP32


def test_bf16_activations_keep_their_dtype():
    lin = nn.Linear(128, 256, bias=False)
    x = torch.randn(16, 128, dtype=torch.bfloat16, requires_grad=True)
    y = fp8_linear(x, lin.weight, recipe=EMU)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and lin.weight.grad.dtype == torch.float32


def test_nonfinite_inputs_are_not_hidden():
    lin = nn.Linear(128, 8, bias=False)
    x = torch.randn(4, 128)
    x[1, 5] = float("nan")
    y = fp8_linear(x, lin.weight, recipe=EMU)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2, 3]]).all()


def test_no_grad_forward_matches_and_caches_nothing():
    lin = nn.Linear(128, 8, bias=False)
    x = torch.randn(4, 128)
    with torch.no_grad():
        y0 = fp8_linear(x, lin.weight, recipe=EMU)
    torch.testing.assert_close(y0, fp8_linear(x, lin.weight, recipe=EMU).detach())


def test_grouped_mm_forward_and_gradients_match_float64():
    torch.manual_seed(2)
    e, o, k = 4, 96, 192
    offs = torch.tensor([50, 50, 210, 300], dtype=torch.int32)
    bounds = [(0, 50), (50, 50), (50, 210), (210, 300)]
    x = torch.randn(300, k, requires_grad=True)
    w = (torch.randn(e, o, k) * 0.05).requires_grad_()
    y = fp8_grouped_mm(x, w, offs, EMU)
    dy = torch.randn_like(y)
    y.backward(dy)
    wq = quantize_weight(w.detach())
    xd, wd = f64(quantize_act(x.detach())), f64(wq)
    dyd = f64(quantize_act(dy))
    for g, (s, t) in enumerate(bounds):
        if t == s:
            assert torch.all(w.grad[g] == 0)
            continue
        close(y.detach()[s:t], xd[s:t] @ wd[g].t())
        close(x.grad[s:t], dyd[s:t] @ wd[g])
        close(w.grad[g], f64(quantize_tokens(dy[s:t])).t() @ f64(quantize_tokens(x.detach()[s:t])))


def test_swiglu_output_is_exact_and_gradients_use_fp8_inputs():
    torch.manual_seed(3)
    gate = torch.randn(2, 40, 200, requires_grad=True)
    up = torch.randn(2, 40, 200, requires_grad=True)
    out = fp8_swiglu(gate, up, recipe=EMU)
    torch.testing.assert_close(out, F.silu(gate) * up)
    dy = torch.randn_like(out)
    out.backward(dy)
    g = f64(quantize_act(gate.detach().reshape(-1, 200))).reshape(gate.shape)
    u = f64(quantize_act(up.detach().reshape(-1, 200))).reshape(up.shape)
    sig = torch.sigmoid(g)
    close(gate.grad, dy.double() * u * (sig + g * sig * (1 - sig)))
    close(up.grad, dy.double() * g * sig)


def test_swiglu_with_routing_weights():
    torch.manual_seed(4)
    gate = torch.randn(50, 256, requires_grad=True)
    up = torch.randn(50, 256, requires_grad=True)
    w = torch.rand(50, 1, requires_grad=True)
    out = fp8_swiglu(gate, up, w, recipe=EMU)
    torch.testing.assert_close(out, F.silu(gate) * up * w)
    dy = torch.randn_like(out)
    out.backward(dy)
    g, u = f64(quantize_act(gate.detach())), f64(quantize_act(up.detach()))
    sig = torch.sigmoid(g)
    wd = w.detach().double()
    close(gate.grad, dy.double() * wd * u * (sig + g * sig * (1 - sig)))
    close(up.grad, dy.double() * wd * g * sig)
    close(w.grad, (dy.double() * g * sig * u).sum(-1, keepdim=True))


# --- Bytes saved for backward (saved-tensor hooks) ------------------------------------------


@contextlib.contextmanager
def saved_bytes(exclude=()):
    """Count the bytes of distinct tensors autograd saves for backward, parameters excluded."""
    skip = {t.data_ptr() for t in exclude}
    seen, total = set(), [0]

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip and ptr not in seen:
            seen.add(ptr)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


def test_fp8_linear_caches_about_half_the_bytes_of_bf16():
    torch.manual_seed(4)
    lin = nn.Linear(1024, 512, bias=False)
    x = torch.randn(512, 1024, requires_grad=True)
    with saved_bytes([lin.weight]) as bf16:
        F.linear(x.bfloat16(), lin.weight.bfloat16())  # the BF16 baseline saves its input
    with saved_bytes([lin.weight]) as fp8:
        y = FP8Linear(lin, EMU)(x)
    y.sum().backward()  # what was saved is enough for backward
    assert bf16[0] >= 512 * 1024 * 2
    ratio = fp8[0] / (512 * 1024 * 2)
    assert 0.5 <= ratio <= 0.53, ratio  # 1 byte + 4/128 bytes of scale per element
    with saved_bytes([lin.weight]) as e5m6:
        FP8Linear(lin, EMU, input_cache="e5m6")(x)
    assert 0.75 <= e5m6[0] / (512 * 1024 * 2) <= 0.78  # 12 bits + scales


def test_fp8_swiglu_caches_about_half_the_bytes_of_its_bf16_inputs():
    gate = torch.randn(512, 768, dtype=torch.bfloat16, requires_grad=True)
    up = torch.randn(512, 768, dtype=torch.bfloat16, requires_grad=True)
    with saved_bytes() as plain:
        F.silu(gate) * up  # plain autograd saves gate, up and silu(gate)
    with saved_bytes() as fp8:
        fp8_swiglu(gate, up, recipe=EMU)
    inputs_bf16 = 2 * 512 * 768 * 2
    assert plain[0] >= inputs_bf16
    assert 0.5 <= fp8[0] / inputs_bf16 <= 0.53


def test_fp8_grouped_mm_caches_about_half_the_bytes_of_bf16():
    e, o, k = 8, 256, 1024
    w = torch.randn(e, o, k, requires_grad=True)
    x = torch.randn(1000, k, requires_grad=True)
    offs = torch.tensor([100, 260, 300, 520, 600, 700, 990, 1000], dtype=torch.int32)
    with saved_bytes([w, offs]) as fp8:
        y = fp8_grouped_mm(x, w, offs, EMU)
    y.sum().backward()
    ratio = fp8[0] / (1000 * k * 2)
    # real rows only (1 byte each) + one FP32 scale per 128 rows of each group
    n_tiles = sum(math.ceil(n / 128) for n in [100, 160, 40, 220, 80, 100, 290, 10])
    assert fp8[0] == 1000 * k + n_tiles * k * 4
    assert ratio < 0.6


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_backend_matches_the_emulation_end_to_end():
    from dsv3.fp8.gemm import cuda_fp8_available

    if not cuda_fp8_available("cuda"):
        pytest.skip("needs a Hopper GPU with CUDA >= 12.9")
    torch.manual_seed(5)
    gpu = FP8Recipe(backend="cuda")
    emu = FP8Recipe(backend="emulated")
    x = torch.randn(300, 7168, device="cuda")
    w = (torch.randn(2048, 7168, device="cuda") * 0.01).requires_grad_()
    results = []
    for recipe in (gpu, emu):
        xi = x.clone().requires_grad_()
        w.grad = None
        y = fp8_linear(xi, w, recipe=recipe)
        y.backward(torch.ones_like(y))
        results.append((y.detach(), xi.grad, w.grad.clone()))
    for got, ref in zip(results[0], results[1], strict=True):
        assert ((got - ref).norm() / ref.norm()).item() < 1e-4
    offs = torch.tensor([0, 100, 250, 300], dtype=torch.int32, device="cuda")
    we = (torch.randn(4, 512, 7168, device="cuda") * 0.01).requires_grad_()
    outs = []
    for recipe in (gpu, emu):
        xi = x.clone().requires_grad_()
        we.grad = None
        y = fp8_grouped_mm(xi, we, offs, recipe)
        y.backward(torch.ones_like(y))
        outs.append((y.detach(), xi.grad, we.grad.clone()))
    for got, ref in zip(outs[0], outs[1], strict=True):
        assert ((got - ref).norm() / ref.norm()).item() < 1e-4


def test_storage_only_linear_is_exact_but_caches_fp8():
    """fp8_gemm=False: exact Fprop/Dgrad, Wgrad on the dequantised FP8 cache, same cached bytes."""
    from dsv3.fp8.quant import quantize_tokens

    recipe = FP8Recipe(backend="emulated", fp8_gemm=False)
    torch.manual_seed(5)
    x = torch.randn(2, 128, 200, requires_grad=True)  # 256 tokens: whole 128-token tiles
    w = torch.randn(150, 200, requires_grad=True)
    y = fp8_linear(x, w, recipe=recipe)
    torch.testing.assert_close(y, x @ w.t())
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.testing.assert_close(x.grad, dy @ w.detach())
    x_hat = f64(quantize_tokens(x.detach().reshape(-1, 200)))
    close(w.grad, dy.reshape(-1, 150).double().t() @ x_hat)
    with saved_bytes(exclude=[w]) as fp8_bytes:
        fp8_linear(x, w, recipe=recipe)
    assert fp8_bytes[0] < 0.55 * x.numel() * 2  # about half of a BF16 copy


def test_storage_only_grouped_mm_is_exact_forward():
    from dsv3.fp8.linear import fp8_grouped_mm

    recipe = FP8Recipe(backend="emulated", fp8_gemm=False)
    torch.manual_seed(6)
    counts = torch.tensor([40, 0, 90, 7])
    offs = counts.cumsum(0).to(torch.int32)
    x = torch.randn(int(counts.sum()), 128, requires_grad=True)
    w = torch.randn(4, 64, 128, requires_grad=True)
    y = fp8_grouped_mm(x, w, offs, recipe)
    ref, start = [], 0
    for e, c in enumerate(counts.tolist()):
        ref.append(x[start : start + c] @ w[e].t())
        start += c
    torch.testing.assert_close(y, torch.cat(ref))
    dy = torch.randn_like(y)
    y.backward(dy)
    start = 0
    for e, c in enumerate(counts.tolist()):
        torch.testing.assert_close(x.grad[start : start + c], dy[start : start + c] @ w.detach()[e])
        start += c
