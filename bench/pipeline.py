"""Does the pipeline runtime run the bubble the planner predicts? Measured vs simulated, per schedule.

Spawns 2 gloo processes on this machine (one pipeline device each, one thread each) and,
for each schedule (1F1B, ZB1P and DualPipe with pp=2; DualPipeV with pp=4 stages on the
2 devices), trains the ``tiny`` preset for ``--steps`` steps of ``--microbatches``
micro-batches with :class:`dsv3.parallel.pipeline.executor.PipelineRuntime`:

* the first two steps warm up; every later step is *measured*: its makespan (first op
  start to last op end over both devices, on the shared monotonic clock) and per-device
  idle time (makespan minus the device's compute-op time);
* the same step's executed op times, averaged per kind over both devices, are fed to
  :func:`dsv3.plan.simulate.run_schedule` on the same op lists (``f`` = mean F,
  ``b`` = mean BW or mean B + mean W, ``w`` = mean W, ``fb`` = mean FB; ``comm`` = the
  ping-pong latency of one activation), which predicts makespan and idle from the op
  times and the schedule's dependencies alone; the table reports medians over the measured
  steps and measured / simulated (target: within 15 %). The simulator takes one time per op
  kind for all stages; the measured per-device idle shows what a heavier last stage adds.

It also reports time(FB) against time(F) + time(BW) of the same run: with the local
dispatcher there is no all-to-all to hide, so this measures only what interleaving the
steps of two micro-batches costs or gains on CPU.

The *overlap* part (``--part overlap``) measures what the FB op hides of the expert-parallel
all-to-all (:mod:`dsv3.parallel.pipeline.overlap`): 2 gloo processes with ep=2 (experts sharded,
each rank its own micro-batches) run one stage holding the whole model (pp=1) and time, per repeat
(each op after a barrier), ``T_F`` = F(a), ``T_FB`` = F(b) interleaved with B(a), ``T_B`` = B(b)
(full backward). ``T_comm`` is the time of the FB op's payload all-to-alls (the dispatch and combine
of F(b) and the gradient exchanges of B(a), the same splits and bytes, recorded in the FB op) replayed
blocking one after the other with no compute, in the same run. The fraction of communication hidden is
``(T_F + T_B - T_FB) / T_comm`` from the medians, and also the median over repeats of each repeat's own
difference and fraction (paired: the ops of one repeat run within a second, under the same load). It also reports the time blocked in the waits of the
all-to-alls (payloads and token counts: exposed communication, including waiting for the slower peer)
in F + B and in FB. The
same protocol without expert parallelism (every
rank all experts, local dispatcher, no all-to-all) is the control: it shows what interleaving alone
costs or gains. ``--trace-dir`` also writes the last FB op's component timeline (ATTN / DISPATCH /
MLP / COMBINE of both micro-batches and the exchanges in flight) of both ranks as Chrome-trace JSON and PNG.

    python bench/pipeline.py [--steps 6] [--microbatches 8] [--seq-len 64] [--micro-batch 2] [--layers 8]
                             [--vocab 1024] [--mtp 0] [--part all|schedules|overlap] [--repeats 12]
                             [--trace-dir DIR] [--out results.md]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
import traceback
from datetime import timedelta

SCHEDULES = [("1f1b", 2), ("zb1p", 2), ("dualpipe", 2), ("dualpipev", 4)]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches(step: int, n: int, micro: int, seq: int, vocab: int):
    import torch

    g = torch.Generator().manual_seed(step)
    out = []
    for _ in range(n):
        seqs = torch.randint(0, vocab, (micro, seq + 1), generator=g)
        out.append((seqs[:, :-1].contiguous(), seqs[:, 1:].contiguous()))
    return out


def _worker(rank: int, world: int, port: int, args, queue) -> None:
    try:
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        from dsv3.config import load_preset
        from dsv3.model.transformer import DeepseekV3ForCausalLM
        from dsv3.parallel.pipeline.executor import PipelineRuntime

        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
        )
        cfg = load_preset("tiny").replace(
            num_hidden_layers=args.layers, vocab_size=args.vocab, num_nextn_predict_layers=args.mtp
        )
        out = {}
        # P2P latency of one activation: ping-pong on a fresh pair group.
        buf = torch.zeros(args.micro_batch, args.seq_len, cfg.hidden_size)
        lat = []
        for _ in range(20):
            dist.barrier()
            t = time.perf_counter()
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            else:
                dist.recv(buf, 0)
                dist.send(buf, 0)
            lat.append((time.perf_counter() - t) / 2)
        out["comm"] = statistics.median(lat)
        for name, pp in SCHEDULES:
            torch.manual_seed(0)
            model = DeepseekV3ForCausalLM(cfg)
            model.train()
            rt = PipelineRuntime(model, name, pp, seq_len=args.seq_len)
            opt = torch.optim.AdamW(rt.owned_parameters(), lr=1e-3)
            steps = []
            for step in range(args.steps):
                dist.barrier()
                res = rt.step(_batches(step, args.microbatches, args.micro_batch, args.seq_len, cfg.vocab_size))
                opt.step()
                opt.zero_grad(set_to_none=True)
                steps.append((res.t0, [(e.op, e.start, e.end) for e in res.trace]))
            out[(name, pp)] = (rt.layers, steps)
        queue.put((rank, out, None))
        dist.destroy_process_group()
    except BaseException:
        queue.put((rank, None, traceback.format_exc()))


def _overlap_worker(rank: int, world: int, port: int, args, queue) -> None:
    """The overlap measurement on one rank (see the module docstring): per variant, lists of T_F, T_FB, T_B, T_comm."""
    try:
        os.environ.update(
            {
                "OMP_NUM_THREADS": "1",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(world),
            }
        )
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        from dsv3.config import load_preset
        from dsv3.model.transformer import DeepseekV3ForCausalLM
        from dsv3.parallel import dispatch
        from dsv3.parallel.dispatch import shard_experts
        from dsv3.parallel.pipeline.stages import MicroBatch, PipelineStage, StageRecord
        from dsv3.parallel.world import init_parallel

        cfg = load_preset("tiny").replace(
            num_hidden_layers=args.layers, vocab_size=args.vocab, num_nextn_predict_layers=0
        )
        ctx = init_parallel(dp=world, ep=world, n_routed_experts=cfg.n_routed_experts, timeout_s=120)
        recorded: list | None = None
        exchange_init = dispatch._Exchange.__init__

        def recording_init(self, t, in_splits, out_splits, *a, **k):  # the FB op's payload exchanges
            if recorded is not None:
                recorded.append((list(in_splits), list(out_splits), t.shape[1] * t.element_size()))
            exchange_init(self, t, in_splits, out_splits, *a, **k)

        dispatch._Exchange.__init__ = recording_init
        a2a = dist.all_to_all_single
        waited = [0.0]

        class TimedWork:  # time blocked in the waits of asynchronous all-to-alls (exposed communication)
            def __init__(self, work) -> None:
                self.work = work

            def wait(self, *a):
                t = time.perf_counter()
                try:
                    return self.work.wait(*a)
                finally:
                    waited[0] += time.perf_counter() - t

        def timed_a2a(*a, **k):
            work = a2a(*a, **k)
            return TimedWork(work) if k.get("async_op") else work

        dist.all_to_all_single = timed_a2a
        done = object()
        out = {}
        for variant in ("ep2", "local"):
            torch.manual_seed(0)
            model = DeepseekV3ForCausalLM(cfg)
            model.train()
            if variant == "ep2":
                shard_experts(model, ctx, dispatcher="alltoall")
            stage = PipelineStage(model, 0, 1, list(range(cfg.num_hidden_layers)))
            cos, sin = model.model.rotary_emb(torch.arange(args.seq_len))
            cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
            data = _batches(100 + rank, 2, args.micro_batch, args.seq_len, cfg.vocab_size)
            mbs = [MicroBatch(ids, labels, cos, sin, 0.5) for ids, labels in data]
            times: dict[str, list[float]] = {"F": [], "FB": [], "B": [], "comm": [], "wait_seq": [], "wait_fb": []}
            events = None
            for rep in range(2 + args.repeats):
                recs = [StageRecord(), StageRecord()]
                dist.barrier()
                waited[0] = 0.0
                t = time.perf_counter()
                for _ in stage.forward_steps(None, mbs[0], recs[0]):
                    pass
                t_f = time.perf_counter() - t
                wait_f, waited[0] = waited[0], 0.0
                recorded = [] if variant == "ep2" else None
                stage.events = [] if rep == 1 + args.repeats else None
                dist.barrier()
                t = time.perf_counter()
                active = [stage.forward_steps(None, mbs[1], recs[1]), stage.backward_steps(recs[0], None, 0.5)]
                while active:  # the runtime's FB op
                    for gen in list(active):
                        if next(gen, done) is done:
                            active.remove(gen)
                t_fb = time.perf_counter() - t
                wait_fb, waited[0] = waited[0], 0.0
                events, stage.events = stage.events or events, None
                exchanges, recorded = recorded or [], None
                dist.barrier()
                t = time.perf_counter()
                for _ in stage.backward_steps(recs[1], None, 0.5):
                    pass
                t_b = time.perf_counter() - t
                wait_seq = wait_f + waited[0]
                model.zero_grad(set_to_none=True)
                # The FB op's exchanges replayed blocking, without compute.
                bufs = [
                    (torch.empty(sum(i), c, dtype=torch.uint8), torch.empty(sum(o), c, dtype=torch.uint8), i, o)
                    for i, o, c in exchanges
                ]
                dist.barrier()
                t = time.perf_counter()
                for send, recv, i, o in bufs:
                    a2a(recv, send, o, i, group=ctx.ep_group)
                t_comm = time.perf_counter() - t
                if rep >= 2:
                    for k, v in (
                        ("F", t_f),
                        ("FB", t_fb),
                        ("B", t_b),
                        ("comm", t_comm),
                        ("wait_seq", wait_seq),
                        ("wait_fb", wait_fb),
                    ):
                        times[k].append(v)
            out[variant] = {"times": times, "events": events, "exchanges": len(exchanges)}
        dispatch._Exchange.__init__, dist.all_to_all_single = exchange_init, a2a
        queue.put((rank, out, None))
        dist.destroy_process_group()
    except BaseException:
        queue.put((rank, None, traceback.format_exc()))


def _spawn(target, args, world: int = 2) -> dict | str:
    """Run ``target(rank, world, port, args, queue)`` on ``world`` spawned processes; results by rank or an error."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _port()
    procs = [ctx.Process(target=target, args=(r, world, port, args, queue), daemon=True) for r in range(world)]
    for proc in procs:
        proc.start()
    try:
        got = [queue.get(timeout=600) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    errors = [err for _, _, err in got if err]
    if errors:
        return errors[0]
    return {rank: out for rank, out, _ in got}


def _component_trace(events_by_rank: dict[int, list]) -> dict:
    """Chrome-trace JSON of FB-op component events (``PipelineStage.events``) of several ranks: per rank a lane
    for the forward's components, one for the backward's, and one with each exchange from start to wait."""
    base = min(e[2] for evs in events_by_rank.values() for e in evs)
    out = []
    for rank, evs in sorted(events_by_rank.items()):
        for tid, name in ((0, "F (micro-batch b)"), (1, "B (micro-batch a)"), (2, "all-to-all in flight")):
            out.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": tid, "args": {"name": name}})
        out.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}})
        starts: dict[tuple[str, str], list[float]] = {}
        for phase, name, t0, t1 in sorted(evs, key=lambda e: e[2]):
            if "." not in name:
                out.append(
                    {
                        "name": name,
                        "cat": phase,
                        "ph": "X",
                        "pid": rank,
                        "tid": 0 if phase == "F" else 1,
                        "ts": (t0 - base) * 1e6,
                        "dur": (t1 - t0) * 1e6,
                    }
                )
            elif name.endswith(".start"):
                starts.setdefault((phase, name[:-6]), []).append(t0)
            else:
                kind = name[:-5]
                s0 = starts[(phase, kind)].pop(0)
                label = f"{phase} {kind}" if phase == "F" else f"B {kind} grad"
                out.append(
                    {
                        "name": label,
                        "cat": "comm",
                        "ph": "X",
                        "pid": rank,
                        "tid": 2,
                        "ts": (s0 - base) * 1e6,
                        "dur": (t0 - s0) * 1e6,
                    }
                )
    return {"traceEvents": out, "displayTimeUnit": "ms"}


