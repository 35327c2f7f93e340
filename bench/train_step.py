"""Training-step throughput of dsv3 against transformers' DeepseekV3ForCausalLM, same config and data.

Config (the model issue's): hidden 512, 6 layers (first dense, FFN 1536), 8 heads, q_lora_rank 192,
kv_lora_rank 128, qk_nope 64, qk_rope 32, v_head 64, 32 routed experts of width 256, top-4 in 2 of 4
groups, 1 shared expert, vocab 8192; batch 4 x 512 tokens of real text (the Python standard library,
BPE-tokenised), float32 on CPU, forward + backward + AdamW (torch's fused AdamW for both: the kernel
dsv3's own AdamW runs for FP32 moments).

Both models start from the same safetensors. Steps alternate between the two models; medians are
reported. Training FLOPs per step are counted with ``torch.utils.flop_counter.FlopCounterMode`` (with
formulas added for the grouped expert GEMM and the CPU fused attention, which it does not know), and
utilisation is achieved FLOP/s over the FLOP/s of a 2048x2048x2048 float32 matmul timed in the same
run; the FLOP count used for all is transformers' (see below). Peak memory: each model trains in a child
process of its own (all import the same libraries and load the same checkpoint) and reports its peak
resident set size.

The reference is transformers' default implementation (``experts_implementation="grouped_mm"``, sdpa
attention). A second reference, ``transformers-eager``, is the same model with transformers' per-expert
Python loop (``experts_implementation="eager"``, what transformers 4.x ran); ``--no-eager`` skips it.

``--busy N`` measures the sensitivity to contention: N busy processes (each a one-thread 512^3 matmul
loop) run during every other round of steps (paused with SIGSTOP otherwise; a round is one step of each
model, the models alternating every step), so each model gets ``--steps`` quiet and ``--steps`` busy
steps, interleaved in one run. The report gives each model's quiet and busy medians, its slowdown
(busy / quiet median), the ratio of dsv3's slowdown to transformers' (<= 1: dsv3 holds its lead), and
a markdown row for BENCHMARKS.md. ``--steps 15`` gives medians of 15 (the lead's quiet-machine run).

    python bench/train_step.py [--steps 5] [--no-eager] [--busy 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F

warnings.simplefilter("ignore")

CONFIG = dict(
    model_type="deepseek_v3",
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1536,
    moe_intermediate_size=256,
    num_hidden_layers=6,
    first_k_dense_replace=1,
    num_attention_heads=8,
    num_key_value_heads=8,
    q_lora_rank=192,
    kv_lora_rank=128,
    qk_nope_head_dim=64,
    qk_rope_head_dim=32,
    v_head_dim=64,
    n_shared_experts=1,
    n_routed_experts=32,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    num_nextn_predict_layers=0,
    rope_scaling=None,
    max_position_embeddings=4096,
)
BATCH, SEQ = 4, 512


def real_batches(n: int):
    """``n`` batches [4, 512] of BPE tokens of the Python standard library (cached after the first run)."""
    from dsv3.data.pretrain import build_data
    from dsv3.data.sources import CorpusSpec
    from dsv3.data.tokenizer import get_tokenizer

    tok = get_tokenizer(None, vocab_size=CONFIG["vocab_size"])
    data = build_data(CorpusSpec(), tokenizer=tok, seq_len=SEQ, vocab_size=CONFIG["vocab_size"], val_fraction=0.0)
    loader = data.loader(seed=0)
    return [loader.next_batch(BATCH) for _ in range(n)]


def build(which: str, path: str):
    if which == "dsv3":
        import dsv3

        return dsv3.from_pretrained(path).train()
    import transformers

    experts = "eager" if which == "transformers-eager" else "grouped_mm"
    return transformers.DeepseekV3ForCausalLM.from_pretrained(
        path, dtype=torch.float32, experts_implementation=experts
    ).train()


def loss_of(which: str, model, ids, labels):
    if which == "dsv3":
        return model(ids, labels).loss
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1))


def step(which, model, opt, batch):
    loss = loss_of(which, model, *batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)


def _flop_mapping():
    """FLOP formulas for ops FlopCounterMode does not know: the grouped GEMM and CPU fused attention."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    # (FlopCounterMode passes the shapes of tensor arguments.)
    def grouped_mm(a, b, *args, out_shape=None, **kwargs):
        if len(a) == 2 and len(b) == 3:  # [N, K] x [E, K, O]
            return 2 * a[0] * a[1] * b[2]
        if len(a) == 2 and len(b) == 2:  # [O, N] x [N, K], grouped over N
            return 2 * a[0] * a[1] * b[1]
        return 2 * a[0] * a[1] * a[2] * b[-1]

    def flash_cpu(q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(q, k, v)

    def flash_cpu_bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out, q, k, v)

    from dsv3.model.ops import GROUPED_MM_OPS

    def dsv3_forward(x, w, *args, out_shape=None, **kwargs):  # [N, K] x [E, O, K]
        return 2 * x[0] * x[1] * w[1]

    # dsv3's grouped GEMM custom ops: forward, dgrad ([N, O] x [E, O, K]), wgrad ([N, O], [N, K])
    # (FlopCounterMode looks formulas up by op packet.)
    fwd, dgrad, wgrad = (op._overloadpacket for op in GROUPED_MM_OPS)
    mapping = {
        fwd: dsv3_forward,
        dgrad: grouped_mm,
        wgrad: lambda dy, x, *a, out_shape=None, **k: 2 * dy[0] * dy[1] * x[1],
    }
    if hasattr(aten, "_grouped_mm"):
        mapping[aten._grouped_mm] = grouped_mm
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = flash_cpu
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = flash_cpu_bwd
    return mapping


