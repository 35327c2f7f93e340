"""``dsv3 memory``: measure the bytes a training configuration really holds."""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table

from dsv3.cli.options import add_config_arguments, overrides_from_args
from dsv3.train.config import load_train_config

#: The run-config fields ``dsv3 memory`` takes (same flags, types and choices as ``dsv3 train``).
FIELDS = (
    "model",
    "data",
    "tokenizer",
    "seq_len",
    "micro_batch",
    "recompute",
    "fp8",
    "optim_states",
    "ema_decay",
    "device",
)


def register(sub) -> None:
    p = sub.add_parser(
        "memory",
        help="measure weights/grads/optimizer/EMA/activation bytes of a training config",
        description="Run a few real training steps and report measured bytes per category "
        "(activations: per micro-batch, held between forward and backward).",
    )
    add_config_arguments(p, only=FIELDS)
    p.add_argument("--steps", type=int, default=3, help="timed steps after the measured one (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=run)


def run(args) -> int:
    from dsv3.train.measure import measure_config  # torch only when the command runs: `dsv3 plan` starts without it

    config = load_train_config(None, overrides_from_args(args))
    config.data.global_batch = config.data.micro_batch  # one micro-batch a step
    report = measure_config(config, steps=max(1, args.steps))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    table = Table(
        title=f"measured memory: {config.model.name}, micro-batch {config.data.micro_batch} x "
        f"{config.data.seq_len} tokens"
    )
    table.add_column("category")
    table.add_column("MiB", justify="right")
    rows = [
        ("parameters", report.params),
        ("gradients", report.grads),
        ("optimizer states", report.optimizer),
        ("training state (device)", report.training_state),
        ("EMA (host memory)", report.ema_host),
        ("activations / micro-batch", report.activations),
        ("  of which autograd-saved outside recomputation", report.saved_tensors),
    ]
    if report.peak_device is not None:
        rows.append(("peak device memory", report.peak_device))
    for name, value in rows:
        table.add_row(name, f"{value / 2**20:,.2f}")
    Console().print(table)
    print(f"throughput: {report.tokens_per_s:,.0f} tokens/s")
    return 0
