"""FP8 GEMM backends against float64 math, CUDA operand layouts, and the accumulation model."""

import pytest
import torch
import torch.nn.functional as F

from dsv3.errors import ConfigError
from dsv3.fp8.gemm import (
    cuda_fp8_available,
    fp8_mm,
    grouped_mm,
    grouped_wgrad,
    mm_limited_accumulation,
    resolve_backend,
    round_significand,
    scaled_mm_operands,
)
from dsv3.fp8.quant import group_padding, quantize_act, quantize_tokens, quantize_tokens_grouped, quantize_weight


def f64(q):
    return q.dequantize(torch.float64)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_fprop_dgrad_wgrad_layouts_match_float64_on_dequantised_operands():
    torch.manual_seed(0)
    m, k, n = 200, 300, 136  # none a multiple of 128
    x, w, dy = torch.randn(m, k), torch.randn(n, k) * 0.02, torch.randn(m, n)
    xq, wq, dyq = quantize_act(x), quantize_weight(w), quantize_act(dy)
    y = fp8_mm(xq, wq, backend="emulated")
    assert y.shape == (m, n) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), f64(xq) @ f64(wq).t(), rtol=1e-5, atol=1e-5)
    dx = fp8_mm(dyq, wq.t(), backend="emulated")
    torch.testing.assert_close(dx.double(), f64(dyq) @ f64(wq), rtol=1e-5, atol=1e-5)
    dyt, xt = quantize_tokens(dy), quantize_tokens(x)
    dw = fp8_mm(dyt.t(), xt.t(), backend="emulated")
    assert dw.shape == (n, k)
    torch.testing.assert_close(dw.double(), f64(dyt).t() @ f64(xt), rtol=1e-5, atol=1e-4)
    # and the FP8 result is an FP8-accurate approximation of the exact product
    assert rel(y, x.double() @ w.double().t()) < 0.06


def test_emulation_equals_fp32_promotion_every_128_elements():
    """sum over K-chunks of (s_a * s_b) * (q_a . q_b): the report's promotion, in float64."""
    torch.manual_seed(1)
    x, w = torch.randn(64, 384), torch.randn(96, 384)
    xq, wq = quantize_act(x), quantize_weight(w)
    qa, qb = xq.data.double(), wq.data.double()[:96]
    out = torch.zeros(64, 96, dtype=torch.float64)
    for c in range(3):
        sl = slice(128 * c, 128 * (c + 1))
        partial = qa[:, sl] @ qb[:, sl].t()  # exact: small integers times powers of two
        out += partial * xq.scale[:, c : c + 1].double() * wq.scale[0, c].double()
    # fp32 accumulation of 128 products: its rounding (which depends on the CPU's matmul kernel) is ~1e-5 here;
    # a wrong scale block or chunk boundary would be off by O(1).
    torch.testing.assert_close(fp8_mm(xq, wq, backend="emulated").double(), out, rtol=1e-5, atol=1e-4)


def test_out_dtype_and_mismatched_operands():
    xq, wq = quantize_act(torch.randn(4, 130)), quantize_weight(torch.randn(8, 130))
    assert fp8_mm(xq, wq, torch.bfloat16, backend="emulated").dtype == torch.bfloat16
    with pytest.raises(ValueError):
        fp8_mm(xq, quantize_weight(torch.randn(8, 256)), backend="emulated")
    with pytest.raises(ValueError):
        fp8_mm(wq, xq, backend="emulated")  # A must be in 1x128 tiles


def test_backend_selection_and_forcing():
    assert resolve_backend("auto", "cpu") == "emulated"
    assert resolve_backend("emulated", "cpu") == "emulated"
    assert not cuda_fp8_available("cpu")
    with pytest.raises(ConfigError, match="Hopper"):
        resolve_backend("cuda", "cpu")
    with pytest.raises(ConfigError, match="unknown FP8 backend"):
        resolve_backend("tpu", "cpu")


def _meta_scaled_mm(a, b):
    args = scaled_mm_operands(a, b)
    n = args.pop("n")
    out = F.scaled_mm(**args, output_dtype=torch.float32)  # PyTorch's meta kernel checks the layouts
    return out[:, :n]


@pytest.mark.parametrize("m,k,n", [(256, 512, 768), (200, 300, 136), (1, 7168, 2048), (37, 128, 16)])
def test_cuda_operands_pass_torch_layout_checks_on_meta(m, k, n):
    meta = "meta"
    x, w, dy = torch.empty(m, k, device=meta), torch.empty(n, k, device=meta), torch.empty(m, n, device=meta)
    xq, wq, dyq = quantize_act(x), quantize_weight(w), quantize_act(dy)
    assert _meta_scaled_mm(xq, wq).shape == (m, n)  # Fprop: 1x128 x 128x128
    assert _meta_scaled_mm(dyq, wq.t()).shape == (m, k)  # Dgrad: 1x128 x 128x128 (transposed blocks)
    dw = _meta_scaled_mm(quantize_tokens(dy).t(), quantize_tokens(x).t())  # Wgrad: 1x128 x 1x128
    assert dw.shape == (n, k)


