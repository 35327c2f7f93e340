"""E4M3 / E5M6 rounding and saturation, and scale formats, against float64 references."""

import math

import pytest
import torch

from dsv3.fp8.formats import (
    E4M3_MAX,
    E5M6_MAX,
    cast_e4m3,
    compute_scale,
    e4m3_to_float32,
    pack_e5m6,
    pow2_ceil,
    round_e5m6,
    round_to_grid,
    scale_to_ue8m0,
    ue8m0_to_scale,
    unpack_e5m6,
)


def grid_e4m3() -> torch.Tensor:
    """All finite non-negative E4M3 values, from the bit patterns (float64, ascending)."""
    vals = torch.arange(128, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    return vals[torch.isfinite(vals)]


def grid_by_definition(exp_bits: int, man_bits: int, ieee: bool) -> torch.Tensor:
    """Non-negative finite values of a binary format, enumerated from its definition (float64)."""
    bias = 2 ** (exp_bits - 1) - 1
    vals = []
    top = 2**exp_bits - (2 if ieee else 1)
    for e in range(top + 1):
        for m in range(2**man_bits):
            if not ieee and e == top and m == 2**man_bits - 1:
                continue  # E4M3fn: S.1111.111 is NaN
            if e == 0:
                vals.append(m / 2**man_bits * 2.0 ** (1 - bias))
            else:
                vals.append((1 + m / 2**man_bits) * 2.0 ** (e - bias))
    return torch.tensor(vals, dtype=torch.float64)


def round_nearest_even_ref(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Round |x| to the grid: nearest, ties to the value with an even index (even mantissa); saturate."""
    ax = x.abs().double().clamp(max=grid[-1].item())
    idx = torch.searchsorted(grid, ax).clamp(1, len(grid) - 1)
    lo, hi = grid[idx - 1], grid[idx]
    d_lo, d_hi = ax - lo, hi - ax
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (idx % 2 == 0))
    out = torch.where(pick_hi, hi, lo)
    out = torch.where(ax == grid[0], grid[0], out)
    return torch.copysign(out, x.double())


def test_e4m3_grid_matches_definition_and_max_is_448():
    grid = grid_e4m3()
    torch.testing.assert_close(grid, grid_by_definition(4, 3, ieee=False), rtol=0, atol=0)
    assert grid.max().item() == E4M3_MAX == 448.0
    assert grid[1].item() == 2.0**-9  # smallest subnormal


def test_cast_e4m3_rounds_to_nearest_even_like_the_definition():
    torch.manual_seed(0)
    grid = grid_e4m3()
    mids = (grid[1:] + grid[:-1]) / 2  # exact ties
    x = torch.cat([torch.randn(20000) * 50, torch.rand(5000) * 2**-6, mids, -mids, grid, -grid]).float()
    got = cast_e4m3(x).double()
    torch.testing.assert_close(got, round_nearest_even_ref(x, grid), rtol=0, atol=0)


def test_cast_e4m3_ties_go_to_even_mantissa():
    # 17 lies between 16 (mantissa 000) and 18 (001): goes to 16; 19 between 18 and 20 (010): goes to 20.
    got = cast_e4m3(torch.tensor([17.0, 19.0, 0.5 + 2**-5, -17.0])).float().tolist()
    assert got == [16.0, 20.0, 0.5, -16.0]


def test_cast_e4m3_saturates_and_keeps_nan():
    x = torch.tensor([448.0, 460.0, 479.0, 1e6, float("inf"), -1e6, -float("inf"), float("nan")])
    got = cast_e4m3(x).float()
    assert got[:4].tolist() == [448.0] * 4
    assert got[4].item() == 448.0 and got[5].item() == -448.0 and got[6].item() == -448.0
    assert math.isnan(got[7].item())


def test_round_to_grid_with_e4m3_parameters_equals_the_hardware_cast():
    torch.manual_seed(1)
    x = torch.cat([torch.randn(10000) * 100, torch.randn(1000) * 1e-3])
    torch.testing.assert_close(round_to_grid(x, 3, -6, 448.0), cast_e4m3(x).float(), rtol=0, atol=0)


def test_e5m6_rounding_matches_definition():
    torch.manual_seed(2)
    grid = grid_by_definition(5, 6, ieee=True)
    assert grid[-1].item() == E5M6_MAX == 65024.0
    mids = (grid[1:] + grid[:-1]) / 2
    x = torch.cat([torch.randn(20000) * 300, torch.rand(3000) * 2**-13, mids, -mids, torch.tensor([7e4, -1e9])])
    got = round_e5m6(x.float()).double()
    torch.testing.assert_close(got, round_nearest_even_ref(x, grid), rtol=0, atol=0)


def test_e5m6_packs_into_12_bits_exactly():
    torch.manual_seed(3)
    grid = grid_by_definition(5, 6, ieee=True).float()
    x = torch.cat([grid, -grid, round_e5m6(torch.randn(1001) * 10)])  # odd length
    packed = pack_e5m6(x)
    assert packed.dtype == torch.uint8 and packed.numel() == 3 * math.ceil(x.numel() / 2)
    back = unpack_e5m6(packed, x.shape)
    assert torch.equal(back, x)
    assert torch.equal(torch.signbit(back), torch.signbit(x))  # -0.0 survives too


def test_pow2_scales_are_exact_powers_of_two_and_tight():
    torch.manual_seed(4)
    amax = torch.cat(
        [
            torch.rand(5000) * 10.0 ** torch.randint(-20, 20, (5000,)).float(),
            448.0 * 2.0 ** torch.arange(-20, 20).float(),
        ]
    )
    s = compute_scale(amax, pow2=True)
    mant, _ = torch.frexp(s)
    assert torch.all(mant == 0.5)  # exactly a power of two
    for a, sc in zip(amax.double().tolist()[::97], s.double().tolist()[::97], strict=True):
        assert sc == 2.0 ** math.ceil(math.log2(a / 448.0)) or a / 448.0 < 2.0**-126
    ratio = amax.double() / s.double()
    assert torch.all(ratio <= 448.0) and torch.all(ratio > 224.0)  # the smallest power of two that fits


def test_pow2_ceil_of_exact_powers_is_identity():
    v = 2.0 ** torch.arange(-120, 120).float()
    assert torch.equal(pow2_ceil(v), v)
    assert torch.equal(pow2_ceil(v * 1.0000001), v * 2)


def test_fp32_scales_map_amax_to_448():
    amax = torch.tensor([1.0, 3.7, 1e-3, 12345.0])
    s = compute_scale(amax)
    torch.testing.assert_close(s.double(), amax.double() / 448.0, rtol=1e-7, atol=0)
    assert torch.all(cast_e4m3(amax / s).float() == 448.0)


def test_zero_tiles_get_a_finite_scale_and_nan_propagates():
    s = compute_scale(torch.tensor([0.0, float("nan"), float("inf")]), pow2=True)
    assert s[0].item() == 2.0**-126
    assert math.isnan(s[1].item()) and math.isinf(s[2].item())


@pytest.mark.parametrize("k", [-127, -126, -1, 0, 1, 127])
def test_ue8m0_round_trip(k):
    s = torch.tensor([2.0**k])
    code = scale_to_ue8m0(s)
    assert code.dtype == torch.uint8 and code.item() == k + 127
    assert torch.equal(ue8m0_to_scale(code), s)


def test_fast_e4m3_decode_equals_torch_on_every_code():
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    ref, got = codes.float(), e4m3_to_float32(codes)
    assert got.dtype == torch.float32
    assert torch.equal(torch.isnan(got), torch.isnan(ref))
    assert torch.equal(got[~torch.isnan(ref)], ref[~torch.isnan(ref)])  # signed zeros, subnormals, +-448
    x = (torch.randn(64, 256) * 100).to(torch.float8_e4m3fn).t()  # non-contiguous
    assert torch.equal(e4m3_to_float32(x), x.float())
    y = torch.randn(4, 4)
    z = e4m3_to_float32(y)
    assert z.data_ptr() != y.data_ptr() and torch.equal(z, y)  # other dtypes: a copy, never the input
