"""One-shot GPU check: everything dsv3 claims about a GPU, measured in one go (``make gpu-check``).

GPU time comes in short windows, so this script measures, in well under 8 minutes on one H100:

1. **FP8 GEMM**: the blockwise FP8 GEMM (``scaled_mm``, 1x128 x 128x128 scales) at DeepSeek-V3's
   shapes against the CPU emulation's math (relative error vs the float64 product of the same
   dequantised operands) and its TFLOPS against a BF16 ``mm``;
2. **FP8 Linear**: forward + backward of :class:`~dsv3.fp8.linear.FP8Linear` against a BF16 Linear
   (time, and the error of y, dx, dW against a float64 reference);
3. **Training step**: MFU and peak memory of the ``small`` preset in BF16 and FP8, next to what
   ``dsv3 plan`` predicts for the same layout (peak device bytes, MFU of its step-time model);
4. **Prefetcher**: the step time with the background batch prefetcher on and off;
5. **Speculative decoding**: tokens/s of plain and MTP speculative greedy decoding (the model of
   ``bench/speculative.py`` when it was trained, else a random one: throughput only).

It prints a markdown table ready for BENCHMARKS.md (and ``--json`` writes the rows). Every part
prints a line saying it was skipped where CUDA (or a Hopper GPU, for FP8) is missing. ``--dry-run``
runs every part on the CPU with tiny shapes, so the code paths stay exercised where no GPU is
(``tests/test_gpu_check.py``); its numbers mean nothing.

    python bench/gpu_check.py [--json out.json]      # on the GPU machine
    python bench/gpu_check.py --dry-run              # CPU, tiny shapes, seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fp8_gemm_gpu import rel_err, tflops  # noqa: E402
from plan_vs_measured import planner_precision  # noqa: E402

from dsv3.fp8 import FP8Recipe  # noqa: E402
from dsv3.fp8.gemm import cuda_fp8_available, fp8_mm  # noqa: E402
from dsv3.fp8.linear import FP8Linear  # noqa: E402
from dsv3.fp8.quant import ACT_TILE, quantize, quantize_weight  # noqa: E402

V3_SHAPES = [(4096, 7168, 2048), (4096, 2048, 7168), (4096, 7168, 18432)]  # (tokens M, in K, out N)
DRY_SHAPES = [(128, 256, 128)]
SPEC_RUN = Path(__file__).resolve().parent / ".spec_run"  # where bench/speculative.py --prepare trains


@dataclass
class Mode:
    """Where and how big: ``device`` cuda or cpu; ``dry`` shrinks every part to seconds on a CPU."""

    device: str
    dry: bool
    fp8: bool  # real FP8 GEMMs (a Hopper GPU)
    iters: int

    @property
    def backend(self) -> str:
        return "cuda" if self.fp8 else "emulated"


def timed(fn, mode: Mode, warmup: int = 3) -> float:
    """Median seconds per call (synchronised on CUDA)."""
    cuda = mode.device == "cuda"
    times = []
    for i in range(warmup + mode.iters):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def skip_line(part: str, why: str) -> dict:
    print(f"[gpu-check] {part}: skipped ({why})")
    return {"part": part, "what": "skipped", "value": why}


def row(part: str, what: str, value: str) -> dict:
    return {"part": part, "what": what, "value": value}


# --- 1. FP8 GEMM -------------------------------------------------------------------------------


def check_fp8_gemm(mode: Mode) -> list[dict]:
    """scaled_mm (or, dry, the emulation) at V3's shapes: error vs float64, TFLOPS vs BF16 mm."""
    if not mode.fp8 and not mode.dry:
        return [skip_line("FP8 GEMM", "needs a Hopper (SM90) GPU with CUDA >= 12.9")]
    rows = []
    for m, k, n in DRY_SHAPES if mode.dry else V3_SHAPES:
        x = torch.randn(m, k, device=mode.device, dtype=torch.bfloat16)
        w = (torch.randn(n, k, device=mode.device) * k**-0.5).to(torch.bfloat16)
        xq, wq = quantize(x, ACT_TILE), quantize_weight(w)
        err = rel_err(fp8_mm(xq, wq, torch.float32, mode.backend), xq, wq)
        flops = 2.0 * m * n * k
        t_fp8 = timed(lambda: fp8_mm(xq, wq, torch.bfloat16, mode.backend), mode)
        t_bf16 = timed(lambda: x @ w.t(), mode)
        rows.append(
            row(
                "FP8 GEMM",
                f"{m}x{k}x{n} ({mode.backend})",
                f"rel err {err:.1e}; fp8 {tflops(flops, t_fp8 * 1e3):.1f} TFLOPS, "
                f"bf16 {tflops(flops, t_bf16 * 1e3):.1f} TFLOPS, speed-up {t_bf16 / t_fp8:.2f}x",
            )
        )
    return rows