def count_flops(which, model, batch) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_flop_mapping()) as counter:
        loss_of(which, model, *batch).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_flops_per_s(repeats: int = 10) -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * 2048**3 / statistics.median(times)


def child_peak(which: str, path: str, steps: int) -> None:
    """Run in a child process: train ``steps`` steps and print the peak RSS (bytes)."""
    import transformers  # noqa: F401

    import dsv3  # noqa: F401  (both children import the same libraries)

    batches = real_batches(steps)
    model = build(which, path)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    for b in batches:
        step(which, model, opt, b)
    print(json.dumps({"peak_rss": peak_rss_bytes()}))


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM; unlike ru_maxrss it does not inherit the parent's peak)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


BUSY_LOOP = "import torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\nwhile True:\n    a @ a\n"


class BusyProcesses:
    """``n`` processes that keep one core each busy while :meth:`on`; stopped (SIGSTOP) while off."""

    def __init__(self, n: int) -> None:
        self.procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(n)]
        self.off()

    def on(self) -> None:
        for p in self.procs:
            os.kill(p.pid, signal.SIGCONT)

    def off(self) -> None:
        for p in self.procs:
            os.kill(p.pid, signal.SIGSTOP)

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


def timed_rounds(models, opts, batches, steps: int, busy: BusyProcesses | None) -> dict:
    """Step times per model (and, with ``busy``, per condition), alternating models every step and the
    busy processes every round."""
    times = {(w, c): [] for w in models for c in (("quiet", "busy") if busy else ("quiet",))}
    for i in range(steps):
        for cond in (("quiet", "busy") if i % 2 == 0 else ("busy", "quiet")) if busy else ("quiet",):
            if busy:
                busy.on() if cond == "busy" else busy.off()
            for w in models:
                t = time.perf_counter()
                step(w, models[w], opts[w], batches[1 + i])
                times[(w, cond)].append(time.perf_counter() - t)
    if busy:
        busy.off()
    return times


