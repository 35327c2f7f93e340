"""Start-up time of ``dsv3 train --help``: our argparse generator vs tyro vs jsonargparse (issue 10).

Each candidate builds the ``train`` command line from the sectioned ``TrainConfig`` and
prints its help, in a fresh Python process. The candidates take turns (round robin), so a
shared machine whose load drifts slows them all alike; we report the median wall time and
the median CPU time (user + sys of the child, less sensitive to other users of the machine).

    python bench/cli_startup.py --before /work/main/src --extra-path /tmp/cli-eval --repeats 5

``--before`` is the ``src`` directory of the code before this change (the hand-written
flat-flag parser); ``--extra-path`` is a directory where tyro and jsonargparse are installed
(``pip install --target DIR tyro jsonargparse``): they are not dependencies of dsv3, so
candidates whose import fails are reported as missing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(HERE, "src")

TYRO = """
import tyro
from dsv3.train.config import TrainConfig
tyro.cli(TrainConfig, prog="dsv3 train", args=["--help"])
"""
JSONARGPARSE = """
from jsonargparse import ArgumentParser
from dsv3.train.config import TrainConfig
parser = ArgumentParser(prog="dsv3 train")
parser.add_class_arguments(TrainConfig, "config")
parser.parse_args(["--help"])
"""
PYTHON_ONLY = "import dsv3.train.config"


def candidates(before: str | None, extra: str | None) -> dict[str, tuple[list[str], str]]:
    """name -> (argv, PYTHONPATH)."""
    py = sys.executable
    out: dict[str, tuple[list[str], str]] = {}
    out["python + import dsv3.train.config (floor)"] = ([py, "-c", PYTHON_ONLY], SRC)
    if before:
        out["argparse, before (flat hand-written flags)"] = ([py, "-m", "dsv3", "train", "--help"], before)
    out["argparse generator (this branch)"] = ([py, "-m", "dsv3", "train", "--help"], SRC)
    path = os.pathsep.join(p for p in (extra, SRC) if p)
    out["tyro"] = ([py, "-c", TYRO], path)
    out["jsonargparse"] = ([py, "-c", JSONARGPARSE], path)
    return out


def run_once(argv: list[str], pythonpath: str) -> tuple[float, float] | None:
    """(wall s, child CPU s) of one run, or None if it failed."""
    env = {**os.environ, "PYTHONPATH": pythonpath, "COLUMNS": "110"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        return None
    return wall, usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default=None, help="src/ of the code before the change (optional)")
    parser.add_argument("--extra-path", default=None, help="directory holding tyro and jsonargparse")
    parser.add_argument("--repeats", type=int, default=5, help="runs per candidate (median reported)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()
    cands = candidates(args.before, args.extra_path)
    for argv, path in cands.values():  # warm the file cache and byte-code caches once
        run_once(argv, path)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in cands}
    missing = set()
    for _ in range(args.repeats):
        for name, (argv, path) in cands.items():
            if name in missing:
                continue
            result = run_once(argv, path)
            if result is None:
                missing.add(name)
            else:
                times[name].append(result)
    ref = "argparse generator (this branch)"
    ref_cpu = statistics.median(c for _, c in times[ref])
    rows = {}
    for name, runs in times.items():
        if name in missing or not runs:
            rows[name] = None
            continue
        wall, cpu = statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)
        rows[name] = {"wall_ms": 1000 * wall, "cpu_ms": 1000 * cpu, "cpu_vs_ours": cpu / ref_cpu, "runs": len(runs)}
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'candidate':46s} {'wall ms':>9s} {'CPU ms':>9s} {'CPU x ours':>10s}")
    for name, row in rows.items():
        if row is None:
            print(f"{name:46s} {'(not installed or failed)':>30s}")
        else:
            print(f"{name:46s} {row['wall_ms']:9.0f} {row['cpu_ms']:9.0f} {row['cpu_vs_ours']:10.2f}")


if __name__ == "__main__":
    main()
