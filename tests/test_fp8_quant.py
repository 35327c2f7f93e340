"""1x128 tiles, 128x1 token tiles and 128x128 blocks: layouts, padding and error bounds in float64."""

import pytest
import torch

from dsv3.fp8.formats import cast_e4m3
from dsv3.fp8.quant import (
    ACT_TILE,
    TOKEN_TILE,
    WEIGHT_BLOCK,
    group_padding,
    quantize,
    quantize_act,
    quantize_tokens,
    quantize_tokens_grouped,
    quantize_weight,
)


def heavy_tailed(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Outlier-rich data: per-row and per-column magnitudes spread over many binades.
    x = torch.randn(*shape, generator=g) * torch.exp(2 * torch.randn(*shape[:-1], 1, generator=g))
    return x * torch.exp(torch.randn(shape[-1], generator=g))


def ref_block_scales(x: torch.Tensor, block, pow2: bool) -> torch.Tensor:
    """Scales of every block from float64 loops over the unpadded tensor."""
    r, c = x.shape
    br, bc = block
    rows, cols = -(-r // br), -(-c // bc)
    out = torch.empty(rows, cols, dtype=torch.float64)
    xd = x.double()
    for i in range(rows):
        for j in range(cols):
            amax = xd[i * br : (i + 1) * br, j * bc : (j + 1) * bc].abs().max().item()
            s = max(amax / 448.0, 2.0**-126)
            if pow2:
                s = 2.0 ** torch.ceil(torch.log2(torch.tensor(s, dtype=torch.float64))).item()
            out[i, j] = s
    return out


def expand(scale: torch.Tensor, block, shape) -> torch.Tensor:
    s = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return s[: shape[0], : shape[1]]


@pytest.mark.parametrize("block", [ACT_TILE, TOKEN_TILE, WEIGHT_BLOCK])
@pytest.mark.parametrize("pow2", [False, True])
def test_round_trip_error_is_within_half_an_e4m3_ulp_of_every_element(block, pow2):
    x = heavy_tailed(200, 300, seed=1)
    q = quantize(x, block, pow2=pow2)
    s_ref = ref_block_scales(x, block, pow2)
    torch.testing.assert_close(q.scale.double(), s_ref, rtol=1e-7 if not pow2 else 0, atol=0)
    s = expand(s_ref, block, x.shape)
    v = x.double() / s  # scaled value, |v| <= 448
    assert torch.all(v.abs() <= 448.0 * (1 + 1e-7))
    # E4M3 half-ulp: 2^-4 relative for normals (|v| >= 2^-6), 2^-10 absolute for subnormals.
    bound = s * torch.maximum(v.abs() * 2.0**-4, torch.full_like(v, 2.0**-10))
    err = (q.dequantize(torch.float64) - x.double()).abs()
    assert torch.all(err <= bound * (1 + 1e-6))
    # The block maximum is represented exactly with fp32 scales (it maps to 448).
    if not pow2:
        assert (err <= 1e-6 * x.double().abs().max()).any()


def test_values_are_the_e4m3_cast_of_x_over_the_scale():
    x = heavy_tailed(130, 256, seed=2)
    for block in (ACT_TILE, TOKEN_TILE, WEIGHT_BLOCK):
        q = quantize(x, block)
        s = expand(q.scale, block, x.shape)
        expect = cast_e4m3(x / s)
        assert torch.equal(q.data[: x.shape[0], : x.shape[1]].view(torch.uint8), expect.view(torch.uint8))


def test_padding_layouts_and_logical_shape():
    x = torch.randn(130, 300)
    a = quantize_act(x)
    assert a.data.shape == (130, 384) and a.scale.shape == (130, 3) and a.shape == (130, 300)
    t = quantize_tokens(x)
    assert t.data.shape == (256, 300) and t.scale.shape == (2, 300)
    w = quantize_weight(x)
    assert w.data.shape == (256, 384) and w.scale.shape == (2, 3)
    for q in (a, t, w):
        assert q.data.dtype == torch.float8_e4m3fn and q.scale.dtype == torch.float32
        pad = q.data.float().clone()
        pad[:130, :300] = 0
        assert torch.all(pad == 0)  # padding holds zeros
        assert q.dequantize().shape == (130, 300)


def test_transpose_is_a_view_with_the_same_values():
    x = torch.randn(200, 300)
    for q in (quantize_weight(x), quantize_tokens(x)):
        qt = q.t()
        assert qt.shape == (300, 200) and qt.block == q.block[::-1]
        assert torch.equal(qt.dequantize(), q.dequantize().t())
        assert qt.data.data_ptr() == q.data.data_ptr()


def test_token_tiles_are_quantised_from_high_precision_not_from_fp8():
    x = heavy_tailed(256, 128, seed=3)
    direct = quantize_tokens(x)
    requant = quantize_tokens(quantize_act(x).dequantize())
    # The direct copy's error obeys the bound against x itself ...
    s = expand(direct.scale.double(), TOKEN_TILE, x.shape)
    err = (direct.dequantize(torch.float64) - x.double()).abs()
    assert torch.all(
        err <= s * torch.maximum((x.double() / s).abs() * 2.0**-4, torch.full_like(s, 2.0**-10)) * (1 + 1e-6)
    )
    # ... and differs from re-quantising the 1x128 copy, which rounds twice.
    assert not torch.equal(direct.data.view(torch.uint8), requant.data.view(torch.uint8))


def test_stacked_expert_weights_are_blocked_per_expert():
    w = torch.randn(3, 200, 136)
    q = quantize_weight(w)
    assert q.data.shape == (3, 256, 256) and q.scale.shape == (3, 2, 2)
    for e in range(3):
        qe = quantize_weight(w[e])
        assert torch.equal(q.scale[e], qe.scale)
        assert torch.equal(q.dequantize()[e], qe.dequantize())


def test_group_token_tiles_never_straddle_groups():
    offs = [100, 100, 300, 429]  # an empty group and unaligned ends
    rows, padded = group_padding(offs)
    assert padded == [128, 128, 384, 640]
    assert rows.tolist() == list(range(100)) + list(range(128, 328)) + list(range(384, 513))
    x = heavy_tailed(429, 64, seed=4)
    q = quantize_tokens_grouped(x, rows, padded[-1])
    bounds = [(0, 100, 0), (100, 300, 128), (300, 429, 384)]
    for start, end, pstart in bounds:
        ref = quantize_tokens(x[start:end])
        n_tiles = ref.scale.shape[0]
        assert torch.equal(q.scale[pstart // 128 : pstart // 128 + n_tiles], ref.scale)
        assert torch.equal(q.dequantize()[pstart : pstart + end - start], ref.dequantize())


def test_quantisation_runs_on_meta_tensors():
    x = torch.empty(4, 100, 300, device="meta")
    q = quantize(x.reshape(-1, 300))
    assert q.data.device.type == "meta" and q.data.shape == (400, 384)
    w = quantize_weight(torch.empty(8, 96, 300, device="meta"))
    assert w.scale.shape == (8, 1, 3)


def test_quantize_refuses_vectors():
    with pytest.raises(ValueError):
        quantize(torch.randn(10))
