"""``dsv3 train`` step time in pipeline x data x expert-parallel layouts against one process.

Trains the same tiny run (a 4-layer DeepSeek-V3-style MoE config, a 512-token BPE on a few stdlib
sources, FP32) once in one process and once per layout under ``torchrun`` (gloo on CPU), and reports
the median ``step_time`` of the steps after the first (metrics.jsonl), its ratio to one process,
and the largest relative per-step loss difference to one process (the layouts train the same run).

Usage: ``python bench/pp_layouts.py [--steps 5] [--layouts pp2,dp2,ep2:4 dualpipev4,dp2,ep2:4 dp4,ep2:4]``
(a layout: comma-separated ``ppN`` / ``<schedule>N`` / ``dpN`` / ``epN``, then ``:processes``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

SCHEDULES = ("1f1b", "zb1p", "dualpipev", "dualpipe")


def _setup(root: Path) -> list[str]:
    from dsv3.config import ModelConfig
    from dsv3.data.tokenizer import train_bpe_tokenizer

    corpus = root / "corpus"
    corpus.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "shlex.py", "fnmatch.py", "colorsys.py", "bisect.py", "heapq.py", "glob.py"):
        (corpus / (name + ".txt")).write_text((stdlib / name).read_text(encoding="utf-8"), encoding="utf-8")
    train_bpe_tokenizer(sorted(corpus.iterdir()), 512).save(str(root / "tokenizer.json"))
    cfg = dict(
        model_type="deepseek_v3",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=4,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_shared_experts=1,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        num_nextn_predict_layers=1,
        max_position_embeddings=256,
    )
    ModelConfig.from_dict(cfg).save(root / "config.json")
    return ["--model", str(root / "config.json"), "--data", str(corpus), "--tokenizer", str(root / "tokenizer.json")]


def _flags(layout: str) -> tuple[list[str], int]:
    spec, _, procs = layout.partition(":")
    flags = []
    for part in spec.split(","):
        name = part.rstrip("0123456789")
        value = part[len(name) :]
        if name in SCHEDULES:
            flags += ["--pp", value, "--pipeline", name]
        else:
            flags += [f"--{name}", value]
    return flags, int(procs or 1)


def _run(common: list[str], run_dir: Path, flags: list[str], procs: int, steps: int) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [
        "train",
        *common,
        "--seq-len",
        "32",
        "--micro-batch",
        "1",
        "--global-batch",
        "16",
        "--steps",
        str(steps),
        "--eps",
        "1e-3",
        "--eval-every",
        "1000",
        "--eval-batches",
        "1",
        "--save-every",
        "1000",
        "--sample-tokens",
        "0",
        "--no-progress",
        "--no-tensorboard",
        "--run-dir",
        str(run_dir),
        *flags,
    ]
    if procs == 1:
        cmd = [sys.executable, "-m", "dsv3", *args]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [
            str(Path(sys.executable).with_name("torchrun")),
            f"--nproc-per-node={procs}",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
            "-m",
            "dsv3",
            *args,
        ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600, env=env)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--layouts", nargs="+", default=["pp2,dp2,ep2:4", "dualpipev4,dp2,ep2:4", "dp4,ep2:4"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        common = _setup(root)
        ref = _run(common, root / "one", [], 1, args.steps)
        ref_t = statistics.median(r["step_time"] for r in ref[1:])
        print(f"{'layout':28s} {'procs':>5s} {'median step s':>14s} {'vs one process':>15s} {'max rel loss diff':>18s}")
        print(f"{'one process':28s} {1:5d} {ref_t:14.3f} {1.0:15.2f} {0.0:18.1e}")
        for i, layout in enumerate(args.layouts):
            flags, procs = _flags(layout)
            got = _run(common, root / f"l{i}", flags, procs, args.steps)
            t = statistics.median(r["step_time"] for r in got[1:])
            diff = max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(got, ref))
            print(f"{' '.join(flags):28s} {procs:5d} {t:14.3f} {t / ref_t:15.2f} {diff:18.1e}")


if __name__ == "__main__":
    main()