# --- 2. FP8 Linear forward + backward -------------------------------------------------------------


def _fwd_bwd(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    layer.weight.grad = None
    y = layer(x)
    y.backward(dy)
    return y, x.grad, layer.weight.grad


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).norm() / ref.norm()).item()


def check_fp8_linear(mode: Mode) -> list[dict]:
    """FP8Linear forward + backward against a BF16 Linear: time, and y/dx/dW errors vs float64."""
    if not mode.fp8 and not mode.dry:
        return [skip_line("FP8 Linear", "needs a Hopper (SM90) GPU with CUDA >= 12.9")]
    m, k, n = DRY_SHAPES[0] if mode.dry else V3_SHAPES[0]
    torch.manual_seed(0)
    bf16 = nn.Linear(k, n, bias=False, device=mode.device, dtype=torch.bfloat16)
    fp8 = FP8Linear(
        nn.Linear(k, n, bias=False, device=mode.device, dtype=torch.bfloat16), FP8Recipe(backend=mode.backend)
    )
    fp8.weight = bf16.weight  # the same parameter
    x = torch.randn(m, k, device=mode.device, dtype=torch.bfloat16)
    dy = torch.randn(m, n, device=mode.device, dtype=torch.bfloat16)
    w64, x64, dy64 = bf16.weight.double(), x.double(), dy.double()
    ref = (x64 @ w64.t(), dy64 @ w64, dy64.t() @ x64)
    errs = {
        name: [_rel(g, r) for g, r in zip(_fwd_bwd(layer, x, dy), ref)]
        for name, layer in (("bf16", bf16), ("fp8", fp8))
    }
    t = {
        name: timed(lambda layer=layer: _fwd_bwd(layer, x, dy), mode) for name, layer in (("bf16", bf16), ("fp8", fp8))
    }
    flops = 3 * 2.0 * m * n * k
    return [
        row(
            "FP8 Linear",
            f"{m}x{k}x{n} fwd+bwd {name}",
            f"{tflops(flops, t[name] * 1e3):.1f} TFLOPS ({t[name] * 1e3:.2f} ms); rel err y/dx/dW "
            + "/".join(f"{e:.1e}" for e in errs[name]),
        )
        for name in ("bf16", "fp8")
    ] + [row("FP8 Linear", "fp8 speed-up over bf16", f"{t['bf16'] / t['fp8']:.2f}x")]


# --- 3. and 4. Training step: MFU, peak memory vs the plan; the prefetcher ---------------------------


def _session(mode: Mode, fp8: bool):
    from dsv3.train.config import TrainConfig
    from dsv3.train.measure import prepare_config

    run_dir = tempfile.mkdtemp(prefix="dsv3-gpu-check-")
    options = dict(
        model="small",
        seq_len=4096,
        micro_batch=2,
        dtype="bfloat16",
        device=mode.device,
        fp8=fp8,
        fp8_backend=mode.backend,
        progress=False,
        tensorboard=False,
        val_fraction=0.0,
        run_dir=run_dir,
    )
    if mode.dry:  # the speculative benchmark's 3-layer model on a few kB of text (this file)
        data = Path(run_dir) / "data.txt"
        data.write_text(Path(__file__).read_text() * 4)
        options.update(
            model=str(Path(__file__).parent / "speculative_model.json"), seq_len=32, micro_batch=1, data=str(data)
        )
    return prepare_config(TrainConfig.from_dict(options), "small-fp8" if fp8 else "small-bf16")


def _step_times(session, mode: Mode, prefetch: bool) -> list[float]:
    """Seconds of ``mode.iters`` trainer steps (after 2 warm-up steps), batches fetched as ``dsv3 train`` does."""
    from dsv3.train.step import train_step

    pre = session.session.prefetcher
    pre.background = prefetch
    times = []
    for i in range(2 + mode.iters):
        if mode.device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        batches, _ = pre.get(1, 1)
        train_step(session.session, batches)
        if mode.device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t)
    pre.drain()
    return times


def _planned(session, mode: Mode, fp8: bool, peak_flops: float):
    from dsv3.plan.cost import Hardware
    from dsv3.plan.layout import Layout
    from dsv3.plan.planner import make_plan

    c = session.config
    layout = Layout(seq_len=c.data.seq_len, micro_batch=c.data.micro_batch, recompute="none", zero=0, fp8=fp8)
    return make_plan(
        session.session.mcfg, layout, planner_precision("bf16", "fp32"), Hardware(peak_tflops=peak_flops / 1e12)
    )


