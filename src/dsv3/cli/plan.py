"""``dsv3 plan``: what every device holds and what a run costs, for any parallel layout (no torch).

    dsv3 plan --preset deepseek-v3 --pp 16 --ep 64 --dp 128 --schedule dualpipe --recompute selective --fp8
    dsv3 plan schedule --schedule dualpipe --pp 8 --microbatches 20 --f 1 --b 2 --w 0.5 --fb 2.5 --plot t.png
    dsv3 plan schedule --trace runs/pp/pipeline_trace.json --plot measured.png
    dsv3 plan search --preset deepseek-v3 --gpus 2048 --gpu-memory 80GiB --global-batch 15360 --fp8

The library functions are :func:`dsv3.plan.planner.make_plan`,
:func:`dsv3.plan.simulate.simulate`, :func:`dsv3.plan.trace.compare_trace` and
:func:`dsv3.plan.search.search`.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys

from rich.console import Console

from dsv3.config import RECIPE_DEFAULTS, load_preset, resolve_model_config
from dsv3.errors import ConfigError, DsV3Error, clip
from dsv3.layout import ATTENTION_IMPLS, RECOMPUTE_MODES, SCHEDULES, TP_CONVENTIONS, pipeline_devices
from dsv3.plan.cost import DEFAULT_PEAK_TFLOPS, Hardware, parse_count
from dsv3.plan.layout import Layout
from dsv3.plan.limits import check_float, check_gpus, check_pipeline, check_plot
from dsv3.plan.planner import make_plan
from dsv3.plan.precision import PRECISION_PRESETS, Precision
from dsv3.plan.report import (
    dumps,
    plan_json,
    render_plan,
    render_schedule,
    render_search,
    render_trace,
    schedule_json,
    search_json,
)
from dsv3.plan.search import search
from dsv3.plan.simulate import simulate
from dsv3.plan.timeline import plot_timeline, plot_timelines
from dsv3.plan.trace import compare_trace
from dsv3.utils.outputs import check_output_file, is_dsv3_png
from dsv3.utils.size import parse_size


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what} {clip(text)} must be integers separated by commas, like 4,4,4,3") from None
    if not values:
        raise ConfigError(f"{what} {clip(text)} is empty; give integers separated by commas")
    return values


def _or_list(names) -> str:
    """``a, b or c``: the choices of :mod:`dsv3.layout` for a help line."""
    return f"{', '.join(names[:-1])} or {names[-1]}"


def _words(text: str) -> list[str]:
    return [x.strip().lower() for x in str(text).split(",") if x.strip()]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", help="a shipped preset (tiny, small, deepseek-v3, deepseek-v2-lite)")
    g.add_argument("--config", help="a config.json (or a model directory holding one)")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tp-convention",
        default="megatron",
        choices=TP_CONVENTIONS,
        help="what tensor parallelism splits: megatron (default; dsv3 and Megatron-Core split the shared "
        "experts and the RoPE query rows W^QR) or zhang-su (arXiv 2502.07846: both replicated on every "
        "TP rank, the whole MoE block sharded by ZeRO over EDP)",
    )
    p.add_argument(
        "--seq-len", type=int, default=None, help="tokens per sequence (default: min(4096, the model's maximum))"
    )
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch (default 1)")
    p.add_argument(
        "--global-batch",
        type=int,
        default=None,
        help="sequences per optimizer step (default: the fewest micro-batches that fill the pipeline)",
    )
    p.add_argument("--fp8", action="store_true", help="cache activations in FP8 as the DeepSeek-V3 FP8 recipe does")
    p.add_argument(
        "--attention",
        default=ATTENTION_IMPLS[0],
        help=f"{_or_list(ATTENTION_IMPLS)} (fused: FlashAttention/SDPA, the default; eager keeps s x s scores)",
    )
    p.add_argument("--no-mtp", action="store_true", help="do not train the config's MTP modules")
    p.add_argument("--no-sequence-parallel", action="store_true", help="keep TP-replicated activations whole")
    p.add_argument(
        "--precision",
        default=None,
        help="per-item formats, e.g. weights=fp32,moments=fp32 (items: weights, grads, master, moments, "
        "router, router_compute, activations, stats, fp8_cache, attn_out_cache)",
    )
    p.add_argument("--precision-preset", default="v3", help="v3 (the report's recipe, default), bf16 or fp32")
    p.add_argument("--fragmentation", type=float, default=0.10, help="allocator allowance, fraction of the rest (0.10)")
    p.add_argument("--flops", default="causal", help="attention FLOP convention: causal (default) or non-causal")
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="peak dense TFLOP/s of one GPU (default 989, H800/H100 BF16)"
    )
    p.add_argument("--efficiency", type=float, default=0.5, help="assumed fraction of peak the GEMMs reach (0.5)")
    p.add_argument(
        "--nvlink-gbps", type=float, default=160.0, help="GB/s per GPU inside a node (160, the report's H800)"
    )
    p.add_argument("--ib-gbps", type=float, default=50.0, help="GB/s per GPU between nodes (50)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (8)")
    p.add_argument("--gpu-memory", default=None, help="memory per GPU, e.g. 80GiB, to check the fit")
    p.add_argument("--json", action="store_true", help="print one JSON document")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan",
        help="plan a training run: parameters, per-device memory, FLOPs, schedule and cost (no torch)",
        description="Plan a training run of a DeepSeek-V3-architecture model for a parallel layout.",
        allow_abbrev=False,  # `plan schedule --f` must not be read as an abbreviation of `plan --fp8`
    )
    _add_model_args(p)
    for name, default, what in (
        ("--pp", 1, "pipeline stages"),
        ("--tp", 1, "tensor-parallel size"),
        ("--ep", 1, "expert-parallel size"),
        ("--etp", 1, "expert tensor-parallel size"),
        ("--dp", None, "data-parallel size (default: from --gpus, else 1)"),
        ("--zero", 1, "ZeRO stage 0-3 (default 1)"),
    ):
        p.add_argument(name, type=int, default=default, help=what)
    p.add_argument("--recompute", default=RECOMPUTE_MODES[0], help=f"{_or_list(RECOMPUTE_MODES)} (default none)")
    p.add_argument("--schedule", default=SCHEDULES[0], help=f"{_or_list(SCHEDULES)} (default 1f1b)")
    p.add_argument("--stage-layers", default=None, help="layers per stage, e.g. 4,4,4,3 (default: balanced)")
    _add_run_args(p)
    p.add_argument("--detail", action="store_true", help="also print the itemised tensors saved for backward")
    p.add_argument("--tokens", default=None, help="token budget, e.g. 14.8T, for GPU-hours and cost")
    p.add_argument("--gpus", type=int, default=None, help="GPUs of the run (sets --dp when it is not given)")
    tp = p.add_mutually_exclusive_group()
    tp.add_argument("--mfu", type=float, default=None, help="assumed model FLOPs utilisation, e.g. 0.4")
    tp.add_argument("--tokens-per-s-per-gpu", type=float, default=None, help="measured throughput")
    p.add_argument("--price-per-gpu-hour", type=float, default=None, help="price of one GPU-hour, for the cost")
    p.set_defaults(func=run)

    sub = p.add_subparsers(dest="plan_command", metavar="{schedule,search}", parser_class=type(p))
    _register_schedule(sub)
    _register_search(sub)


def _register_schedule(sub) -> None:
    """``dsv3 plan schedule``: simulate a pipeline schedule (or a measured trace) and draw it."""
    s = sub.add_parser(
        "schedule",
        help="simulate a pipeline schedule and draw its per-device timeline",
        description="Simulate one step of a pipeline schedule (DualPipe README conventions).",
        allow_abbrev=False,
    )
    s.add_argument("--schedule", default=None, help=f"{_or_list(SCHEDULES)} (with --trace: from the trace)")
    s.add_argument(
        "--pp",
        type=int,
        default=None,
        help="pipeline stages (DualPipeV runs them on pp/2 devices; with --trace: from the trace)",
    )
    s.add_argument(
        "--microbatches", type=int, default=None, help="micro-batches per step (with --trace: from the trace)"
    )
    s.add_argument("--f", type=float, default=None, help="forward time of one stage and micro-batch (1)")
    s.add_argument("--b", type=float, default=None, help="full backward time (inputs + weights) (2)")
    s.add_argument("--w", type=float, default=None, help="weight-gradient part of --b (1)")
    s.add_argument("--fb", type=float, default=None, help="overlapped forward+backward pair (default f + b)")
    s.add_argument("--comm", type=float, default=0.0, help="point-to-point latency (with --trace: in seconds)")
    s.add_argument(
        "--trace",
        default=None,
        help="a dsv3 train --trace timeline (pipeline_trace.json): simulate it with its measured op times "
        "(median per kind and stage) and compare; --plot draws measured above simulated",
    )
    s.add_argument(
        "--plot",
        default=None,
        help="write the timeline to this PNG (a new file, or replacing a PNG dsv3 drew; any other "
        "existing file is refused)",
    )
    s.add_argument("--json", action="store_true", help="print one JSON document")
    s.set_defaults(func=run_schedule)


def _register_search(sub) -> None:
    """``dsv3 plan search``: the layouts of N GPUs that fit, fastest first."""
    q = sub.add_parser(
        "search",
        help="list the layouts of N GPUs that fit, ranked by estimated step time",
        description="Try every layout of --gpus GPUs; list those that fit, fastest first, and why the rest fail.",
        allow_abbrev=False,
    )
    _add_model_args(q)  # required here: a search of an unnamed model would silently rank layouts of `tiny`
    q.add_argument("--gpus", type=int, required=True, help="GPUs to lay the run out on (at most 1,048,576)")
    for name, what in (
        ("--pp", "pipeline stages"),
        ("--tp", "TP sizes"),
        ("--ep", "EP sizes"),
        ("--etp", "ETP sizes"),
        ("--zero", "ZeRO stages (default 1)"),
    ):
        q.add_argument(name, default=None, help=f"{what} to try, comma-separated (default: all that apply)")
    q.add_argument("--recompute", default=None, help=f"policies to try (default {','.join(RECOMPUTE_MODES)})")
    q.add_argument("--schedule", default=None, help=f"schedules to try (default {','.join(SCHEDULES)})")
    _add_run_args(q)
    q.add_argument("--top", type=int, default=20, help="fitting layouts to show (planned exactly)")
    q.add_argument("--all", action="store_true", help="list every rejected layout")
    q.set_defaults(func=run_search)


# ---------------------------------------------------------------------------- helpers
def _model(args, required: bool = False):
    """The model to plan and its name; ``tiny`` when neither --preset nor --config is given, unless ``required``."""

    if args.config:
        _check_config_file(args.config)
        try:
            return resolve_model_config(args.config), args.config
        except DsV3Error:
            raise
        except UnicodeDecodeError:
            raise ConfigError(f"model config {args.config} is not UTF-8 text; give a config.json") from None
        except OSError as exc:
            raise ConfigError(f"cannot read model config {args.config}: {exc.strerror or exc}") from None
        except (ValueError, TypeError, KeyError, OverflowError, RecursionError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"model config {args.config} is malformed: {first}") from None
    if args.preset is None and required:
        raise ConfigError(
            f"dsv3 plan {args.plan_command} needs the model to plan: give --preset NAME (tiny, small, deepseek-v3, "
            f"deepseek-v2-lite) or --config PATH"
        )
    name = args.preset or "tiny"
    return load_preset(name), name


#: A config.json is a few KB; anything this large is the wrong file, and reading it would cost unbounded memory.
MAX_CONFIG_BYTES = 16 * 2**20


def _check_config_file(path: str) -> None:
    """Refuse, before reading it, a config that is not a regular file (/dev/zero, a FIFO) or is absurdly large."""

    target = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        st = os.stat(target)
    except OSError:
        return  # missing: resolve_model_config names the presets and the path in its message
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"model config {clip(target)} is not a regular file; give a config.json")
    if st.st_size > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"model config {clip(target)} is {st.st_size:,} bytes, not a config.json (a few KB); give the right file"
        )


def _precision(args):

    key = str(args.precision_preset).lower()
    if key not in PRECISION_PRESETS:
        raise ConfigError(
            f"unknown --precision-preset {clip(args.precision_preset)}; choose one of {', '.join(PRECISION_PRESETS)}"
        )
    return Precision.parse(args.precision, PRECISION_PRESETS[key])


def _hardware(args):

    return Hardware(
        peak_tflops=args.peak_tflops if args.peak_tflops is not None else DEFAULT_PEAK_TFLOPS,
        efficiency=args.efficiency,
        nvlink_gbps=args.nvlink_gbps,
        ib_gbps=args.ib_gbps,
        gpus_per_node=args.gpus_per_node,
    )


def _causal(args) -> bool:
    conv = str(args.flops).lower().replace("_", "-")
    if conv not in ("causal", "non-causal"):
        raise ConfigError(f"unknown --flops convention {clip(args.flops)}; choose causal or non-causal")
    return conv == "causal"


def _common(args, cfg) -> dict:

    seq_len = args.seq_len if args.seq_len is not None else min(4096, cfg.max_position_embeddings)
    return dict(
        seq_len=seq_len,
        micro_batch=args.micro_batch,
        global_batch=args.global_batch,
        fp8=args.fp8,
        attention=str(args.attention).lower(),
        mtp=not args.no_mtp,
        # the sequence-wise balance loss is on unless the config.json sets alpha (an extension key) to 0
        balance_loss=cfg.recipe().get("seq_aux_alpha", RECIPE_DEFAULTS["seq_aux_alpha"]) > 0,
        gpu_memory=parse_size(args.gpu_memory, "--gpu-memory") if args.gpu_memory is not None else None,
    )


def _console():

    return Console(width=None if sys.stdout.isatty() else 200, soft_wrap=False)


# ---------------------------------------------------------------------------- commands
def run(args) -> int:

    cfg, name = _model(args)
    common = _common(args, cfg)
    schedule = str(args.schedule).lower()
    devices = pipeline_devices(args.pp, schedule) if args.pp % 2 == 0 else args.pp  # odd PP: validate says why
    dp = args.dp
    if args.gpus is not None:
        check_gpus("gpus", args.gpus)
        per_replica = max(devices, 1) * max(args.tp, 1)
        if dp is None:
            if args.gpus % per_replica:
                raise ConfigError(
                    f"--gpus {args.gpus} is not a multiple of pipeline devices x TP = {per_replica}; "
                    f"choose a GPU count that is, or give --dp"
                )
            dp = args.gpus // per_replica
        elif dp * per_replica != args.gpus:
            raise ConfigError(
                f"--gpus {args.gpus} disagrees with pipeline devices x TP x DP = {per_replica} x {dp} = "
                f"{per_replica * dp}; drop one of them or make them agree"
            )
    stage_layers = tuple(_ints(args.stage_layers, "--stage-layers")) if args.stage_layers else None
    layout = Layout(
        pp=args.pp,
        tp=args.tp,
        ep=args.ep,
        etp=args.etp,
        dp=dp if dp is not None else 1,
        zero=args.zero,
        recompute=str(args.recompute).lower(),
        seq_len=common["seq_len"],
        micro_batch=common["micro_batch"],
        global_batch=common["global_batch"],
        schedule=schedule,
        fp8=common["fp8"],
        stage_layers=stage_layers,
        attention=common["attention"],
        mtp=common["mtp"],
        balance_loss=common["balance_loss"],
        sequence_parallel=not args.no_sequence_parallel,
        tp_convention=args.tp_convention,
    )
    plan = make_plan(
        cfg,
        layout,
        _precision(args),
        _hardware(args),
        model_name=name,
        causal=_causal(args),
        fragmentation=args.fragmentation,
        gpu_memory=common["gpu_memory"],
        tokens=parse_count(args.tokens, "--tokens") if args.tokens is not None else None,
        mfu=args.mfu,
        tokens_per_s_per_gpu=args.tokens_per_s_per_gpu,
        price_per_gpu_hour=args.price_per_gpu_hour,
    )
    if args.json:
        print(plan_json(plan))
    else:
        render_plan(plan, _console(), detail=args.detail)
    return 0


def _check_plot_path(path: str | None) -> None:
    """Refuse a --plot path that would replace a foreign file, a directory or a path under a file."""
    if path is not None:
        check_output_file(path, "--plot", is_own=is_dsv3_png, what="a PNG that dsv3 drew")


def run_schedule(args) -> int:

    _check_plot_path(args.plot)
    if args.trace is not None:
        return _run_trace(args)
    missing = [f"--{k}" for k in ("schedule", "pp", "microbatches") if getattr(args, k) is None]
    if missing:
        raise ConfigError(
            f"dsv3 plan schedule needs {', '.join(missing)} (or --trace FILE of a dsv3 train --trace run)"
        )
    schedule = str(args.schedule).lower()
    check_pipeline(args.pp, args.microbatches)
    if args.plot:  # refuse a figure too large to draw before simulating
        check_plot(pipeline_devices(args.pp, schedule), args.pp, args.microbatches)
    res = simulate(
        schedule,
        pp=args.pp,
        microbatches=args.microbatches,
        f=_or(args.f, 1.0),
        b=_or(args.b, 2.0),
        w=_or(args.w, 1.0),
        fb=args.fb,
        comm=args.comm,
    )
    if args.plot:
        plot_timeline(res, args.plot)
    if args.json:
        print(schedule_json(res))
    else:
        render_schedule(res, _console())
        if args.plot:
            print(f"timeline written to {args.plot}")
    return 0


def _or(value, default):
    return default if value is None else value


def _run_trace(args) -> int:
    """``plan schedule --trace FILE``: the measured step beside its simulation from the measured op times."""

    given = [f"--{k}" for k in ("f", "b", "w", "fb") if getattr(args, k) is not None]
    if given:
        raise ConfigError(
            f"{', '.join(given)} cannot go with --trace, whose measured op times the simulation uses; drop them"
        )
    comm = check_float("comm", args.comm)
    cmp = compare_trace(args.trace, schedule=args.schedule, pp=args.pp, microbatches=args.microbatches, comm=comm)
    if args.plot:
        m, s = cmp.measured, cmp.simulated
        plot_timelines(
            [
                (
                    m,
                    f"measured: {m.schedule} pp={m.pp}, {m.microbatches} micro-batches; makespan "
                    f"{m.makespan * 1e3:.4g} ms, max idle {max(m.bubble) * 1e3:.4g} ms (time in s)",
                ),
                (
                    s,
                    f"simulated from the measured op times: makespan {s.makespan * 1e3:.4g} ms, max idle "
                    f"{max(s.bubble) * 1e3:.4g} ms (measured / simulated {cmp.ratio:.3f})",
                ),
            ],
            args.plot,
        )
    if args.json:
        print(dumps(cmp.to_json()))
    else:
        render_trace(cmp, _console())
        if args.plot:
            print(f"measured and simulated timelines written to {args.plot}")
    return 0


def run_search(args) -> int:

    cfg, name = _model(args, required=True)
    if args.gpu_memory is None:
        raise ConfigError("dsv3 plan search needs --gpu-memory, e.g. --gpu-memory 80GiB")
    common = _common(args, cfg)
    grid = {}
    for key in ("pp", "tp", "ep", "etp", "zero"):
        value = getattr(args, key)
        if value is not None:
            grid[key] = _ints(value, f"--{key}")
    for key in ("recompute", "schedule"):
        value = getattr(args, key)
        if value is not None:
            grid[key] = _words(value)
    for r in grid.get("recompute", []):
        if r not in RECOMPUTE_MODES:
            raise ConfigError(f"unknown --recompute {clip(r)}; choose from {', '.join(RECOMPUTE_MODES)}")
    result = search(
        cfg,
        args.gpus,
        parse_size(args.gpu_memory, "--gpu-memory"),
        model_name=name,
        grid=grid,
        seq_len=common["seq_len"],
        micro_batch=common["micro_batch"],
        global_batch=common["global_batch"],
        fp8=common["fp8"],
        attention=common["attention"],
        mtp=common["mtp"],
        balance_loss=common["balance_loss"],
        precision=_precision(args),
        hardware=_hardware(args),
        fragmentation=args.fragmentation,
        causal=_causal(args),
        top=args.top,
        tp_convention=args.tp_convention,
    )
    if args.json:
        print(search_json(result))
    else:
        render_search(result, _console(), top=args.top, show_rejected=len(result.rejected) if args.all else 30)
    return 0