def _plot_components(trace: dict, path: str, title: str) -> None:
    """A PNG of :func:`_component_trace`: one row per (rank, lane)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    colours = {
        "ATTN": "#8fb8de",
        "DISPATCH": "#f2b179",
        "MLP": "#9ccf8f",
        "COMBINE": "#d9a3c7",
        "FFN": "#c8c8c8",
        "EMB": "#e8e8e8",
        "HEAD": "#bcbcbc",
    }
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    rows = sorted(names)
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    end = max(e["ts"] + e["dur"] for e in spans) / 1e3
    fig = Figure(figsize=(14, 0.5 * len(rows) + 1.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.16, 0.18, 0.82, 0.72))
    for e in spans:
        y = len(rows) - 1 - rows.index((e["pid"], e["tid"]))
        x0, w = e["ts"] / 1e3, e["dur"] / 1e3
        comm = e["cat"] == "comm"
        colour = "#f4d35e" if comm else colours.get(e["name"], "#dddddd")
        ax.barh(
            y,
            w,
            left=x0,
            height=0.35 if comm else 0.7,
            color=colour,
            edgecolor="black",
            linewidth=0.4,
            hatch="//" if e["cat"] == "B" else None,
        )
        if w > end / 70:
            ax.text(
                x0 + w / 2,
                y,
                e["name"].replace(" grad", "").replace("dispatch", "D").replace("combine", "C")
                if comm
                else e["name"][:4],
                ha="center",
                va="center",
                fontsize=6,
            )
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"rank {p}: {names[(p, t)]}" for p, t in reversed(rows)], fontsize=8)
    ax.set_xlim(0, end)
    ax.set_xlabel(
        "ms since the FB op began (hatched: backward of micro-batch a; yellow: an all-to-all from start to wait)"
    )
    ax.set_title(title, fontsize=10)
    fig.savefig(path)


def _overlap(args) -> tuple[list[str], bool]:
    """Run the overlap measurement; returns the markdown lines and whether it ran."""
    outs = _spawn(_overlap_worker, args)
    if isinstance(outs, str):
        print(outs, file=sys.stderr)
        return [], False
    ms = 1e3
    lines = [
        f"Overlap of the EP all-to-all in the FB op: `python bench/pipeline.py --part overlap --repeats {args.repeats} "
        f"--seq-len {args.seq_len} --micro-batch {args.micro_batch} --layers {args.layers} --vocab {args.vocab}` "
        "(tiny preset, no MTP, 2 gloo processes, 1 thread each, one stage of the whole model; medians over "
        f"{args.repeats} repeats after 2 warm-up ones, both ranks pooled).",
        "",
        "| variant | exchanges in the FB op | T_F ms | T_B ms | T_FB ms | FB / (F + B) | T_comm ms | "
        "T_F + T_B - T_FB ms | hidden = (T_F + T_B - T_FB) / T_comm | paired per repeat: T_F + T_B - T_FB ms | "
        "hidden | blocked in all-to-all waits: F + B ms | FB ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, label in (("ep2", "ep=2, all-to-all dispatcher"), ("local", "control: no EP (local dispatcher)")):
        med = {
            k: statistics.median(v for r in (0, 1) for v in outs[r][variant]["times"][k])
            for k in ("F", "FB", "B", "comm", "wait_seq", "wait_fb")
        }
        saved = med["F"] + med["B"] - med["FB"]
        ep = variant == "ep2" and med["comm"] > 0
        hidden = f"{saved / med['comm']:.2f}" if ep else "-"
        # Paired per repeat (F, FB, B of one repeat run within a second, under the same machine load).
        per = [outs[r][variant]["times"] for r in (0, 1)]
        pairs = [(t["F"][i] + t["B"][i] - t["FB"][i], t["comm"][i]) for t in per for i in range(len(t["F"]))]
        paired = statistics.median(d for d, _ in pairs)
        paired_hidden = f"{statistics.median(d / c for d, c in pairs):.2f}" if ep else "-"
        lines.append(
            f"| {label} | {outs[0][variant]['exchanges']} | {med['F'] * ms:.1f} | {med['B'] * ms:.1f} | "
            f"{med['FB'] * ms:.1f} | {med['FB'] / (med['F'] + med['B']):.3f} | "
            f"{med['comm'] * ms if ep else 0:.1f} | {saved * ms:.1f} | {hidden} | {paired * ms:.1f} | "
            f"{paired_hidden} | {med['wait_seq'] * ms:.1f} | {med['wait_fb'] * ms:.1f} |"
        )
    if args.trace_dir:
        os.makedirs(args.trace_dir, exist_ok=True)
        trace = _component_trace({r: outs[r]["ep2"]["events"] for r in (0, 1)})
        import json

        from dsv3.utils.io import atomic_write_text

        atomic_write_text(os.path.join(args.trace_dir, "fb-overlap-ep2.json"), json.dumps(trace))
        _plot_components(
            trace,
            os.path.join(args.trace_dir, "fb-overlap-ep2.png"),
            "FB op on 2 EP ranks (pp=1): forward of micro-batch b interleaved with the backward of a, "
            "components and all-to-alls (measured)",
        )
    return lines, True


def _op_times(traces: list[list], comm: float):
    """Simulator op times from executed traces: the mean of each compute kind's durations."""
    from dsv3.plan.simulate import OpTimes

    durations: dict[str, list[float]] = {}
    for trace in traces:
        for op, start, end in trace:
            if op.is_compute:
                durations.setdefault(op.kind, []).append(end - start)
    med = {k: statistics.fmean(v) for k, v in durations.items()}
    f = med["F"]
    w = med.get("W", 0.0)
    b = med["BW"] if "BW" in med else med["B"] + w
    b_split = med.get("B", b - w)
    # The simulator's B op lasts b - w: keep the measured split B when there is one.
    if "B" in med and "BW" in med:
        w = max(0.0, min(b, b - b_split))
    fb = med.get("FB")
    return OpTimes(f=f, b=b, w=w, fb=fb, comm=comm), med


