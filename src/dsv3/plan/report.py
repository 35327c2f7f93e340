"""Human tables (rich) and the JSON document of ``dsv3 plan``.

``render_*`` functions print to a :class:`rich.console.Console`; ``*_json``
functions return the one JSON document ``--json`` prints. Neither imports torch.
"""

from __future__ import annotations

import json
import math

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dsv3.layout import RECOMPUTE_MODES
from dsv3.plan.params import COMPONENTS
from dsv3.plan.precision import format_bytes, format_count

_COMPONENT_NAMES = {
    "embedding": "embedding (V x d)",
    "attn.q_a_proj": "MLA q_a_proj  W^DQ",
    "attn.q_b_proj": "MLA q_b_proj  W^UQ, W^QR",
    "attn.q_proj": "MLA q_proj  W^Q",
    "attn.kv_a_proj_with_mqa": "MLA kv_a_proj_with_mqa  W^DKV, W^KR",
    "attn.kv_b_proj": "MLA kv_b_proj  W^UK, W^UV",
    "attn.o_proj": "MLA o_proj  W^O",
    "dense_mlp": "dense MLP",
    "router": "router (gate)",
    "shared_experts": "shared experts",
    "routed_experts": "routed experts",
    "norms": "RMSNorm weights",
    "output_head": "output head",
    "mtp.eh_proj": "MTP eh_proj",
    "rotary": "RoPE frequencies (buffer)",
}


def _layers(layers: list[int]) -> str:
    if not layers:
        return "-"
    return f"{layers[0]}" if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f}"


def dumps(doc: dict) -> str:
    """JSON text; non-finite floats become null so the document stays valid JSON."""

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(doc), indent=2)


# ---------------------------------------------------------------------------- plan
def params_table(plan) -> Table:
    p = plan.params
    table = Table(title="Parameters", title_justify="left")
    table.add_column("component")
    table.add_column("main model", justify="right")
    table.add_column("MTP modules", justify="right")
    main, mtp = p.components(), p.components(p.mtp_tensors)
    for c in COMPONENTS:
        if c in main or c in mtp:
            table.add_row(_COMPONENT_NAMES[c], f"{main[c]:,}" if c in main else "", f"{mtp[c]:,}" if c in mtp else "")
    table.add_section()
    table.add_row("total (trainable)", f"{p.total:,}", f"{p.mtp_total:,}")
    table.add_row("routing-bias buffers b_i", f"{p.routing_bias:,}", f"{p.mtp_routing_bias:,}")
    table.add_row("total with routing bias", f"{p.total_with_bias:,}", f"{p.mtp_total + p.mtp_routing_bias:,}")
    table.add_row("activated per token", f"{p.activated:,}", f"{p.mtp_activated:,}")
    return table


def stages_table(plan) -> Table:
    lay = plan.layout
    table = Table(
        title=f"Memory per device, by pipeline stage (GiB; {lay.schedule}, {lay.microbatches} micro-batches)",
        title_justify="left",
    )
    for col in (
        "stage",
        "layers",
        "extras",
        "params/dev",
        "weights",
        "grads",
        "optimizer",
        "act/mb",
        "in flight",
        "activations",
        "buffers",
        "frag.",
        "total",
    ):
        table.add_column(col, justify="left" if col in ("layers", "extras") else "right")
    for s in plan.stages:
        table.add_row(
            str(s.stage),
            _layers(s.layers),
            ",".join(s.extras) or "-",
            format_count(s.params_per_device),
            _gib(s.weights),
            _gib(s.grads),
            _gib(s.optimizer),
            _gib(s.activations_per_microbatch),
            str(s.microbatches_in_flight),
            _gib(s.activations),
            _gib(sum(s.comm_buffers.values())),
            _gib(s.fragmentation),
            _gib(s.total),
        )
    return table


def devices_table(plan) -> Table:
    table = Table(title="Memory per pipeline device (GiB; a device holds two stages)", title_justify="left")
    for col in (
        "device",
        "stages",
        "params",
        "weights",
        "grads",
        "optimizer",
        "activations",
        "buffers",
        "frag.",
        "total",
        "fits",
    ):
        table.add_column(col, justify="right")
    for d in plan.devices:
        fits = "" if plan.gpu_memory is None else ("yes" if d.total <= plan.gpu_memory else "NO")
        table.add_row(
            str(d.device),
            "+".join(map(str, d.stages)),
            format_count(d.params),
            _gib(d.weights),
            _gib(d.grads),
            _gib(d.optimizer),
            _gib(d.activations),
            _gib(sum(d.comm_buffers.values())),
            _gib(d.fragmentation),
            _gib(d.total),
            fits,
        )
    return table


