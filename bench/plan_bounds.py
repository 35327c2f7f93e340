"""The planner's bounds, measured: refusals are instant, and the largest accepted inputs finish in bounded time.

    PYTHONPATH=src python bench/plan_bounds.py [--quick]

1. Refusals: in-process ``dsv3 plan ...`` calls with absurd inputs (10^12 GPUs, 10^8 micro-batches, 10^8 layers),
   median wall time of 5 (no interpreter start-up).
2. The balanced stage split (``dsv3.layout.balanced_stage_layers``) against the reference dynamic
   programme it replaced (the full O(pp n^2) scan, kept below), on the same inputs in the same run: same
   splits, medians of 3.
3. The largest steps: a DualPipe step at the simulation bound (PP16 x 2,048 micro-batches = 32,768 stage
   micro-batches, simulated op by op) and one far beyond it (10^6 micro-batches, extrapolated), once each.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dsv3.cli import main  # noqa: E402
from dsv3.config import load_preset  # noqa: E402
from dsv3.layout import balanced_stage_layers  # noqa: E402
from dsv3.plan.layout import Layout  # noqa: E402
from dsv3.plan.planner import make_plan  # noqa: E402


def reference_split(layer_costs, first_extra, last_extra, pp):
    """The split before the bounds work: every start of every stage scanned (O(pp n^2))."""
    n = len(layer_costs)
    prefix = [0.0]
    for c in layer_costs:
        prefix.append(prefix[-1] + c)
    inf = (float("inf"), float("inf"))

    def cost(stage, a, b):
        extra = (first_extra if stage == 0 else 0.0) + (last_extra if stage == pp - 1 else 0.0)
        return prefix[b] - prefix[a] + extra

    best = [[inf] * (n + 1) for _ in range(pp + 1)]
    choice = [[0] * (n + 1) for _ in range(pp + 1)]
    best[0][0] = (0.0, 0.0)
    for k in range(1, pp + 1):
        for j in range(k, n - (pp - k) + 1):
            cand, arg = inf, 0
            for i in range(k - 1, j):
                prev = best[k - 1][i]
                if prev[0] == float("inf"):
                    continue
                c = cost(k - 1, i, j)
                val = (max(prev[0], c), prev[1] + c * c)
                if val < cand:
                    cand, arg = val, i
            best[k][j] = cand
            choice[k][j] = arg
    out, j = [], n
    for k in range(pp, 0, -1):
        i = choice[k][j]
        out.append(j - i)
        j = i
    return tuple(reversed(out))


def timed(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def quiet_main(argv):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        rc = main(argv)
    return rc, err.getvalue().strip()


def run(quick: bool) -> None:
    print("1. refusals (median of 5, in-process)")
    cases = [
        ["plan", "search", "--preset", "deepseek-v3", "--gpus", str(10**12), "--gpu-memory", "80GiB"],
        ["plan", "search", "--gpus", "2048", "--gpu-memory", "80GiB"],
        ["plan", "schedule", "--schedule", "1f1b", "--pp", "4", "--microbatches", str(10**8)],
        ["plan", "--preset", "deepseek-v3", "--dp", str(10**12)],
        ["plan", "--preset", "tiny", "--micro-batch", "9" * 400],
    ]
    for argv in cases:
        t, (rc, err) = timed(lambda: quiet_main(argv), 5)
        print(f"  {t * 1e3:8.2f} ms  exit {rc}  {' '.join(argv)[:70]}\n             {err[:110]}")

    print("2. balanced stage split, pruned vs the reference full scan (median of 3, same inputs)")
    sizes = [(61, 16), (128, 64), (256, 128)] if quick else [(61, 16), (128, 64), (256, 128), (512, 256)]
    for n, pp in sizes:
        costs = [1.0 + (i % 3) for i in range(n)]
        t_new, a = timed(lambda: balanced_stage_layers(costs, 0.5, 2.0, pp), 3)
        t_ref, b = timed(lambda: reference_split(costs, 0.5, 2.0, pp), 1 if n >= 512 else 3)
        assert a == b, (n, pp)
        print(
            f"  n={n:4d} pp={pp:4d}: pruned {t_new:8.3f} s, reference {t_ref:8.3f} s, ratio {t_ref / t_new:6.1f}x, same split"
        )

    print("3. the largest steps (once each)")
    v3 = load_preset("deepseek-v3")
    for m, what in ((2048, "at the simulation bound, simulated"), (10**6, "beyond it, extrapolated")):
        lay = Layout(pp=16, ep=64, dp=128, schedule="dualpipe", global_batch=128 * m)
        t, plan = timed(lambda: make_plan(v3, lay), 1)
        print(
            f"  DeepSeek-V3 PP16 DualPipe {m:,} micro-batches ({what}): {t:6.2f} s, "
            f"extrapolated={plan.schedule.extrapolated}, step {plan.step_time_s:,.1f} s"
        )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="skip the 512-layer reference split (25 s)")
    run(ap.parse_args().quick)
