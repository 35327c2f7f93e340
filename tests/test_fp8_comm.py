"""FP8 payloads for the MoE all-to-all: power-of-two scales, bytes, and the single-device stand-ins."""

import torch

from dsv3.fp8.comm import fp8_dispatch, fp8_grad_dispatch, quantize_for_dispatch, quantize_grad_for_dispatch
from dsv3.fp8.formats import cast_e4m3
from dsv3.fp8.gemm import fp8_mm
from dsv3.fp8.quant import quantize_act, quantize_weight


def test_dispatch_payload_uses_power_of_two_scales_and_half_the_bytes():
    torch.manual_seed(0)
    x = torch.randn(256, 7168, dtype=torch.bfloat16) * 3
    p = quantize_for_dispatch(x)
    assert p.data.dtype == torch.float8_e4m3fn and p.data.shape == (256, 7168)
    assert p.scale.dtype == torch.uint8 and p.scale.shape == (256, 56)
    scales = p.to_qtensor().scale.double()
    amax = x.double().reshape(256, 56, 128).abs().amax(-1)
    expect = 2.0 ** torch.ceil(torch.log2(amax / 448.0))
    assert torch.equal(scales, expect)  # UE8M0 decodes to exactly 2^ceil(log2(amax/448))
    ratio = p.nbytes() / (x.numel() * 2)
    assert 0.5 <= ratio <= 0.51  # 1 byte per element + 1 byte per 128


def test_payload_values_are_exact_e4m3_of_the_tokens_and_feed_the_gemm_directly():
    torch.manual_seed(1)
    x = torch.randn(64, 300)
    p = quantize_for_dispatch(x)
    q = p.to_qtensor()
    s = q.scale.repeat_interleave(128, 1)[:, :300]
    assert torch.equal(q.data[:, :300].view(torch.uint8), cast_e4m3(x / s).view(torch.uint8))
    w = quantize_weight(torch.randn(96, 300))
    # A receiver multiplies the payload without requantising: same as quantising there.
    ref = fp8_mm(quantize_act(x, pow2=True), w, backend="emulated")
    assert torch.equal(fp8_mm(q, w, backend="emulated"), ref)


def test_gradient_payload_has_the_same_format():
    dy = torch.randn(10, 256)
    a, b = quantize_grad_for_dispatch(dy), quantize_for_dispatch(dy)
    assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8)) and torch.equal(a.scale, b.scale)


def test_single_device_dispatch_rounds_forward_and_passes_gradients():
    torch.manual_seed(2)
    x = torch.randn(2, 8, 256, requires_grad=True)
    y = fp8_dispatch(x)
    assert torch.equal(y.detach(), quantize_for_dispatch(x.detach()).dequantize(x.dtype).reshape(x.shape))
    assert not torch.equal(y.detach(), x.detach())
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, g)  # combine-backward stays high precision


def test_single_device_gradient_dispatch_rounds_backward_only():
    torch.manual_seed(3)
    x = torch.randn(16, 256, requires_grad=True)
    y = fp8_grad_dispatch(x)
    assert torch.equal(y.detach(), x.detach())
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, quantize_grad_for_dispatch(g).dequantize(g.dtype))
