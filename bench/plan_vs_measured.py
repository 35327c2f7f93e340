"""Check the planner against what a built model and optimizer really allocate.

For a preset (``tiny``, ``small``) on one device (PP = TP = EP = DP = 1), this
builds :class:`dsv3.model.transformer.DeepseekV3ForCausalLM` as ``dsv3 train``
does (parameter dtype, then the FP8 recipe, then the recompute policy), runs
one training step with the trainer's AdamW (:mod:`dsv3.train.optim`) and
compares with ``dsv3.plan.planner.make_plan`` for the same layout and formats:

- weights: bytes of every parameter and buffer;
- gradients: bytes of every ``.grad`` after the backward;
- optimizer: bytes of the optimizer's state tensors after the step;
- activations, measured by :func:`dsv3.memory.measure.activation_bytes`:
  ``live``, every storage created during the forward and still alive when it
  returns (parameters, buffers and the loss excluded): what autograd saves plus
  what recomputation keeps (inputs of checkpointed regions, the outputs the
  selective policy caches); and ``saved``, the storages autograd packs for
  backward (``saved_tensors_hooks``, each storage once). Without recomputation
  the two agree; with it ``saved`` cannot see inside checkpointed regions (their
  saved tensors are packed into the checkpoint, which keeps nothing but the
  region inputs and its caches), so it undercounts and ``live`` is the memory.

The planner's weights, gradients and optimizer bytes must be equal; its
activation bytes within 10 % of ``live`` (and of ``saved`` without recompute).

FP8 rows use the recipe's storage-only mode (``fp8_gemm=False``: the FP8
activation caches with exact GEMMs); ``fp8_gemm=True`` caches the same tensors,
but on CPU its GEMMs are emulated in FP32, so a selective region that caches
GEMM outputs keeps FP32 copies of the MLA down-projection outputs (``--fp8-gemm``
shows it), which real FP8 GEMMs do not produce.

EP/DP layouts (``--layout DPxEP``, e.g. ``--layout 2x2 --layout 4x2 --layout 4x4``): ``DP`` gloo ranks are
spawned on 127.0.0.1; each builds the model as ``dsv3 train`` does under torchrun (the whole model, then
:func:`dsv3.parallel.dispatch.shard_experts` keeps its block of ``N_r / EP`` experts and the all-to-all
dispatcher, then :class:`dsv3.parallel.zero.ZeroAdamW`), runs one step on its own micro-batch and reports:
weights (its parameters and buffers), gradients (its ``.grad``), optimizer (``ZeroAdamW.state_bytes()``:
its FP32 master chunks of non-FP32 parameters and moments) and live activations. The planner's per-rank
states are :func:`dsv3.plan.memory.zero1_rank_state_bytes` (dsv3's ZeRO-1 cuts every tensor, viewed as
``[numel / last_dim, last_dim]``, into row chunks, dense over DP, expert blocks over EDP = DP / EP; an FP32
parameter is its own master), its activations ``make_plan(...).stages[0]`` for the layout. BF16 parameters
by default, ``--dtype fp32`` for FP32 ones.

    python bench/plan_vs_measured.py                      # tiny and small FP32, small FP8; every policy
    python bench/plan_vs_measured.py --preset tiny --dtype bf16 --fp8 --json
    python bench/plan_vs_measured.py --preset tiny --layout 2x2 --layout 4x2 --layout 4x4   # EP/DP, per rank
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dsv3.config import ModelConfig, load_preset  # noqa: E402
from dsv3.layout import RECOMPUTE_MODES  # noqa: E402
from dsv3.plan.layout import Layout  # noqa: E402
from dsv3.plan.planner import make_plan  # noqa: E402
from dsv3.plan.precision import Precision  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
POLICIES = RECOMPUTE_MODES
STATES = ("weights", "grads", "optimizer")


def planner_precision(dtype: str, moments: str) -> Precision:
    """The formats the trainer uses: parameters (router included) and gradients in the model dtype, no
    master copy (the parameters are updated in place), AdamW moments in ``moments``, activations in the
    model dtype; the router computes in FP32 whatever the model dtype."""
    return Precision(
        weights=dtype,
        grads=dtype,
        master="none",
        moments=moments,
        router=dtype,
        router_compute="fp32",
        activations=dtype,
        stats="fp32",
    )


def build(preset: str | ModelConfig, dtype: str, recompute: str, fp8: str | None, seed: int = 0):
    """The model as ``dsv3 train`` builds it (``preset``: a name or a config; ``fp8``: None, ``storage`` or
    ``gemm``)."""
    from dsv3.model.transformer import DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    cfg = load_preset(preset) if isinstance(preset, str) else preset
    model = DeepseekV3ForCausalLM(cfg).to(DTYPES[dtype])
    model.train()
    if fp8 is not None:
        from dsv3.fp8 import FP8Recipe, convert

        convert(model, FP8Recipe(fp8_gemm=fp8 == "gemm"))
    if recompute != "none":
        from dsv3.memory.recompute import apply_recompute

        apply_recompute(model, recompute)
    return cfg, model


def measure(
    preset: str | ModelConfig,
    seq_len: int,
    micro_batch: int = 1,
    dtype: str = "fp32",
    moments: str = "fp32",
    recompute: str = "none",
    fp8: str | None = None,
    seed: int = 0,
) -> dict:
    """Build the model, run one step, and return the measured and planned bytes."""
    from dsv3.memory.measure import activation_bytes
    from dsv3.train.optim import AdamW, optimizer_state_bytes

    cfg, model = build(preset, dtype, recompute, fp8, seed)
    opt = AdamW(model.parameters(), moments_dtype=moments)
    ids = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len + 1))
    inputs, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    live, saved = activation_bytes(model, inputs, labels)  # runs the backward too
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    opt.step()
    measured = {
        "weights": sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())),
        "grads": grads,
        "optimizer": optimizer_state_bytes(opt),
        "activations": live,
        "saved_tensors": saved,
    }
    plan = make_plan(
        cfg,
        Layout(seq_len=seq_len, micro_batch=micro_batch, recompute=recompute, zero=0, fp8=fp8 is not None),
        planner_precision(dtype, moments),
    )
    stage = plan.stages[0]
    planned = {
        "weights": stage.weights,
        "grads": stage.grads,
        "optimizer": stage.optimizer,
        "activations": stage.activations_per_microbatch,
    }
    ratio = {k: planned[k] / measured[k] for k in planned}
    ratio["saved_tensors"] = planned["activations"] / measured["saved_tensors"]
    return {
        "preset": preset if isinstance(preset, str) else "custom",
        "seq_len": seq_len,
        "micro_batch": micro_batch,
        "dtype": dtype,
        "moments": moments,
        "recompute": recompute,
        "fp8": fp8,
        "measured": measured,
        "planned": planned,
        "ratio": ratio,
    }


def _rank_measures(
    rank: int,
    preset,
    dp: int,
    ep: int,
    seq_len: int,
    micro_batch: int,
    dtypes: tuple[str, ...],
    moments: str,
    recompute: str,
    seed: int,
) -> list[dict]:
    """One spawned rank of :func:`measure_parallel`: :func:`_rank_measure` for each dtype, in one world."""
    from dsv3.parallel.world import init_parallel

    ctx = init_parallel(
        dp=dp, ep=ep, n_routed_experts=build(preset, "fp32", "none", None, seed)[0].n_routed_experts, device="cpu"
    )
    return [_rank_measure(ctx, rank, preset, seq_len, micro_batch, dtype, moments, recompute, seed) for dtype in dtypes]


def _rank_measure(
    ctx, rank: int, preset, seq_len: int, micro_batch: int, dtype: str, moments: str, recompute: str, seed: int
) -> dict:
    """Measured bytes of this rank after one step of a fresh model in ``dtype``."""
    from dsv3.memory.measure import activation_bytes
    from dsv3.parallel.dispatch import shard_experts
    from dsv3.parallel.zero import ZeroAdamW

    cfg, model = build(preset, dtype, recompute, None, seed)
    shard_experts(model, ctx, dispatcher="alltoall" if ctx.ep > 1 else "local")
    opt = ZeroAdamW(model, ctx, moments_dtype=moments)
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    ids = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len + 1), generator=gen)
    live, saved = activation_bytes(model, ids[:, :-1].contiguous(), ids[:, 1:].contiguous())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    opt.step(1.0)
    return {
        "rank": ctx.rank,
        "dp_rank": ctx.dp_rank,
        "ep_rank": ctx.ep_rank,
        "edp_rank": ctx.edp_rank,
        "weights": sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())),
        "grads": grads,
        "optimizer": opt.state_bytes(),
        "activations": live,
        "saved_tensors": saved,
    }


def planned_per_rank(
    cfg: ModelConfig, dp: int, ep: int, seq_len: int, micro_batch: int, dtype: str, moments: str, recompute: str
) -> list[dict]:
    """What the planner predicts for each data-parallel rank of a ``pp = 1`` layout with ZeRO-1."""
    from dsv3.plan.memory import stage_parts, stage_tensors, zero1_rank_state_bytes
    from dsv3.plan.params import count_params

    layout = Layout(dp=dp, ep=ep, zero=1, seq_len=seq_len, micro_batch=micro_batch, recompute=recompute)
    prec = Precision(
        weights=dtype,
        grads=dtype,
        master="fp32",
        moments=moments,
        router=dtype,
        router_compute="fp32",
        activations=dtype,
        stats="fp32",
    )
    plan = make_plan(cfg, layout, prec)
    tensors = stage_tensors(count_params(cfg), stage_parts(cfg, layout, plan.stage_layers)[0])
    out = []
    for r in range(dp):
        sb = zero1_rank_state_bytes(tensors, layout, prec, r)
        out.append(
            {
                "weights": sb.weights,
                "grads": sb.grads,
                "optimizer": sb.optimizer,
                "activations": plan.stages[0].activations_per_microbatch,
                "plan_optimizer": plan.stages[0].optimizer_flat,
            }
        )  # the flat split, for comparison
    return out


def measure_parallel(
    preset: str | ModelConfig,
    dp: int,
    ep: int,
    seq_len: int,
    micro_batch: int = 1,
    dtype: str | tuple[str, ...] = "bf16",
    moments: str = "fp32",
    recompute: str = "none",
    seed: int = 0,
    timeout: float = 120.0,
) -> list[dict]:
    """Run :func:`_rank_measure` on ``dp`` spawned gloo ranks; one row per rank (measured, planned, ratio).
    Several dtypes (a tuple) are measured in one spawned world: rows dtype-major."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from dist_helpers import run_ranks  # noqa: E402  (spawned gloo ranks with hard timeouts)

    dtypes = (dtype,) if isinstance(dtype, str) else tuple(dtype)
    per_rank = run_ranks(
        _rank_measures, dp, preset, dp, ep, seq_len, micro_batch, dtypes, moments, recompute, seed, timeout=timeout
    )
    return [
        row
        for i, d in enumerate(dtypes)
        for row in _rows(preset, dp, ep, seq_len, micro_batch, d, moments, recompute, [m[i] for m in per_rank])
    ]


