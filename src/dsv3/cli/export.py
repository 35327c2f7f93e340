"""``dsv3 export CHECKPOINT OUT_DIR``: a sharded (torchrun) checkpoint as a Hugging Face directory."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a sharded checkpoint as a Hugging Face safetensors directory",
        description="Gather a sharded (DCP) training checkpoint, written in any parallel layout (or a one-process "
        "checkpoint), into the "
        "Hugging Face DeepSeek-V3 safetensors directory that transformers and dsv3 load, with the run's "
        "tokenizer, its chat template (fine-tuning runs) and a generation config, so that `dsv3 generate OUT_DIR` "
        "and `dsv3 eval OUT_DIR` need nothing else.",
    )
    parser.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="a dcp-* checkpoint directory, or a run directory (its newest intact sharded checkpoint; "
        "a one-process run: its newest intact step-* checkpoint)",
    )
    parser.add_argument(
        "out_dir",
        metavar="OUT_DIR",
        help="the Hugging Face directory to write: new, empty, or an earlier dsv3 export (replaced "
        "whole, only once the new one is complete); never a run directory, a file or a "
        "directory holding other files",
    )
    parser.add_argument(
        "--use-ema",
        action="store_true",
        help="export the EMA weights (a run trained with --ema-decay) instead of the trained ones",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dsv3.parallel.checkpointer import (
        Checkpointer,  # torch only when the command runs: `dsv3 plan` starts without it
    )

    print(Checkpointer.export(args.checkpoint, args.out_dir, use_ema=args.use_ema))
    return 0