def check_train_step(mode: Mode) -> list[dict]:
    """MFU and peak memory of ``small`` (BF16, FP8) against ``dsv3 plan``; the prefetcher on vs off."""
    if mode.device != "cuda" and not mode.dry:
        return [skip_line("training step", "needs CUDA"), skip_line("prefetcher", "needs CUDA")]
    from dsv3.plan.flops import training_flops_per_token
    from dsv3.train.metrics import device_peak_flops

    # MFU against the BF16 peak (the report's convention, FP8 runs included); a CPU has no fast BF16
    # GEMM to time, so the dry run divides by its FP32 matmul rate
    peak, source = device_peak_flops(
        torch.device(mode.device), torch.bfloat16 if mode.device == "cuda" else torch.float32
    )
    rows = []
    for fp8 in (False, True):
        s = _session(mode, fp8)
        try:
            if mode.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            on, off = statistics.median(_step_times(s, mode, True)), statistics.median(_step_times(s, mode, False))
            used = torch.cuda.max_memory_allocated() if mode.device == "cuda" else float("nan")
            c, cfg = s.config, s.session.mcfg
            tokens = c.data.seq_len * c.data.micro_batch
            mfu = training_flops_per_token(cfg, c.data.seq_len) * tokens / on / peak
            plan = _planned(s, mode, fp8, peak)
        finally:
            s.close()
        rows.append(
            row(
                "training step",
                f"{s.name} ({tokens} tokens/step)",
                f"{on * 1e3:.1f} ms, {tokens / on:,.0f} tok/s, MFU {100 * mfu:.1f}% (peak: {source}); "
                f"plan MFU {100 * plan.throughput.mfu:.1f}%",
            )
        )
        rows.append(
            row(
                "training step",
                f"{s.name} peak memory",
                f"measured {used / 2**30:.2f} GiB, plan {plan.peak_device_bytes / 2**30:.2f} GiB",
            )
        )
        rows.append(
            row("prefetcher", s.name, f"step {on * 1e3:.1f} ms with, {off * 1e3:.1f} ms without ({off / on:.3f}x)")
        )
    return rows


# --- 5. Speculative decoding ---------------------------------------------------------------------


def _spec_model(mode: Mode):
    from dsv3.config import ModelConfig
    from dsv3.infer.generate import load_for_generation
    from dsv3.model import DeepseekV3ForCausalLM

    if SPEC_RUN.is_dir() and not mode.dry:
        return load_for_generation(str(SPEC_RUN), device=mode.device, keep_mtp=True)[0], "trained"
    cfg = ModelConfig.from_dict(json.loads((Path(__file__).parent / "speculative_model.json").read_text()))
    torch.manual_seed(0)
    return DeepseekV3ForCausalLM(cfg).to(mode.device).eval(), "random init (throughput only)"


def check_speculative(mode: Mode) -> list[dict]:
    """Plain vs MTP speculative greedy decoding, tokens/s (medians, alternating order)."""
    if mode.device != "cuda" and not mode.dry:
        return [skip_line("speculative decoding", "needs CUDA")]
    from dsv3.infer.generate import generate
    from dsv3.infer.speculative import SpeculativeStats, speculative_generate

    model, what = _spec_model(mode)
    new = 8 if mode.dry else 128
    stats = SpeculativeStats(len(model.mtp))
    prompt = torch.randint(2, model.config.vocab_size, (1, 16), device=mode.device, generator=None)
    plain = timed(lambda: generate(model, prompt, max_new_tokens=new, temperature=0.0), mode, warmup=1)
    spec = timed(
        lambda: speculative_generate(model, prompt, max_new_tokens=new, temperature=0.0, stats=stats), mode, warmup=1
    )
    return [
        row(
            "speculative decoding",
            f"{what}, greedy, {new} new tokens",
            f"plain {new / plain:,.0f} tok/s, speculative {new / spec:,.0f} tok/s ({plain / spec:.2f}x), "
            f"acceptance {stats.acceptance_rates()[0] or 0:.2f}",
        )
    ]


# --- Driver --------------------------------------------------------------------------------------

PARTS = (check_fp8_gemm, check_fp8_linear, check_train_step, check_speculative)


def markdown(rows: list[dict], device: str) -> str:
    lines = [
        f"device: {device}, torch {torch.__version__}, CUDA {torch.version.cuda}",
        "",
        "| part | what | result |",
        "|---|---|---|",
    ]
    lines += [f"| {r['part']} | {r['what']} | {r['value']} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="run every part on the CPU with tiny shapes (a test)")
    p.add_argument("--iters", type=int, default=None, help="timed repetitions per measurement (default 20; dry 2)")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    mode = Mode(
        device="cuda" if cuda else "cpu",
        dry=args.dry_run,
        fp8=cuda and cuda_fp8_available("cuda"),
        iters=args.iters or (2 if args.dry_run else 20),
    )
    device = (
        torch.cuda.get_device_name() if cuda else "cpu" + (" (dry run: numbers mean nothing)" if args.dry_run else "")
    )
    started = time.perf_counter()
    rows = []
    for part in PARTS:
        t = time.perf_counter()
        rows += part(mode)
        print(f"[gpu-check] {part.__name__} done in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    print(markdown(rows, device))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
