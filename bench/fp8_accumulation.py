"""Error of FP8 GEMMs with limited-precision tensor-core accumulation, with and without promotion.

Report section 3.3.2: the FP8 GEMM accumulators of H800 keep about 14 mantissa bits, which at
K = 4096 gives a maximum relative error near 2 %; promoting partial sums to FP32 every
N_C = 128 elements removes it. This script runs :func:`dsv3.fp8.gemm.mm_limited_accumulation`
(a model of the tensor core, CPU) on random operands quantised with the 1x128 recipe and prints,
for each K, the max and median relative error per output element against the exact float64
product of the same FP8 operands.

    python bench/fp8_accumulation.py [--bits 14] [--m 16] [--dist uniform|normal|lognormal]

Inputs are non-negative by default ("uniform"), where every truncation drifts the same way and
the error grows ~linearly with K; signed data ("normal") partly cancels and mostly shows the
relative error of outputs near zero.

Measured with the defaults (seed 0, 16x16 outputs, uniform inputs, 14 mantissa bits, truncation,
groups of 4): at K = 4096 the max relative error is 4.2 % without promotion and 0.14 % with
promotion every 128 elements (K = 2048: 2.2 % vs 0.14 %; K = 8192: 8.1 % vs 0.14 %). With
``--bits 15`` K = 4096 gives 2.1 % vs 0.07 %. The report's "nearly 2 % at K = 4096" is of the
same order; the exact figure depends on tensor-core details the report does not give and on
the input distribution.
"""

from __future__ import annotations

import argparse
import time

import torch

from dsv3.fp8.gemm import mm_limited_accumulation
from dsv3.fp8.quant import quantize_act


def operands(dist: str, m: int, k: int, gen: torch.Generator) -> torch.Tensor:
    if dist == "uniform":
        return torch.rand(m, k, generator=gen)
    if dist == "normal":
        return torch.randn(m, k, generator=gen)
    if dist == "lognormal":
        return torch.exp(torch.randn(m, k, generator=gen))
    raise SystemExit(f"unknown --dist {dist!r}; choose uniform, normal or lognormal")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", type=int, default=14, help="mantissa bits kept by the tensor-core accumulator")
    p.add_argument("--group", type=int, default=4, help="products added per accumulation step")
    p.add_argument("--nc", type=int, default=128, help="promotion interval N_C")
    p.add_argument("--m", type=int, default=16, help="rows of A and of B (m x m outputs)")
    p.add_argument("--ks", default="128,256,512,1024,2048,4096,8192", help="comma-separated K values")
    p.add_argument("--dist", default="uniform", help="uniform, normal or lognormal")
    p.add_argument("--rounding", default="truncate", choices=("truncate", "nearest"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    gen = torch.Generator().manual_seed(args.seed)
    print(
        f"FP8 E4M3 1x128 operands ({args.dist}), {args.m}x{args.m} outputs, accumulator {args.bits} mantissa bits "
        f"({args.rounding}, groups of {args.group}); error vs exact float64 product of the FP8 operands"
    )
    print(
        f"{'K':>6} | {'no promotion: max':>18} {'median':>9} | {f'promotion N_C={args.nc}: max':>24} {'median':>9} | {'s':>5}"
    )
    for k in [int(v) for v in args.ks.split(",")]:
        t0 = time.perf_counter()
        a = quantize_act(operands(args.dist, args.m, k, gen))
        b = quantize_act(operands(args.dist, args.m, k, gen))
        exact = a.dequantize(torch.float64) @ b.dequantize(torch.float64).t()
        rows = []
        for interval in (None, args.nc):
            got = mm_limited_accumulation(a, b, args.bits, interval, args.group, args.rounding)
            err = (got - exact).abs() / exact.abs()
            rows.append((err.max().item(), err.median().item()))
        (m0, d0), (m1, d1) = rows
        print(f"{k:>6} | {m0:>17.3%} {d0:>9.3%} | {m1:>23.4%} {d1:>9.4%} | {time.perf_counter() - t0:>5.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