def print_contention(result: dict, n_busy: int, steps: int) -> None:
    """The ``--busy`` report: per model quiet / busy medians and slowdown, the ratio of slowdowns, and a
    markdown row (threads, medians of ``steps`` steps per model and condition) for BENCHMARKS.md."""
    models = [w for w in ("dsv3", "transformers", "transformers-eager") if w in result]

    def iqr(times: list[float]) -> str:  # the spread that says whether the median is stable
        q = statistics.quantiles(times, n=4) if len(times) > 1 else times * 3
        return f"IQR {q[0]:.3f}-{q[2]:.3f}"

    for w in models:
        r = result[w]
        print(
            f"{w:>18}: quiet {r['step_s']:.3f} s/step ({iqr(r['step_times'])}), with {n_busy} busy process(es) "
            f"{r['busy_step_s']:.3f} s/step ({iqr(r['busy_step_times'])}): slowdown {r['busy_slowdown']:.2f}x, "
            f"+{r['busy_step_s'] - r['step_s']:.3f} s/step (medians of {steps} steps each)"
        )
    print(
        f"speedup dsv3 / transformers: quiet {result['speedup']:.2f}x, busy {result['busy_speedup']:.2f}x; "
        f"slowdown ratio dsv3 / transformers {result['slowdown_ratio']:.2f} (<= 1: dsv3 holds its lead)"
    )
    d, t = result["dsv3"], result["transformers"]
    print(
        "| threads | busy | steps | dsv3 quiet | dsv3 busy | dsv3 slowdown | tf quiet | tf busy | tf slowdown "
        "| slowdown ratio | speedup quiet | speedup busy |\n|" + "---:|" * 12
    )
    print(
        f"| {result['threads']} | {n_busy} | {steps} | {d['step_s']:.3f} s | {d['busy_step_s']:.3f} s | "
        f"{d['busy_slowdown']:.2f}x | {t['step_s']:.3f} s | {t['busy_step_s']:.3f} s | {t['busy_slowdown']:.2f}x | "
        f"**{result['slowdown_ratio']:.2f}** | {result['speedup']:.2f}x | {result['busy_speedup']:.2f}x |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model (medians are reported)")
    parser.add_argument("--no-eager", action="store_true", help="skip transformers' per-expert loop reference")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--busy", type=int, default=0, help="busy processes to add every other round (contention)")
    parser.add_argument("--child", nargs=2, metavar=("WHICH", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_peak(args.child[0], args.child[1], 3)
        return

    from dsv3.config import ModelConfig
    from dsv3.model import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    path = tempfile.mkdtemp(prefix="dsv3-bench-")
    DeepseekV3ForCausalLM(ModelConfig.from_dict(CONFIG)).save_pretrained(path)
    batches = real_batches(args.steps + 2)
    which = ("dsv3", "transformers") + (() if args.no_eager else ("transformers-eager",))
    models = {w: build(w, path) for w in which}
    # The same optimizer for both: torch's fused AdamW (what dsv3's AdamW runs for FP32 moments).
    opts = {w: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) for w, m in models.items()}
    flops = {w: count_flops(w, m, batches[0]) for w, m in models.items()}
    for w in models:  # warm-up
        step(w, models[w], opts[w], batches[0])
    peak = matmul_flops_per_s()
    busy = BusyProcesses(args.busy) if args.busy else None
    try:  # alternate, so both see the same machine conditions
        by_cond = timed_rounds(models, opts, batches, args.steps, busy)
    finally:
        if busy:
            busy.close()
    times = {w: by_cond[(w, "quiet")] for w in models}
    peak = max(peak, matmul_flops_per_s())  # the better of two measurements bounds the machine
    tokens = BATCH * SEQ
    rss = {}
    for w in models:
        out = subprocess.run([sys.executable, __file__, "--child", w, path], capture_output=True, text=True, check=True)
        rss[w] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss"]
    # Utilisation uses one FLOP count for both: the reference implementation's (transformers: every
    # GEMM a plain mm/bmm, attention as full s x s products), so neither side gains from its counting.
    model_flops = flops["transformers"]
    result = {
        "threads": torch.get_num_threads(),
        "matmul_2048_gflops": peak / 1e9,
        "tokens_per_step": tokens,
        "model_flops_per_step": model_flops,
    }
    for w in models:
        t = statistics.median(times[w])
        result[w] = {
            "step_s": t,
            "tokens_per_s": tokens / t,
            "own_flop_count_per_step": flops[w],
            "achieved_gflops": model_flops / t / 1e9,
            "utilisation": model_flops / t / peak,
            "peak_rss_mib": rss[w] / 2**20,
            "step_times": times[w],
        }
    result["speedup"] = result["dsv3"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
    result["peak_rss_ratio"] = rss["dsv3"] / rss["transformers"]
    if busy:
        result["busy_processes"] = args.busy
        for w in models:
            t_busy = statistics.median(by_cond[(w, "busy")])
            result[w].update(
                busy_step_s=t_busy, busy_slowdown=t_busy / result[w]["step_s"], busy_step_times=by_cond[(w, "busy")]
            )
        result["busy_speedup"] = result["transformers"]["busy_step_s"] / result["dsv3"]["busy_step_s"]
        result["slowdown_ratio"] = result["dsv3"]["busy_slowdown"] / result["transformers"]["busy_slowdown"]
    if "transformers-eager" in models:
        result["speedup_vs_eager"] = result["dsv3"]["tokens_per_s"] / result["transformers-eager"]["tokens_per_s"]
    print(f"matmul 2048^3 fp32: {peak / 1e9:.1f} GFLOP/s ({result['threads']} threads)")
    for w in models:
        r = result[w]
        print(
            f"{w:>18}: {r['step_s']:.3f} s/step  {r['tokens_per_s']:,.0f} tok/s  "
            f"{model_flops / 1e9:.1f} GFLOP/step (own count {r['own_flop_count_per_step'] / 1e9:.1f})  "
            f"{r['achieved_gflops']:.1f} GFLOP/s  utilisation {100 * r['utilisation']:.1f}%  "
            f"peak RSS {r['peak_rss_mib']:,.0f} MiB"
        )
    print(f"speedup dsv3 / transformers: {result['speedup']:.2f}x; peak RSS ratio {result['peak_rss_ratio']:.2f}")
    if "speedup_vs_eager" in result:
        print(f"speedup dsv3 / transformers-eager: {result['speedup_vs_eager']:.2f}x")
    if busy:
        print_contention(result, args.busy, args.steps)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
