"""``dsv3 memory``: measure the bytes a training configuration really holds."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("memory", help="measure weights/grads/optimizer/EMA/activation bytes of a training config",
                       description="Run a few real training steps and report measured bytes per category "
                                   "(activations: per micro-batch, held between forward and backward).")
    p.add_argument("--model", default="tiny", help="preset name or config.json (default tiny)")
    p.add_argument("--data", default=None, help="training data (default: the Python standard library)")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--recompute", default="none", choices=["none", "selective", "full"])
    p.add_argument("--fp8", action="store_true")
    p.add_argument("--optim-states", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--ema-decay", type=float, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=3, help="timed steps after the measured one")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from dsv3.memory.measure import measure_config
    from dsv3.train.config import TrainConfig

    config = TrainConfig(model=args.model, data=args.data, tokenizer=args.tokenizer, seq_len=args.seq_len,
                         micro_batch=args.micro_batch, global_batch=args.micro_batch, recompute=args.recompute,
                         fp8=args.fp8, optim_states=args.optim_states, ema_decay=args.ema_decay, device=args.device)
    report = measure_config(config, steps=max(1, args.steps))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"measured memory: {args.model}, micro-batch {args.micro_batch} x {args.seq_len} tokens")
    table.add_column("category")
    table.add_column("MiB", justify="right")
    rows = [("parameters", report.params), ("gradients", report.grads), ("optimizer states", report.optimizer),
            ("training state (device)", report.training_state), ("EMA (host memory)", report.ema_host),
            ("activations / micro-batch", report.activations),
            ("  of which autograd-saved outside recomputation", report.saved_tensors)]
    if report.peak_device is not None:
        rows.append(("peak device memory", report.peak_device))
    for name, value in rows:
        table.add_row(name, f"{value / 2**20:,.2f}")
    Console().print(table)
    print(f"throughput: {report.tokens_per_s:,.0f} tokens/s")
    return 0
