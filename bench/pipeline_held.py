"""Peak memory of a ``dsv3 train --pp`` rank that holds only its stages, against one process and the code before.

Trains the same run (a 118M-parameter DeepSeek-V3-style MoE config, 474 MB of FP32 weights, with the CPU EMA,
validation at the last step) in one process and under ``torchrun`` (gloo on CPU) in pipeline layouts, once with
this tree's sources and once with ``--before SRC`` (a checkout whose ranks held every stage and broadcast the
others' stages after each step), interleaved. Reports each run's busiest rank's peak RSS (``peak_memory_gib``
of metrics.jsonl, the max over ranks), the same minus the peak of a tiny-model run of the same layout (the
runtime's own footprint: Python, torch, gloo), its ratio to one process, and the median ``step_time``.

Usage: ``python bench/pipeline_held.py [--before /work/main/src] [--steps 4] [--layouts 1f1b2:2 dualpipev4:2 dualpipe2:2]``
(a layout: ``<schedule><pp>:<processes>``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
BIG = dict(
    hidden_size=512,
    intermediate_size=2048,
    moe_intermediate_size=512,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    q_lora_rank=256,
    kv_lora_rank=128,
    qk_nope_head_dim=64,
    qk_rope_head_dim=32,
    v_head_dim=64,
    n_routed_experts=16,
)
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_routed_experts=8,
)


def _setup(root: Path) -> list[str]:
    """The corpus and tokenizer of bench/pp_layouts.py, and the two model configs; returns the data flags."""
    from pp_layouts import _setup as corpus_and_tokenizer

    from dsv3.config import ModelConfig

    flags = corpus_and_tokenizer(root)
    common = ModelConfig.from_json_file(str(root / "config.json")).to_dict()  # pp_layouts' tiny config
    for name, sizes in (("big", BIG), ("tiny", TINY)):
        ModelConfig.from_dict({**common, **sizes}).save(root / f"{name}.json")
    return flags[2:]  # --data, --tokenizer


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(src: str, root: Path, data: list[str], model: str, layout: str | None, steps: int, tag: str) -> dict:
    """One ``dsv3 train`` run; returns its peak (GiB, busiest rank) and median step time after the first step."""
    run_dir = root / tag
    args = [
        "train",
        "--model",
        str(root / f"{model}.json"),
        *data,
        "--seq-len",
        "64",
        "--micro-batch",
        "1",
        "--global-batch",
        "4",
        "--steps",
        str(steps),
        "--ema-decay",
        "0.99",
        "--eval-every",
        "1000",
        "--eval-batches",
        "2",
        "--save-every",
        "1000",
        "--sample-tokens",
        "0",
        "--no-progress",
        "--no-tensorboard",
        "--run-dir",
        str(run_dir),
    ]
    if layout is None:
        cmd = [sys.executable, "-m", "dsv3", *args]
    else:
        spec, _, procs = layout.partition(":")
        schedule = spec.rstrip("0123456789")
        cmd = [
            str(Path(sys.executable).with_name("torchrun")),
            f"--nproc-per-node={procs}",
            "--master-addr=127.0.0.1",
            f"--master-port={_port()}",
            "-m",
            "dsv3",
            *args,
            "--pp",
            spec[len(schedule) :],
            "--pipeline",
            schedule,
        ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=src)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode:
        raise SystemExit(f"{tag} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps_ = [r for r in records if "step_time" in r]
    return {
        "peak": max(r["peak_memory_gib"] for r in steps_),
        "step_time": statistics.median(r["step_time"] for r in steps_[1:]),
        "val": [r["val_loss"] for r in records if "val_loss" in r],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="/work/main/src", help="sources of the code to compare against")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--layouts", nargs="+", default=["1f1b2:2", "dualpipev4:2", "dualpipe2:2"])
    args = parser.parse_args()
    print(f"load average {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = _setup(root)
        rows = []
        for layout in [None, *args.layouts]:
            name = layout or "one process"
            got = {}
            for code, src in (("after", SRC), ("before", args.before)):  # interleaved, same machine load
                big = _run(src, root, data, "big", layout, args.steps, f"{code}-big-{name}")
                tiny = _run(src, root, data, "tiny", layout, args.steps, f"{code}-tiny-{name}")
                got[code] = dict(big, model=big["peak"] - tiny["peak"])
            rows.append((name, got))
        one = rows[0][1]
        print(f"{'layout':>14} {'code':>6} {'peak GiB':>9} {'minus tiny':>10} {'/ one proc':>10} {'step s':>7}  val")
        for name, got in rows:
            for code in ("before", "after"):
                g = got[code]
                print(
                    f"{name:>14} {code:>6} {g['peak']:9.3f} {g['model']:10.3f} "
                    f"{g['model'] / one[code]['model']:10.2f} {g['step_time']:7.3f}  {g['val']}"
                )
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
