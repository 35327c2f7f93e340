"""``dsv3 train``: train a model (default: the tiny preset on the Python standard library)."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    from dsv3.train.config import add_config_arguments

    p = sub.add_parser("train", help="train a model (no arguments: the tiny preset on the Python stdlib)",
                       description="Train a DeepSeek-V3-architecture model. Every option of the run config is a flag; "
                                   "--config reads them from a YAML or TOML file first.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", dest="config_file", default=None, help="YAML or TOML run configuration")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue this run from its latest checkpoint")
    add_config_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from dsv3.train.config import load_train_config, overrides_from_args
    from dsv3.train.loop import train

    overrides = overrides_from_args(args)
    if args.resume is not None:
        result = train(None, resume=args.resume, overrides=overrides)  # type: ignore[arg-type]
    else:
        result = train(load_train_config(args.config_file, overrides))
    if result.val_losses:
        first, last = result.val_losses[0], result.val_losses[-1]
        print(f"validation loss: {first[1]:.4f} at step {first[0]} -> {last[1]:.4f} at step {last[0]}")
    if result.checkpoint:
        print(f"checkpoint: {result.checkpoint}")
    if result.sample is not None:
        print("sample:\n" + result.sample)
    print(f"done in {result.wall_time:.0f} s: {result.run_dir} (plots: dsv3 plot {result.run_dir})")
    return 130 if result.interrupted else 0
