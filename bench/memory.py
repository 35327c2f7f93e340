"""Memory savings of the report, measured: each saving alone and all together, against plain FP32.

For one model (default the ``small`` preset) and one micro-batch shape, each configuration trains a
few real steps on the Python standard library and reports measured bytes per category (see
``dsv3.memory.measure``): parameters, gradients, optimizer states, EMA (host memory), activations per
micro-batch (storages alive between forward and backward), the device-resident training state
(weights + gradients + optimizer) and tokens/s, with ratios against the plain FP32 run. Everything is
measured in one process: the bytes one configuration after another, the speed with all configurations
built and taking turns step by step (so that drift of a shared machine's speed hits all alike).

    python bench/memory.py [--model small] [--seq-len 512] [--micro-batch 4] [--steps 3] [--json out.json]

Targets (issue 6): all savings together cut activation bytes per micro-batch by >= 50% and training-state
bytes by >= 25%, for at most 30% lower tokens/s.
"""

from __future__ import annotations

import argparse
import json
import statistics

from dsv3.train.config import TrainConfig
from dsv3.train.measure import prepare_config

# On a CPU there are no FP8 GEMMs: "FP8 activation caching" keeps the recipe's FP8 activation storage
# with exact GEMMs (fp8_gemm=False); the full recipe, emulated (every GEMM operand quantised and
# dequantised in software), is listed for reference. On a Hopper GPU use fp8_gemm=True throughout.
CONFIGS = {
    "plain FP32": {},
    "selective recompute": {"recompute": "selective"},
    "FP8 activation caching": {"fp8": True, "fp8_gemm": False},
    "FP8 recipe (emulated GEMMs)": {"fp8": True},
    "BF16 AdamW moments": {"optim_states": "bf16"},
    "CPU EMA": {"ema_decay": 0.999},
    "all together": {
        "recompute": "selective",
        "fp8": True,
        "fp8_gemm": False,
        "optim_states": "bf16",
        "ema_decay": 0.999,
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=None, help="names of configurations to run")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    sessions = {}
    for name, changes in CONFIGS.items():
        if args.only and name not in args.only:
            continue
        config = TrainConfig.from_dict(
            dict(
                model=args.model,
                seq_len=args.seq_len,
                micro_batch=args.micro_batch,
                global_batch=args.micro_batch,
                **changes,
            )
        )
        sessions[name] = prepare_config(config, name)
    # Bytes: one configuration at a time (a warm-up step, then one step under the trackers).
    reports = {name: session.measure(steps=0) for name, session in sessions.items()}
    # Speed: the configurations take turns step by step, so that a machine whose speed drifts
    # (a shared VM) slows them all alike; median step time per configuration.
    times = {name: [] for name in sessions}
    for _ in range(args.steps):
        for name, session in sessions.items():
            times[name].append(session.step())
    for name, session in sessions.items():
        if session.ema is not None:
            session.ema.wait()
        session.close()
        r = reports[name]
        r.tokens_per_s = args.seq_len * args.micro_batch / statistics.median(times[name])
        print(
            f"{name}: activations {r.activations / 2**20:.1f} MiB, state {r.training_state / 2**20:.1f} MiB, "
            f"{r.tokens_per_s:,.0f} tok/s",
            flush=True,
        )
    base = reports.get("plain FP32")
    mib = 2**20
    print()
    print(
        "| configuration | params MiB | grads MiB | optimizer MiB | EMA (host) MiB | training state MiB | "
        "activations / micro-batch MiB | tokens/s | state vs FP32 | activations vs FP32 | tokens/s vs FP32 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in reports.items():
        rel = (lambda a, b: f"{a / b:.2f}x") if base else (lambda a, b: "-")
        print(
            f"| {name} | {r.params / mib:.1f} | {r.grads / mib:.1f} | {r.optimizer / mib:.1f} | "
            f"{r.ema_host / mib:.1f} | {r.training_state / mib:.1f} | {r.activations / mib:.1f} | "
            f"{r.tokens_per_s:,.0f} | {rel(r.training_state, base.training_state) if base else '-'} | "
            f"{rel(r.activations, base.activations) if base else '-'} | "
            f"{rel(r.tokens_per_s, base.tokens_per_s) if base else '-'} |"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({k: v.to_dict() for k, v in reports.items()}, fh, indent=2)


if __name__ == "__main__":
    main()