def optimizer_lines(plan, most: int = 8) -> list[str]:
    """What the optimizer column is: the busiest data-parallel rank of dsv3's ZeRO-1 runtime (per-tensor dim-0
    row chunks, ``parallel/zero.py``) with the ranks' min..max, and the flat ``ceil(n/G)`` split of the ZeRO
    paper beside it; or, for layouts the runtime does not run, the flat split alone."""
    lay = plan.layout
    runtime = [s for s in plan.stages if s.ranks is not None]
    if not runtime:
        if lay.zero == 0:
            why = "ZeRO 0: nothing is sharded, every rank holds all of it"
        elif lay.zero > 1 or lay.tp > 1 or lay.etp > 1:
            why = "dsv3's runtime (ZeRO-1 row chunks) runs TP = ETP = 1, ZeRO-1 only"
        else:
            why = (
                "DualPipe: the paper shards each stage over its 2 x DP replicas; dsv3's runtime keeps each "
                "copy's ZeRO-1 row chunks over DP, about twice this"
            )
        return [f"optimizer: flat ceil(n/G) split of the ZeRO paper (every rank the same); {why}"]
    head = len(runtime) > 1
    out = [
        f"optimizer: runtime (dsv3 ZeRO-1 row chunks, per tensor over DP {lay.dp} / experts over EDP {lay.edp}), "
        f"the busiest DP rank{' of each stage' if head else ''}:"
    ]
    runs: list[list] = []  # consecutive stages with the same numbers share a line
    for s in runtime:
        key = (s.ranks.busiest, s.optimizer, s.ranks.low, s.ranks.high, s.ranks.flat)
        if runs and runs[-1][0] == key and runs[-1][2] == s.stage - 1:
            runs[-1][2] = s.stage
        else:
            runs.append([key, s.stage, s.stage])
    for (busiest, opt, low, high, flat), first, last in runs[:most]:
        spread = "every rank the same" if low == high else f"ranks {format_bytes(low)} .. {format_bytes(high)}"
        where = "" if not head else (f"stage {first}: " if first == last else f"stages {first}-{last}: ")
        out.append(
            f"  {where}DP rank {busiest} holds {format_bytes(opt)} ({opt:,.0f} B; {spread}); "
            f"flat ceil(n/G) split (ZeRO paper): {format_bytes(flat)} ({flat:,.0f} B)"
        )
    if len(runs) > most:
        out.append(f"  ... {len(runs) - most} more lines in --json (optimizer_max of each stage)")
    return out


