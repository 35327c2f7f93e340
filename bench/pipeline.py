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

    python bench/pipeline.py [--steps 6] [--microbatches 8] [--seq-len 64] [--micro-batch 2] [--layers 8]
                             [--vocab 1024] [--mtp 0]
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

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=120))
        cfg = load_preset("tiny").replace(num_hidden_layers=args.layers, vocab_size=args.vocab,
                                          num_nextn_predict_layers=args.mtp)
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
    return [[(op, t0 + s, t0 + e) for op, s, e in trace if op.is_compute]
            for t0, trace in (per_device[d] for d in sorted(per_device))]


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
    p.add_argument("--trace-dir", default=None, help="write a Chrome-trace JSON and measured/simulated timeline "
                                                    "PNGs per schedule (last step)")
    p.add_argument("--out", default=None, help="append the markdown table to this file")
    args = p.parse_args(argv)
    if args.steps < 3:
        p.error("--steps must be >= 3 (two warm-up steps, then measured ones)")

    import torch.multiprocessing as mp

    from dsv3.parallel.pipeline.executor import TraceEvent, write_chrome_trace
    from dsv3.parallel.pipeline.schedules import build_schedule
    from dsv3.plan.simulate import run_schedule

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

        times = OpTimes(**{k: statistics.median(getattr(t, k) for t, _ in all_times) for k in ("f", "b", "w", "fb", "comm")})
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
            plot_timeline(measured, os.path.join(args.trace_dir, f"{name}-pp{pp}-measured.png"),
                          title=f"{name} pp={pp}: measured, makespan {makespan * 1e3:.0f} ms")
            plot_timeline(sim, os.path.join(args.trace_dir, f"{name}-pp{pp}-simulated.png"),
                          title=f"{name} pp={pp}: simulated from the measured op times, makespan {sim.makespan * 1e3:.0f} ms")
            last = {d: [TraceEvent(op, s, e) for op, s, e in outs[d][(name, pp)][1][-1][1]] for d in (0, 1)}
            t0s = {d: outs[d][(name, pp)][1][-1][0] for d in (0, 1)}
            base = min(t0s.values())
            shifted = {d: [TraceEvent(e.op, e.start + t0s[d] - base, e.end + t0s[d] - base) for e in tr]
                       for d, tr in last.items()}
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
            f"{'-' if ov is None else f'{ov:.3f}'} |")
    lines.append("")
    lines.append(f"Largest makespan deviation from the simulator: {worst * 100:.1f} % (target 15 %).")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n\n")
    return 0 if worst <= 0.15 else 1


if __name__ == "__main__":
    sys.exit(main())