def _executed(per_device: dict[int, tuple[float, list]]) -> list[list]:
    """Each device's compute ops as (op, start, end) on the shared clock (``dsv3.plan.trace``'s form)."""
    return [
        [(op, t0 + s, t0 + e) for op, s, e in trace if op.is_compute]
        for t0, trace in (per_device[d] for d in sorted(per_device))
    ]


def _measured(per_device: dict[int, tuple[float, list]]) -> tuple[float, list[float]]:
    """Makespan (first op start to last op end, shared clock) and per-device idle of one step."""
    from dsv3.plan.trace import measured_span

    makespan, _, idle, _ = measured_span(_executed(per_device))
    return makespan, idle


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--layers", type=int, default=8, help="decoder layers (tiny preset otherwise)")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--mtp", type=int, default=0, help="MTP modules (1 makes the last stage heavier)")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument(
        "--trace-dir",
        default=None,
        help="write a Chrome-trace JSON and measured/simulated timeline PNGs per schedule (last step)",
    )
    p.add_argument("--out", default=None, help="append the markdown table to this file")
    p.add_argument(
        "--part",
        choices=("all", "schedules", "overlap"),
        default="all",
        help="the schedules (measured vs simulated), the EP overlap of the FB op, or both",
    )
    p.add_argument("--repeats", type=int, default=12, help="measured repeats of the overlap part")
    args = p.parse_args(argv)
    if args.steps < 3:
        p.error("--steps must be >= 3 (two warm-up steps, then measured ones)")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    overlap_lines: list[str] = []
    if args.part in ("all", "overlap"):
        overlap_lines, ok = _overlap(args)
        if not ok:
            return 1
        if args.part == "overlap":
            text = "\n".join(overlap_lines)
            print(text)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(text + "\n\n")
            return 0

    import torch.multiprocessing as mp

    from dsv3.parallel.pipeline.executor import TraceEvent, write_chrome_trace
    from dsv3.plan.simulate import run_schedule
    from dsv3.schedules import build_schedule

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _port()
    t_start = time.time()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, args, queue), daemon=True) for r in range(2)]
    for proc in procs:
        proc.start()
    got = [queue.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    errors = [err for _, _, err in got if err]
    if errors:
        print(errors[0], file=sys.stderr)
        return 1
    outs = {rank: out for rank, out, _ in got}
    comm = statistics.median([outs[0]["comm"], outs[1]["comm"]])
    rows = []
    for name, pp in SCHEDULES:
        layers = outs[0][(name, pp)][0]
        schedule = build_schedule(name, pp, args.microbatches)
        spans, sims, idles, sim_idles, all_times = [], [], [], [], []
        for step in range(2, args.steps):
            per_device = {d: outs[d][(name, pp)][1][step] for d in (0, 1)}
            times, med = _op_times([per_device[d][1] for d in (0, 1)], comm)
            sim = run_schedule(schedule, times)
            makespan, idle = _measured(per_device)
            spans.append(makespan)
            sims.append(sim.makespan)
            idles.append(idle)
            sim_idles.append(sim.bubble)
            all_times.append((times, med))
        ratio = statistics.median(m / s for m, s in zip(spans, sims))
        makespan, sim_makespan = statistics.median(spans), statistics.median(sims)
        idle = [statistics.median(i[d] for i in idles) for d in (0, 1)]
        sim_idle = [statistics.median(i[d] for i in sim_idles) for d in (0, 1)]
        from dsv3.plan.simulate import OpTimes

        times = OpTimes(
            **{k: statistics.median(getattr(t, k) for t, _ in all_times) for k in ("f", "b", "w", "fb", "comm")}
        )
        med = {k: statistics.median(m[k] for _, m in all_times) for k in all_times[0][1]}
        overlap = None
        if "FB" in med:
            overlap = med["FB"] / (med["F"] + med.get("BW", med.get("B", 0.0) + med.get("W", 0.0)))
        rows.append((name, pp, layers, times, makespan, sim_makespan, ratio, idle, sim_idle, overlap))
        if args.trace_dir:  # measured beside simulated timeline pictures of the last step
            from dsv3.plan.timeline import plot_timeline
            from dsv3.plan.trace import measured_step

            os.makedirs(args.trace_dir, exist_ok=True)
            per_device = {d: outs[d][(name, pp)][1][-1] for d in (0, 1)}
            times, _ = _op_times([per_device[d][1] for d in (0, 1)], comm)
            sim = run_schedule(schedule, times)
            measured = measured_step(schedule, _executed(per_device), times)
            makespan = measured.makespan
            plot_timeline(
                measured,
                os.path.join(args.trace_dir, f"{name}-pp{pp}-measured.png"),
                title=f"{name} pp={pp}: measured, makespan {makespan * 1e3:.0f} ms",
            )
            plot_timeline(
                sim,
                os.path.join(args.trace_dir, f"{name}-pp{pp}-simulated.png"),
                title=f"{name} pp={pp}: simulated from the measured op times, makespan {sim.makespan * 1e3:.0f} ms",
            )
            last = {d: [TraceEvent(op, s, e) for op, s, e in outs[d][(name, pp)][1][-1][1]] for d in (0, 1)}
            t0s = {d: outs[d][(name, pp)][1][-1][0] for d in (0, 1)}
            base = min(t0s.values())
            shifted = {
                d: [TraceEvent(e.op, e.start + t0s[d] - base, e.end + t0s[d] - base) for e in tr]
                for d, tr in last.items()
            }
            write_chrome_trace(os.path.join(args.trace_dir, f"{name}-pp{pp}.json"), shifted)

    ms = 1e3
    lines = [
        f"Command: `python bench/pipeline.py --steps {args.steps} --microbatches {args.microbatches} "
        f"--seq-len {args.seq_len} --micro-batch {args.micro_batch} --layers {args.layers} --vocab {args.vocab} --mtp {args.mtp}` (tiny preset, 2 gloo processes, 1 thread each; "
        f"{time.time() - t_start:.0f} s). P2P latency (ping-pong, one activation): {comm * ms:.2f} ms.",
        "",
        "| schedule | pp | layers/stage | F ms | B(full) ms | W ms | F&B ms | makespan measured ms | simulated ms | "
        "measured / simulated | idle measured ms (dev 0, 1) | idle simulated ms | FB / (F+B) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    worst = 0.0
    for name, pp, layers, t, mk, smk, ratio, idle, sidle, ov in rows:
        worst = max(worst, abs(ratio - 1))
        lines.append(
            f"| {name} | {pp} | {'/'.join(map(str, layers))} | {t.f * ms:.1f} | {t.b * ms:.1f} | {t.w * ms:.1f} | "
            f"{t.fb * ms:.1f} | {mk * ms:.1f} | {smk * ms:.1f} | {ratio:.3f} | "
            f"{idle[0] * ms:.1f}, {idle[1] * ms:.1f} | {sidle[0] * ms:.1f}, {sidle[1] * ms:.1f} | "
            f"{'-' if ov is None else f'{ov:.3f}'} |"
        )
    lines.append("")
    lines.append(f"Largest makespan deviation from the simulator: {worst * 100:.1f} % (target 15 %).")
    if overlap_lines:
        lines += [""] + overlap_lines
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n\n")
    return 0 if worst <= 0.15 else 1


if __name__ == "__main__":
    sys.exit(main())