def _rows(
    preset,
    dp: int,
    ep: int,
    seq_len: int,
    micro_batch: int,
    dtype: str,
    moments: str,
    recompute: str,
    measured: list[dict],
) -> list[dict]:
    cfg = load_preset(preset) if isinstance(preset, str) else preset
    planned = planned_per_rank(cfg, dp, ep, seq_len, micro_batch, dtype, moments, recompute)
    rows = []
    for m, p in zip(measured, planned):
        ratio = {k: p[k] / m[k] for k in ("weights", "grads", "optimizer", "activations")}
        ratio["saved_tensors"] = p["activations"] / m["saved_tensors"]
        rows.append(
            {
                "preset": preset if isinstance(preset, str) else "custom",
                "dp": dp,
                "ep": ep,
                "edp": dp // ep,
                "rank": m["rank"],
                "seq_len": seq_len,
                "micro_batch": micro_batch,
                "dtype": dtype,
                "moments": moments,
                "recompute": recompute,
                "fp8": None,
                "measured": m,
                "planned": p,
                "ratio": ratio,
            }
        )
    return rows


def markdown_parallel(rows: list[dict]) -> str:
    """The per-rank EP/DP comparison as a markdown table."""
    head = (
        "| preset | params / moments | dp x ep (edp) | rank (ep, edp) | weights | grads "
        "| optimizer: measured = planned (ceil(n/G) model) | activations live | planned | planned / live |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        m, p, q = r["measured"], r["planned"], r["ratio"]
        cells = []
        for k in STATES:
            cell = f"{m[k]:,}"
            if p[k] != m[k]:
                cell += f" (planned {p[k]:,.0f})"
            cells.append(cell)
        cells[2] += f" ({p['plan_optimizer']:,.0f})"
        lines.append(
            f"| {r['preset']} | {r['dtype']} / {r['moments']} | {r['dp']} x {r['ep']} ({r['edp']}) "
            f"| {r['rank']} ({m['ep_rank']}, {m['edp_rank']}) | {' | '.join(cells)} "
            f"| {m['activations']:,} | {p['activations']:,.0f} | {q['activations']:.4f} |"
        )
    return "\n".join(lines)


def parallel_row_ok(r: dict) -> bool:
    return all(r["planned"][k] == r["measured"][k] for k in STATES) and abs(r["ratio"]["activations"] - 1) <= 0.10


def row_ok(r: dict) -> bool:
    states = all(r["planned"][k] == r["measured"][k] for k in STATES)
    return (
        states
        and abs(r["ratio"]["activations"] - 1) <= 0.10
        and (r["recompute"] != "none" or abs(r["ratio"]["saved_tensors"] - 1) <= 0.10)
    )


def markdown(rows: list[dict]) -> str:
    """The comparison as a markdown table (what BENCHMARKS.md shows)."""
    head = (
        "| preset | params | FP8 | recompute | weights / grads / optimizer (measured = planned) "
        "| activations live | saved_tensors | planned | planned / live | planned / saved |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        m, p, q = r["measured"], r["planned"], r["ratio"]
        states = " / ".join(f"{m[k]:,}" for k in STATES)
        if not all(p[k] == m[k] for k in STATES):
            states += " (planned " + " / ".join(f"{p[k]:,.0f}" for k in STATES) + ")"
        lines.append(
            f"| {r['preset']} | {r['dtype']} | {r['fp8'] or '-'} | {r['recompute']} | {states} "
            f"| {m['activations']:,} | {m['saved_tensors']:,} | {p['activations']:,.0f} "
            f"| {q['activations']:.4f} | {q['saved_tensors']:.4f} |"
        )
    return "\n".join(lines)


def default_runs(presets: list[str], dtypes: list[str], fp8: str | None) -> list[tuple[str, str, str | None]]:
    """(preset, dtype, fp8) of each group: every preset and dtype, plus FP8 for the last preset."""
    runs = [(p, dt, None) for p in presets for dt in dtypes]
    if fp8 is not None:
        runs += [(presets[-1], "bf16", fp8)]
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", action="append", help="preset(s) to check (default tiny and small)")
    ap.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="parameter dtype(s) (default fp32)")
    ap.add_argument("--recompute", action="append", choices=POLICIES, help="policies (default all three)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=2)
    fp8 = ap.add_mutually_exclusive_group()
    fp8.add_argument("--fp8", action="store_true", help="only FP8 rows (storage-only recipe), for every preset/dtype")
    fp8.add_argument("--fp8-gemm", action="store_true", help="only FP8 rows with (emulated) FP8 GEMMs")
    fp8.add_argument("--no-fp8", action="store_true", help="no FP8 rows")
    ap.add_argument(
        "--layout",
        action="append",
        metavar="DPxEP",
        help="EP/DP layouts to check per rank on DP spawned gloo ranks, e.g. 2x2 4x2 4x4 (default: none, "
        "one device); parameters in --dtype (default bf16), moments fp32 and bf16",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.layout:
        return main_parallel(args)
    presets = args.preset or ["tiny", "small"]
    dtypes = args.dtype or ["fp32"]
    if args.fp8 or args.fp8_gemm:
        runs = [(p, dt, "gemm" if args.fp8_gemm else "storage") for p in presets for dt in (args.dtype or ["bf16"])]
    else:
        runs = default_runs(presets, dtypes, None if args.no_fp8 else "storage")
    rows = []
    for preset, dtype, f8 in runs:
        for policy in args.recompute or POLICIES:
            rows.append(
                measure(preset, args.seq_len, args.micro_batch, dtype, dtype if dtype == "bf16" else "fp32", policy, f8)
            )
            if not args.json:
                print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"\nseq_len {args.seq_len}, micro-batch {args.micro_batch}; moments in the parameter dtype\n")
        print(markdown(rows))
    return 0 if all(row_ok(r) for r in rows) else 1


def main_parallel(args) -> int:
    rows = []
    for text in args.layout:
        dp, _, ep = text.lower().partition("x")
        for preset in args.preset or ["tiny"]:
            for dtype in args.dtype or ["bf16"]:
                for moments in sorted({"fp32", dtype}):
                    for policy in args.recompute or ["none"]:
                        got = measure_parallel(
                            preset, int(dp), int(ep), args.seq_len, args.micro_batch, dtype, moments, policy
                        )
                        rows += got
                        if not args.json:
                            print("\n".join(markdown_parallel(got).splitlines()[2:]), flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"\nseq_len {args.seq_len}, micro-batch {args.micro_batch} per rank; ZeRO-1; one step\n")
        print(markdown_parallel(rows))
    return 0 if all(parallel_row_ok(r) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
