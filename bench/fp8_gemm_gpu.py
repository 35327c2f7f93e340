"""FP8 (DeepSeek-V3 fine-grained recipe) vs BF16 GEMM speed on a Hopper GPU.

For DeepSeek-V3 shapes it times, with CUDA events, the three GEMMs of a Linear (Fprop,
Dgrad, Wgrad) in BF16 (``torch.mm``) and in FP8 through the ``cuda`` backend
(``scaled_mm`` with 1x128 x 128x128 and 1x128 x 1x128 block scaling), the FP8 Linear step
including the online quantisation of activations/gradients, and a grouped routed-expert GEMM
with 8..32 experts (BF16 ``torch._grouped_mm`` vs the FP8 per-expert loop). It prints TFLOPS,
the FP8 speedup and the relative error of every FP8 result against the emulation backend's
math (float64 product of the same dequantised operands).

    python bench/fp8_gemm_gpu.py [--iters 50] [--compile-quant]

Needs an SM90 GPU with CUDA >= 12.9; elsewhere it exits with a message.
"""

from __future__ import annotations

import argparse
import sys

import torch

from dsv3.fp8.gemm import cuda_fp8_available, fp8_mm, grouped_mm
from dsv3.fp8.quant import ACT_TILE, TOKEN_TILE, QTensor, quantize, quantize_weight

SHAPES = [(4096, 7168, 2048), (4096, 2048, 7168)]  # (tokens M, in K, out N)


def _quantize_arrays(x: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    q = quantize(x, block)
    return q.data, q.scale


def timed(fn, iters: int, warmup: int = 5) -> float:
    """Mean milliseconds per call (CUDA events)."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def rel_err(got: torch.Tensor, a, b) -> float:
    ref = a.dequantize(torch.float64) @ b.dequantize(torch.float64).t()
    return ((got.double() - ref).norm() / ref.norm()).item()


def tflops(flops: float, ms: float) -> float:
    return flops / ms / 1e9


def bench_linear(m: int, k: int, n: int, iters: int, quant) -> None:
    dev = "cuda"
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = (torch.randn(n, k, device=dev) * k**-0.5).to(torch.bfloat16)
    dy = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
    xq, wq, dyq = quant(x, ACT_TILE), quantize_weight(w), quant(dy, ACT_TILE)
    dyt, xt = quant(dy, TOKEN_TILE), quant(x, TOKEN_TILE)
    flops = 2.0 * m * n * k
    gemms = {
        "Fprop": (lambda: x @ w.t(), lambda: fp8_mm(xq, wq, torch.bfloat16, "cuda"), xq, wq),
        "Dgrad": (lambda: dy @ w, lambda: fp8_mm(dyq, wq.t(), torch.bfloat16, "cuda"), dyq, wq.t()),
        "Wgrad": (lambda: dy.t() @ x, lambda: fp8_mm(dyt.t(), xt.t(), torch.float32, "cuda"), dyt.t(), xt.t()),
    }
    for name, (bf16_fn, fp8_fn, a, b) in gemms.items():
        t_bf16, t_fp8 = timed(bf16_fn, iters), timed(fp8_fn, iters)
        err = rel_err(fp8_fn(), a, b)
        print(
            f"{m}x{k}x{n:<6} {name:<6} bf16 {tflops(flops, t_bf16):7.1f} TFLOPS | fp8 {tflops(flops, t_fp8):7.1f} TFLOPS "
            f"| speedup {t_bf16 / t_fp8:5.2f}x | rel err vs emulation {err:.1e}"
        )

    def fp8_step():  # what an FP8 Linear does per step: quantise, then the three GEMMs
        xq_, xt_ = quant(x, ACT_TILE), quant(x, TOKEN_TILE)
        wq_ = quantize_weight(w)
        fp8_mm(xq_, wq_, torch.bfloat16, "cuda")
        fp8_mm(quant(dy, ACT_TILE), wq_.t(), torch.bfloat16, "cuda")
        fp8_mm(quant(dy, TOKEN_TILE).t(), xt_.t(), torch.float32, "cuda")

    def bf16_step():
        x @ w.t()
        dy @ w
        dy.t() @ x

    t_bf16, t_fp8 = timed(bf16_step, iters), timed(fp8_step, iters)
    print(
        f"{m}x{k}x{n:<6} step   bf16 {tflops(3 * flops, t_bf16):7.1f} TFLOPS | fp8 {tflops(3 * flops, t_fp8):7.1f} TFLOPS "
        f"| speedup {t_bf16 / t_fp8:5.2f}x (FP8 incl. quantisation)"
    )


def bench_grouped(experts: int, tokens_per_expert: int, k: int, n: int, iters: int, quant) -> None:
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(experts)
    counts = (tokens_per_expert * (0.5 + torch.rand(experts, generator=gen, device=dev))).long()
    offs = counts.cumsum(0).to(torch.int32)
    total = int(offs[-1])
    x = torch.randn(total, k, device=dev, dtype=torch.bfloat16)
    w = (torch.randn(experts, n, k, device=dev) * k**-0.5).to(torch.bfloat16)
    xq, wq = quant(x, ACT_TILE), quantize_weight(w)
    offs_list = offs.tolist()
    flops = 2.0 * total * n * k
    wt = w.transpose(1, 2)
    t_bf16 = timed(lambda: torch._grouped_mm(x, wt, offs=offs), iters)
    t_fp8 = timed(lambda: grouped_mm(xq, wq, offs_list, torch.bfloat16, "cuda"), iters)
    got = grouped_mm(xq, wq, offs_list, torch.bfloat16, "cuda")
    ref = grouped_mm(xq, wq, offs_list, torch.float32, "emulated")
    err = ((got.float() - ref).norm() / ref.norm()).item()
    print(
        f"grouped E={experts:<3} {total}x{k}x{n} bf16 {tflops(flops, t_bf16):7.1f} TFLOPS | fp8 {tflops(flops, t_fp8):7.1f} "
        f"TFLOPS | speedup {t_bf16 / t_fp8:5.2f}x | rel err vs emulation {err:.1e}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--compile-quant", action="store_true", help="fuse the quantiser with torch.compile")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or not cuda_fp8_available("cuda"):
        print(
            "bench/fp8_gemm_gpu.py needs a Hopper (SM90) GPU with CUDA >= 12.9 for block-scaled FP8 GEMMs; "
            "none is available here, so nothing was measured.",
            file=sys.stderr,
        )
        return 1
    quant = quantize
    if args.compile_quant:  # one fused kernel per quantiser call site; QTensor built outside the graph
        fused = torch.compile(_quantize_arrays, dynamic=False)

        def quant(x, block):
            data, scale = fused(x, block)
            return QTensor(data, scale, tuple(x.shape), tuple(block))

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    for m, k, n in SHAPES:
        bench_linear(m, k, n, args.iters, quant)
    for experts in (8, 16, 32):
        bench_grouped(experts, 512, 7168, 4096, args.iters, quant)  # gate_up of DeepSeek-V3 experts
        bench_grouped(experts, 512, 2048, 7168, args.iters, quant)  # down projection
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
