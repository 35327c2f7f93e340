"""Where a CPU training step's time goes (torch.profiler), and how close its GEMMs get to the matmul rate.

For the ``small`` preset and a 64-expert variant of it (``--experts 64``: 64 routed experts of half the width,
top-8 in 4 of 8 groups, a config no test uses), built and stepped exactly as ``dsv3 train`` does
(:func:`dsv3.train.measure.prepare_config`, the trainer's ``train_step``, FP32, batch 4 x 512 of the Python
standard library), it profiles ``--steps`` steps and reports, per step:

- the share of wall time in GEMMs (``mm``/``addmm``/``bmm``/``_grouped_mm``, self time), attention (the fused
  CPU SDPA kernels), routing/dispatch (argsort, sort, topk, index_select, index_add, gather, scatter, bincount,
  cumsum...), the optimizer (``Optimizer.step``, inclusive), other ATen ops, and Python overhead (wall time
  not inside any ATen op);
- the GEMM FLOPs (``FlopCounterMode``, with formulas for the grouped GEMM) over the GEMM time, against a
  2048^3 FP32 matmul timed in the same run: the rate the step's GEMMs reach, and the whole step's FLOPs
  over its wall time as a share of that rate.

``--counts`` instead compares dsv3 with transformers (default experts) on ``bench/train_step.py``'s config,
one profiled step each after a warm-up (and dsv3 again under the 4 MiB mmap threshold that
``dsv3 train`` sets): what makes a step sensitive to a busy process on its cores
(intra-op threads, ATen calls, parallel regions, allocations, host syncs, time in tiny ops). These counts
are deterministic (the times are not).

    python bench/step_profile.py [--preset small] [--experts 64] [--steps 3] [--threads N] [--json out.json]
    python bench/step_profile.py --counts [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step  # noqa: E402
from train_step import _flop_mapping, matmul_flops_per_s  # noqa: E402

from dsv3.config import load_preset  # noqa: E402
from dsv3.utils.malloc import fix_mmap_threshold  # noqa: E402

GEMM = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm"}
ATTENTION = {
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
}
ROUTING = {
    "aten::argsort",
    "aten::sort",
    "aten::topk",
    "aten::index_select",
    "aten::index_add_",
    "aten::index",
    "aten::index_put_",
    "aten::gather",
    "aten::scatter",
    "aten::scatter_add_",
    "aten::scatter_",
    "aten::bincount",
    "aten::cumsum",
    "aten::histc",
    "aten::repeat_interleave",
    "aten::nonzero",
    "aten::searchsorted",
    "aten::index_select_backward",
    "aten::gather_backward",
    "aten::embedding_dense_backward",
}


def _session(preset: str, experts: int | None, seq_len: int, micro_batch: int):
    from dsv3.train.config import TrainConfig
    from dsv3.train.measure import prepare_config

    cfg = load_preset(preset).to_dict()
    if experts:
        scale = experts // cfg["n_routed_experts"]
        cfg.update(
            n_routed_experts=experts,
            moe_intermediate_size=cfg["moe_intermediate_size"] // scale,
            num_experts_per_tok=cfg["num_experts_per_tok"] * scale,
            n_group=8,
            topk_group=4,
        )
    path = Path(tempfile.mkdtemp(prefix="dsv3-profile-")) / "config.json"
    path.write_text(json.dumps(cfg))
    config = TrainConfig.from_dict(
        dict(
            model=str(path),
            seq_len=seq_len,
            micro_batch=micro_batch,
            global_batch=micro_batch,
            dtype="float32",
            progress=False,
            tensorboard=False,
            val_fraction=0.0,
        )
    )
    return prepare_config(config, f"{preset}" + (f"-{experts}e" if experts else ""))


def gemm_flops(session) -> float:
    """FLOPs of the GEMMs of one forward + backward (FlopCounterMode; the optimizer has none)."""
    from torch.utils.flop_counter import FlopCounterMode

    ids, labels = session.batches()
    with FlopCounterMode(display=False, custom_mapping=_flop_mapping()) as counter:
        session.model(ids, labels).loss.backward()
    session.model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def _shares(prof, wall: float, steps: int) -> dict:
    """Seconds per step by category (self time of ATen ops; the optimizer inclusive)."""
    parts = {"gemm": 0.0, "attention": 0.0, "routing_dispatch": 0.0, "other_aten": 0.0}
    optimizer = sum(e.cpu_time_total for e in prof.events() if e.name.startswith("Optimizer.step")) / 1e6
    for e in prof.key_averages():
        if not e.key.startswith("aten::"):
            continue
        key = (
            "gemm"
            if e.key in GEMM
            else "attention"
            if e.key in ATTENTION
            else "routing_dispatch"
            if e.key in ROUTING
            else "other_aten"
        )
        parts[key] += e.self_cpu_time_total / 1e6
    aten = sum(parts.values())
    out = {k: v / steps for k, v in parts.items()}
    out["python_overhead"] = max(0.0, wall - aten) / steps
    out["optimizer_inclusive"] = optimizer / steps
    return out


def profile_config(preset: str, experts: int | None, steps: int, seq_len: int, micro_batch: int) -> dict:
    s = _session(preset, experts, seq_len, micro_batch)
    try:
        flops = gemm_flops(s)
        for _ in range(2):  # warm-up
            s.step()
        plain = [s.step() for _ in range(steps)]
        rate = matmul_flops_per_s()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            for _ in range(steps):
                s.step()
            wall = time.perf_counter() - t
        shares = _shares(prof, wall, steps)
        rate = max(rate, matmul_flops_per_s())
    finally:
        s.close()
    step_s = statistics.median(plain)
    return {
        "config": s.name,
        "tokens_per_step": seq_len * micro_batch,
        "step_s_median": step_s,
        "profiled_step_s": wall / steps,
        "seconds_per_step": shares,
        "share": {k: v / (wall / steps) for k, v in shares.items()},
        "gemm_gflop_per_step": flops / 1e9,
        "matmul_2048_gflops": rate / 1e9,
        "gemm_rate_share": flops / shares["gemm"] / rate if shares["gemm"] else float("nan"),
        "step_gemm_flops_share_of_matmul_rate": flops / step_s / rate,
        "threads": torch.get_num_threads(),
    }


# ATen ops that only make views or empty tensors (no arithmetic, no parallel region).
NO_COMPUTE = {
    "aten::" + n
    for n in (
        "view as_strided empty empty_strided empty_like reshape _reshape_alias expand transpose t permute "
        "detach slice select unsqueeze squeeze split split_with_sizes chunk narrow alias unbind "
        "resolve_conj resolve_neg lift_fresh _unsafe_view view_as numpy_T contiguous to resize_ promote_types "
        "result_type item _local_scalar_dense"
    ).split()
}
GRAIN = 32768  # at::internal::GRAIN_SIZE: an element-wise op on fewer elements runs on one thread


def _numel(shapes) -> int:
    """The largest tensor argument of an op (its ``input_shapes``), in elements."""
    sizes = [1]
    for shape in shapes or ():
        if isinstance(shape, list) and shape and all(isinstance(d, int) for d in shape):
            n = 1
            for d in shape:
                n *= d
            sizes.append(n)
    return max(sizes)


def step_counts(prof) -> dict:
    """Per-step counts from one profiled step (``profile_memory=True, record_shapes=True``).

    ``aten_calls``: ATen ops called from Python or autograd (not from inside another ATen op);
    compute ops: the innermost ATen ops that compute (views and empty tensors excluded), split by the
    largest argument: ``serial`` below GRAIN elements (one thread), ``parallel_small`` GRAIN..32 GRAIN
    (a parallel region with under 16 GRAIN per thread on 2 threads: synchronisation-bound when a core is
    taken away), ``parallel_large`` above; GEMMs apart. ``allocs``/``alloc_mib``: CPU allocations
    (the profiler's memory events); ``page_faults``: minor page faults of an unprofiled step (fresh
    mmapped blocks); ``host_syncs``: ``aten::_local_scalar_dense`` (``.item()``, ``int()``).
    """
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    out = {"aten_calls": sum(1 for e in events if not (e.cpu_parent and e.cpu_parent.name.startswith("aten::")))}
    buckets = {k: [0, 0.0] for k in ("gemm", "serial", "parallel_small", "parallel_large")}
    for e in events:
        if e.name in NO_COMPUTE or any(
            c.name.startswith("aten::") and c.name not in NO_COMPUTE for c in e.cpu_children
        ):
            continue  # a view, or an op whose work is done by the ATen ops it calls (counted themselves)
        n = _numel(e.input_shapes)
        key = (
            "gemm"
            if e.name in GEMM or e.name.startswith("aten::mkldnn")
            else "serial"
            if n < GRAIN
            else "parallel_small"
            if n < 32 * GRAIN
            else "parallel_large"
        )
        buckets[key][0] += 1
        buckets[key][1] += e.self_cpu_time_total / 1e6
    for k, (count, seconds) in buckets.items():
        out[f"{k}_ops"], out[f"{k}_s"] = count, round(seconds, 4)
    out["host_syncs"] = sum(1 for e in events if e.name == "aten::_local_scalar_dense")
    mem = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.nbytes() > 0]
    out["allocs"], out["alloc_mib"] = len(mem), round(sum(mem) / 2**20, 1)
    return out


def contention_counts() -> list[dict]:
    """:func:`step_counts` of one step of dsv3 and of transformers (default experts) on the
    ``bench/train_step.py`` config, after two warm-up steps each."""
    from dsv3.config import ModelConfig
    from dsv3.model import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    path = tempfile.mkdtemp(prefix="dsv3-counts-")
    DeepseekV3ForCausalLM(ModelConfig.from_dict(train_step.CONFIG)).save_pretrained(path)
    batches = train_step.real_batches(3)
    results = []
    # Last, dsv3 under the 4 MiB mmap threshold that `dsv3 train` sets (dsv3.utils.malloc; process-wide).
    for which, label in (("dsv3", "dsv3"), ("transformers", "transformers"), ("dsv3", "dsv3, 4 MiB mmap threshold")):
        if label.endswith("threshold"):
            fix_mmap_threshold()
        model = train_step.build(which, path)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        train_step.step(which, model, opt, batches[0])
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        train_step.step(which, model, opt, batches[1])  # page faults of an unprofiled step
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        acts = [ProfilerActivity.CPU]
        with profile(activities=acts, profile_memory=True, record_shapes=True, with_stack=False) as prof:
            t = time.process_time()
            train_step.step(which, model, opt, batches[2])
            cpu = time.process_time() - t
        row = {"model": label, "threads": torch.get_num_threads(), "cpu_s": round(cpu, 2), "page_faults": faults}
        results.append(row | step_counts(prof))
        del model, opt
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument(
        "--experts",
        type=int,
        action="append",
        default=None,
        help="also profile a variant with this many routed experts (repeatable; default: 64)",
    )
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--counts", action="store_true", help="contention counts, dsv3 vs transformers (see above)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.counts:
        rows = contention_counts()
        keys = list(rows[0])
        print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
        for r in rows:
            print("| " + " | ".join(str(r[k]) for k in keys) + " |")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return
    results = [
        profile_config(args.preset, e, args.steps, args.seq_len, args.micro_batch)
        for e in [None] + (args.experts or [64])
    ]
    for r in results:
        print(json.dumps(r))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