def test_cuda_operand_scales_are_the_quantiser_scales():
    torch.manual_seed(2)
    xq, wq = quantize_act(torch.randn(40, 300)), quantize_weight(torch.randn(136, 300))
    args = scaled_mm_operands(xq, wq)
    assert args["scale_a"].stride() == (1, 40) and torch.equal(args["scale_a"], xq.scale)
    l4 = 4  # ceil(300/128) = 3 K-blocks padded to 4
    assert args["scale_b"].shape == (l4, 2) and args["scale_b"].stride() == (1, l4)
    assert torch.equal(args["scale_b"][:3], wq.scale.t())
    assert args["mat_b"].stride() == (1, 384)  # column-major
    dyt, xt = quantize_tokens(torch.randn(300, 20)), quantize_tokens(torch.randn(300, 40))
    args = scaled_mm_operands(dyt.t(), xt.t())
    assert args["mat_b"].shape == (384, 48)  # N = 40 rows padded to a multiple of 16
    assert torch.equal(args["scale_b"][:40], xt.scale.t()) and torch.all(args["scale_b"][40:] == 1)


def test_grouped_mm_and_wgrad_match_per_group_float64():
    torch.manual_seed(3)
    e, o, k = 4, 96, 200
    offs = [50, 50, 210, 300]
    x, w, dy = torch.randn(300, k), torch.randn(e, o, k), torch.randn(300, o)
    xq, wq = quantize_act(x), quantize_weight(w)
    out = grouped_mm(xq, wq, offs, backend="emulated")
    xd, wd = f64(xq), f64(wq)
    ref = torch.cat([xd[0:50] @ wd[0].t(), xd[50:210] @ wd[2].t(), xd[210:] @ wd[3].t()])
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)  # fp32 accumulation
    rows, padded = group_padding(offs)
    dyt = quantize_tokens_grouped(dy, rows, padded[-1])
    xt = quantize_tokens_grouped(x, rows, padded[-1])
    dw = grouped_wgrad(dyt, xt, padded, backend="emulated")
    assert dw.shape == (e, o, k) and torch.all(dw[1] == 0)  # the empty group gets no gradient
    for g, (s, t) in enumerate([(0, 50), (50, 50), (50, 210), (210, 300)]):
        if t > s:
            ref_g = f64(quantize_tokens(dy[s:t])).t() @ f64(quantize_tokens(x[s:t]))
            torch.testing.assert_close(dw[g].double(), ref_g, rtol=1e-5, atol=1e-4)


def test_round_significand_truncates_and_rounds():
    v = torch.tensor([1.0 + 2**-10 + 2**-12, -(1.0 + 2**-10 + 2**-12), 3.0], dtype=torch.float64)
    assert round_significand(v, 11, "truncate").tolist() == [1.0 + 2**-10, -(1.0 + 2**-10), 3.0]
    assert (
        round_significand(torch.tensor([1.0 + 3 * 2**-12], dtype=torch.float64), 11, "nearest").item() == 1.0 + 2**-10
    )


def test_accumulation_model_without_limits_is_exact():
    torch.manual_seed(4)
    a, b = quantize_act(torch.randn(4, 512)), quantize_act(torch.randn(5, 512))
    exact = f64(a) @ f64(b).t()
    got = mm_limited_accumulation(a, b, mantissa_bits=52, promote_interval=None)
    torch.testing.assert_close(got, exact, rtol=1e-12, atol=1e-12)


def test_promotion_removes_the_large_error_at_k_4096():
    """Report 3.3.2: ~14-bit accumulation gives errors of percents at K = 4096; promotion every 128 fixes it."""
    torch.manual_seed(5)
    k = 4096
    a, b = quantize_act(torch.rand(8, k)), quantize_act(torch.rand(8, k))
    exact = f64(a) @ f64(b).t()
    no_promo = ((mm_limited_accumulation(a, b, 14, None) - exact).abs() / exact.abs()).max().item()
    promo = ((mm_limited_accumulation(a, b, 14, 128) - exact).abs() / exact.abs()).max().item()
    assert no_promo > 0.01  # several percent
    assert promo < 0.003
    assert no_promo > 10 * promo


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and cuda_fp8_available("cuda")), reason="needs a Hopper GPU")
def test_cuda_backend_matches_emulation():
    torch.manual_seed(6)
    dev = "cuda"
    x, w, dy = (
        torch.randn(512, 7168, device=dev),
        torch.randn(2048, 7168, device=dev) * 0.02,
        torch.randn(512, 2048, device=dev),
    )
    xq, wq, dyq = quantize_act(x), quantize_weight(w), quantize_act(dy)
    for a, b in [(xq, wq), (dyq, wq.t()), (quantize_tokens(dy).t(), quantize_tokens(x).t())]:
        ref = f64(a) @ f64(b).t()
        assert rel(fp8_mm(a, b, torch.float32, backend="cuda"), ref) < 1e-4
        assert rel(fp8_mm(a, b, torch.bfloat16, backend="cuda"), ref) < 1e-2
