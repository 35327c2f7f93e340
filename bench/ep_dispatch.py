"""Expert-parallel dispatch + combine throughput and how much of the all-to-all start/wait hides.

Spawns ``--ranks`` gloo processes on 127.0.0.1 (CPU) or NCCL ones (CUDA, one per GPU). Each rank
routes ``--tokens`` tokens of width ``--dim`` to top-``--topk`` of ``--experts`` experts with the
:class:`dsv3.parallel.dispatch.AllToAllDispatcher` and reports (medians over ``--reps``):

* ``dispatch+combine``: seconds and bytes sent to other ranks per rank, and their ratio (bytes/s);
* ``overlap``: the all-to-all of one micro-batch run between ``dispatch_start``/``dispatch_wait``
  (and ``combine_start``/``combine_wait``) around expert compute of another micro-batch, against
  the same work run one after the other. hidden = (t_comm + t_compute - t_overlapped) / t_comm.

Usage: ``python bench/ep_dispatch.py [--ranks 2] [--tokens 1024] [--dim 512] [--fp8]``
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.multiprocessing as mp


def _worker(rank: int, args, port: int, out) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.ranks)
    )
    torch.set_num_threads(args.threads)
    from dsv3.parallel.dispatch import AllToAllDispatcher
    from dsv3.parallel.world import init_parallel

    ctx = init_parallel(dp=args.ranks, ep=args.ranks)
    dev = ctx.device
    gen = torch.Generator().manual_seed(rank)
    disp = AllToAllDispatcher(ctx.ep_group, ctx.ep, ctx.ep_rank, args.experts, fp8=args.fp8)
    x = torch.randn(args.tokens, args.dim, generator=gen).to(dev)
    idx = torch.stack([torch.randperm(args.experts, generator=gen)[: args.topk] for _ in range(args.tokens)]).to(dev)
    w = torch.rand(args.tokens, args.topk, generator=gen).to(dev)
    n_local = args.experts // args.ranks
    wts = torch.randn(n_local, args.dim, args.dim, generator=gen).to(dev) / args.dim**0.5

    def experts(recv, counts):
        return torch.cat([r @ m for r, m in zip(recv.split(counts.tolist()), wts)]) if recv.numel() else recv

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()
        import torch.distributed as dist

        dist.barrier()

    with torch.no_grad():
        recv, counts, h = disp.dispatch(x, idx, w)  # warm-up; also the compute of "another micro-batch"
        other = (recv.clone(), counts.clone())
        disp.combine(experts(recv, counts), h)
        comm, comp, seq, ovl, nbytes = [], [], [], [], []
        for _ in range(args.reps):
            sync()
            disp.stats.reset()
            t0 = time.perf_counter()
            recv, counts, h = disp.dispatch(x, idx, w)
            disp.combine(recv, h)
            sync()
            comm.append(time.perf_counter() - t0)
            nbytes.append(disp.stats.bytes_sent)
            t0 = time.perf_counter()
            experts(*other)
            sync()
            comp.append(time.perf_counter() - t0)
            t0 = time.perf_counter()  # one after the other
            recv, counts, h = disp.dispatch(x, idx, w)
            experts(*other)
            disp.combine(recv, h)
            sync()
            seq.append(time.perf_counter() - t0)
            t0 = time.perf_counter()  # start/wait around the other micro-batch's experts
            p = disp.dispatch_start(x, idx, w)
            half = len(other[1]) // 2
            experts(other[0][: int(other[1][:half].sum())], other[1][:half])
            recv, counts, h = disp.dispatch_wait(p)
            c = disp.combine_start(recv, h)
            experts(other[0][int(other[1][:half].sum()) :], other[1][half:])
            disp.combine_wait(c)
            sync()
            ovl.append(time.perf_counter() - t0)
    med = statistics.median
    out.put((rank, med(comm), med(comp), med(seq), med(ovl), med(nbytes)))
    ctx.destroy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fp8", action="store_true")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, args, port, out)) for r in range(args.ranks)]
    for p in procs:
        p.start()
    rows = sorted(out.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(60)
    print(
        f"ranks {args.ranks}, tokens/rank {args.tokens}, d {args.dim}, top-{args.topk} of {args.experts} experts, "
        f"fp8 {args.fp8}, torch {torch.__version__}"
    )
    print("rank  comm_s    bytes_sent  MB/s    compute_s  sequential_s  overlapped_s  hidden")
    for rank, comm, comp, seq, ovl, nbytes in rows:
        hidden = (comm + comp - ovl) / comm
        print(
            f"{rank:4d}  {comm:.4f}  {nbytes:10.0f}  {nbytes / comm / 1e6:6.1f}  {comp:.4f}     {seq:.4f}        "
            f"{ovl:.4f}        {hidden:.2f}"
        )


if __name__ == "__main__":
    main()
