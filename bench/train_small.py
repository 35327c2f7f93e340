"""Whole-step training throughput of the ``small`` preset on CPU, through ``dsv3 train`` itself.

Trains the ``small`` preset (about 100M parameters) on the Python standard library with the default
recipe (AdamW, MTP, balance loss, bias update, gradient accumulation) for a few steps in a temporary
run directory, and reports the median tokens/s and step time of the steps after the first (from the
run's own metrics.jsonl), the wall time of the whole run (setup, steps and the final checkpoint) and
the size of that checkpoint (weights plus the full training state).

    python bench/train_small.py [--steps 8] [--seq-len 512] [--micro-batch 4] [--global-batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from dsv3.train.config import TrainConfig
from dsv3.train.loop import train
from dsv3.train.metrics import read_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--extra", default="{}", help="JSON object of further TrainConfig options")
    args = parser.parse_args()
    run_dir = os.path.join(tempfile.mkdtemp(prefix="dsv3-small-"), "run")
    config = TrainConfig.from_dict(
        dict(
            model="small",
            seq_len=args.seq_len,
            micro_batch=args.micro_batch,
            global_batch=args.global_batch,
            steps=args.steps,
            save_every=args.steps,
            eval_every=10**6,
            sample_tokens=0,
            progress=False,
            tensorboard=False,
            run_dir=run_dir,
            **json.loads(args.extra),
        )
    )
    t0 = time.time()
    result = train(config, log=lambda s: None)
    wall = time.time() - t0
    records = [r for r in read_metrics(run_dir) if "tokens_per_s" in r][1:]  # the first step warms up
    tps = statistics.median(r["tokens_per_s"] for r in records)
    step_time = statistics.median(r["step_time"] for r in records)
    ckpt_bytes = sum(os.path.getsize(os.path.join(result.checkpoint, f)) for f in os.listdir(result.checkpoint))
    print(
        json.dumps(
            {
                "model": "small",
                "threads": torch.get_num_threads(),
                "tokens_per_step": args.global_batch * args.seq_len,
                "median_tokens_per_s": tps,
                "median_step_s": step_time,
                "steps": args.steps,
                "wall_s": wall,
                "checkpoint_mib": ckpt_bytes / 2**20,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
