"""What the manifest of a sharded (DCP) checkpoint costs: save time with and without it, and verify time.

Saves the model of ``--preset`` (one process, ZeRO-1 at dp = 1: model, master weights and both AdamW
moments, as a torchrun run saves them) as ``dcp-*`` checkpoints, alternating saves with the manifest (sizes +
SHA-256 of every file, :mod:`dsv3.checkpoint.manifest`) and saves with it switched off, ``--repeats`` times
each, interleaved; then times :func:`dsv3.checkpoint.manifest.verify_sharded` (what a resume or an export adds).
Prints the medians, the checkpoint size and the ratio with / without the manifest.

    python bench/sharded_manifest.py [--preset small] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from unittest import mock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch

    import dsv3.parallel.checkpoint as pc
    from dsv3.checkpoint.manifest import verify_sharded
    from dsv3.config import load_preset
    from dsv3.model import DeepseekV3ForCausalLM
    from dsv3.parallel.world import ParallelContext
    from dsv3.parallel.zero import ZeroAdamW

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(load_preset(args.preset))
    ctx = ParallelContext.single()
    optimizer = ZeroAdamW(model, ctx, lr=1e-3)
    times: dict[str, list[float]] = {"with manifest": [], "without": [], "verify": []}
    with tempfile.TemporaryDirectory() as run:
        step = 0
        for _ in range(args.repeats):
            for label in ("with manifest", "without"):
                step += 1
                off = label == "without"
                with (
                    mock.patch.object(
                        pc, "write_sharded_manifest", (lambda *a: None) if off else pc.write_sharded_manifest
                    ),
                    mock.patch.object(pc, "shard_entries", (lambda *a: {}) if off else pc.shard_entries),
                ):
                    started = time.perf_counter()
                    path = pc.save_sharded(run, step, model=model, optimizer=optimizer, ctx=ctx, keep_last=2)
                    times[label].append(time.perf_counter() - started)
                if label == "with manifest":
                    started = time.perf_counter()
                    assert verify_sharded(path) is None
                    times["verify"].append(time.perf_counter() - started)
        size = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.preset}: checkpoint {size / 2**20:.1f} MiB, {args.repeats} saves each (interleaved), medians:")
    for k, v in med.items():
        print(f"  {k:14s} {v * 1e3:8.1f} ms")
    print(f"  save with / without manifest: {med['with manifest'] / med['without']:.3f}")


if __name__ == "__main__":
    main()