def compute_table(plan) -> Table:
    f = plan.flops
    table = Table(title="Compute and cost", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    by = f["by_convention"]
    table.add_row(
        f"training FLOPs/token ({f['convention'].replace('_', '-')}{', with MTP' if f['mtp'] else ''})",
        f"{plan.flops_per_token / 1e9:,.1f} GFLOP",
    )
    for conv in ("causal", "non_causal"):
        table.add_row(
            f"  {conv.replace('_', '-')}: with / without MTP",
            f"{by[conv]['with_mtp'] / 1e9:,.1f} / {by[conv]['without_mtp'] / 1e9:,.1f} GFLOP",
        )
    table.add_row("  6 x activated parameters", f"{f['six_n_activated'] / 1e9:,.1f} GFLOP")
    if f["with_recompute_per_token"] != f["training_per_token"]:
        table.add_row(
            f"  executed with {plan.layout.recompute} recompute", f"{f['with_recompute_per_token'] / 1e9:,.1f} GFLOP"
        )
    s = plan.schedule
    table.add_row(
        "estimated step time" + (" (extrapolated from shorter simulations)" if s.extrapolated else ""),
        f"{plan.step_time_s:,.3f} s",
    )
    if s.bubble:
        table.add_row("  pipeline bubble (max over devices)", f"{max(s.bubble):,.3f} s")
    table.add_row("  gradient reduction (not overlapped)", f"{plan.dp_sync_s:,.3f} s")
    src = {"measured": "measured", "assumed_mfu": "from --mfu", "estimated": "estimated"}[plan.throughput.source]
    table.add_row(f"tokens/s per GPU ({src})", f"{plan.throughput.tokens_per_s_per_gpu:,.0f}")
    table.add_row(f"MFU ({src}, peak {plan.hardware.peak_tflops:g} TFLOP/s)", f"{100 * plan.throughput.mfu:.1f} %")
    if plan.cost:
        c = plan.cost
        table.add_row(f"token budget on {c['gpus']:,} GPUs", f"{c['tokens']:.4g} tokens")
        table.add_row("GPU-hours", f"{c['gpu_hours']:,.0f}")
        table.add_row("wall clock", f"{c['wall_clock_days']:,.1f} days")
        if "cost" in c:
            table.add_row(f"cost at {c['price_per_gpu_hour']:g} per GPU-hour", f"{c['cost']:,.0f}")
    return table


def activation_items_tables(plan) -> list[Table]:
    lay = plan.layout
    tables = []
    for unit, items in plan.activation_table().items():
        t = Table(
            title=f"Saved for backward: {unit.replace('_', ' ')} (per token, per device; {lay.attention} attention"
            f"{', FP8 caching' if lay.fp8 else ''})",
            title_justify="left",
        )
        for col in ("tensor", "what", "saved by", "elements", "format", "bytes", *RECOMPUTE_MODES):
            t.add_column(col, justify="right" if col in ("elements", "bytes") else "left")
        totals = {p: 0.0 for p in RECOMPUTE_MODES}
        for i in items:
            marks = ["x" if p in i["kept_by"] else "" for p in totals]
            for p in totals:
                if p in i["kept_by"]:
                    totals[p] += i["bytes_per_token"]
            t.add_row(
                escape(i["name"]),
                escape(i["what"]),
                escape(i["saved_by"]),
                f"{i['elements_per_token']:,.6g}",
                i["dtype"],
                f"{i['bytes_per_token']:,.6g}",
                *marks,
            )
        t.add_section()
        t.add_row("kept bytes per token", "", "", "", "", "", *(f"{v:,.0f}" for v in totals.values()))
        tables.append(t)
    return tables


def render_plan(plan, console: Console, detail: bool = False) -> None:
    lay = plan.layout
    console.print(
        f"[bold]{escape(plan.model_name)}[/bold]: {lay.short()}  |  {lay.gpus:,} GPUs, EDP {lay.edp}, "
        f"{lay.microbatches} micro-batches of {lay.micro_batch} x {lay.seq_len} tokens, "
        f"global batch {lay.batch:,} sequences, {lay.attention} attention"
    )
    pr = plan.precision
    console.print(
        f"precision: weights {pr.weights}, grads {pr.grads}, master {pr.master}, AdamW moments {pr.moments}, "
        f"router {pr.router}, activations {pr.activations}{', FP8-cached activations ' + pr.fp8_cache if lay.fp8 else ''}"
    )
    console.print(params_table(plan))
    console.print(stages_table(plan))
    if any(len(d.stages) > 1 for d in plan.devices):
        console.print(devices_table(plan))
    for line in optimizer_lines(plan):
        console.print(escape(line))
    peak = plan.peak_device_bytes
    line = f"peak device memory: [bold]{format_bytes(peak)}[/bold]"
    if plan.gpu_memory is not None:
        line += f" of {format_bytes(plan.gpu_memory)}: " + (
            "[green]fits[/green]" if plan.fits else "[red]does not fit[/red]"
        )
    console.print(line)
    console.print(compute_table(plan))
    if detail:
        for t in activation_items_tables(plan):
            console.print(t)
        summary = plan.activation_per_token_summary()
        console.print(
            "bytes per token of one layer by recompute policy: "
            + "; ".join(
                f"{k.replace('_', ' ')}: " + ", ".join(f"{p} {v:,.0f}" for p, v in d.items())
                for k, d in summary.items()
            )
        )


def plan_json(plan) -> str:
    return dumps(plan.to_dict())


# ---------------------------------------------------------------------------- schedule
def render_schedule(res, console: Console) -> None:
    t = res.times
    console.print(
        f"[bold]{res.schedule}[/bold]: {res.pp} stages on {res.devices} devices, {res.microbatches} micro-batches; "
        f"F={t.f:g} B={t.b:g} W={t.w:g} F&B={t.fb:g} comm={t.comm:g}"
    )
    table = Table(title="Per device", title_justify="left")
    for col in ("device", "busy", "bubble", "peak activations (micro-batches x 1 stage)"):
        table.add_column(col, justify="right")
    for d in range(res.devices):
        table.add_row(str(d), f"{res.busy[d]:g}", f"{res.bubble[d]:g}", f"{res.peak_activations[d]:g}")
    console.print(table)
    console.print(
        f"makespan {res.makespan:g}, largest bubble {res.max_bubble:g}, idle share {100 * res.bubble_fraction:.1f} %, "
        f"parameters per device {res.params_per_device_factor:g} x one stage"
    )


def schedule_json(res) -> str:
    return dumps(res.to_json())


def render_trace(cmp, console: Console) -> None:
    """``plan schedule --trace``: measured vs simulated makespan and per-device idle (ms), and the op times used."""
    m, s = cmp.measured, cmp.simulated
    ms = 1e3
    console.print(
        f"[bold]{m.schedule}[/bold] trace {cmp.path}: {m.pp} stages on {m.devices} devices, "
        f"{m.microbatches} micro-batches; simulated with the measured median time of each op kind and "
        f"stage, comm={s.times.comm * ms:g} ms"
    )
    table = Table(title="Per device (ms)", title_justify="left")
    for col in ("device", "busy measured", "busy simulated", "idle measured", "idle simulated"):
        table.add_column(col, justify="right")
    for d in range(m.devices):
        table.add_row(
            str(d),
            f"{m.busy[d] * ms:.2f}",
            f"{s.busy[d] * ms:.2f}",
            f"{m.bubble[d] * ms:.2f}",
            f"{s.bubble[d] * ms:.2f}",
        )
    console.print(table)
    per_op = s.times.per_op or {}
    console.print(
        "op times (median ms): "
        + ", ".join(
            f"{k[0]} stage {k[1]}{f'&{k[2]}' if len(k) > 2 else ''} {t * ms:.2f}" for k, t in sorted(per_op.items())
        )
    )
    console.print(
        f"makespan measured {m.makespan * ms:.2f} ms, simulated {s.makespan * ms:.2f} ms, "
        f"measured / simulated {cmp.ratio:.3f}; idle share measured {100 * m.bubble_fraction:.1f} %, "
        f"simulated {100 * s.bubble_fraction:.1f} %"
    )


# ---------------------------------------------------------------------------- search
def render_search(result, console: Console, top: int = 20, show_rejected: int = 30) -> None:
    fits = result.fits
    console.print(
        f"[bold]{escape(result.model_name)}[/bold] on {result.gpus:,} GPUs of {format_bytes(result.gpu_memory)}"
        f"{'' if result.tp_convention == 'megatron' else ' (' + result.tp_convention + ' TP convention)'}: "
        f"{len(result.candidates):,} layouts tried, {len(fits):,} fit, {len(result.rejected):,} rejected"
    )
    table = Table(title=f"Layouts that fit, fastest first (estimated; top {min(top, len(fits))})", title_justify="left")
    for col in (
        "#",
        "PP",
        "TP",
        "EP",
        "ETP",
        "DP",
        "ZeRO",
        "schedule",
        "recompute",
        "µbatches",
        "peak memory",
        "step (s)",
        "tokens/s/GPU",
        "MFU",
    ):
        table.add_column(col, justify="right")
    for rank, c in enumerate(fits[:top], 1):
        lay = c.layout
        table.add_row(
            str(rank),
            str(lay.pp),
            str(lay.tp),
            str(lay.ep),
            str(lay.etp),
            str(lay.dp),
            str(lay.zero),
            lay.schedule,
            lay.recompute,
            str(lay.microbatches),
            format_bytes(c.peak_bytes),
            f"{c.step_time_s:,.2f}",
            f"{c.tokens_per_s_per_gpu:,.0f}",
            f"{100 * c.mfu:.1f} %",
        )
    console.print(table)
    if result.rejected:
        rt = Table(
            title=f"Rejected layouts ({len(result.rejected):,}; first {min(show_rejected, len(result.rejected))} shown)",
            title_justify="left",
        )
        rt.add_column("layout")
        rt.add_column("why it fails")
        for c in result.rejected[:show_rejected]:
            rt.add_row(c.layout.short(), escape(c.reason))
        console.print(rt)
        if len(result.rejected) > show_rejected:
            console.print(
                f"... and {len(result.rejected) - show_rejected:,} more; --all lists every rejected layout, --json gives them all"
            )


def search_json(result) -> str:
    return dumps(result.to_dict())
