"""A rank killed with SIGKILL does not hang the others: they fail with an error in bounded time."""

from __future__ import annotations

import os
import pickle
import queue
import signal
import time

import pytest
import torch.multiprocessing as mp
from dist_helpers import _entry, free_port


def _victim_or_survivor(rank: int):
    import torch
    import torch.distributed as dist

    from dsv3.parallel.world import init_parallel

    ctx = init_parallel(dp=2, ep=2, timeout_s=20)
    x = torch.ones(4)
    dist.all_reduce(x)  # both alive: works
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    t0 = time.monotonic()
    try:
        for _ in range(3):  # the next collectives need the dead peer
            dist.all_reduce(x)
            from dsv3.parallel.dispatch import AllToAllDispatcher

            AllToAllDispatcher(ctx.ep_group, 2, 0, 4).dispatch(
                torch.randn(3, 8), torch.tensor([[0], [2], [3]]), torch.ones(3, 1)
            )
    except Exception as exc:  # noqa: BLE001 - what the survivor sees
        return time.monotonic() - t0, type(exc).__name__, str(exc)[:300]
    return time.monotonic() - t0, None, "no error"


@pytest.mark.timeout(120)
def test_killed_rank_makes_the_other_fail_fast_instead_of_hanging():
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(_victim_or_survivor, r, 2, port, results, (), {}), daemon=True)
        for r in range(2)
    ]
    for p in procs:
        p.start()
    try:
        rank, ok, value = results.get(timeout=100)
    except queue.Empty:
        pytest.fail("the surviving rank hung after its peer was killed")
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    assert rank == 0 and ok, value
    elapsed, error, message = pickle.loads(value)
    assert error is not None, message  # a clear error, not silence
    assert elapsed < 30  # bounded by the process-group timeout (20 s here); gloo sees the closed socket at once
    assert procs[1].exitcode == -signal.SIGKILL
