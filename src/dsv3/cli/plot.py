"""``dsv3 plot RUN_DIR``: write loss curves and expert-load heatmaps of a run as PNG files."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plot",
        help="plot a run's losses and expert load (PNG)",
        description="Write loss.png (train, LM, MTP and validation loss) and expert_load.png "
        "(per-layer expert load over training) from RUN_DIR/metrics.jsonl.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory holding metrics.jsonl")
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="directory for the PNG files (default: RUN_DIR); loss.png and expert_load.png there are "
        "replaced when dsv3 drew them; another directory must be new, empty or hold only "
        "earlier plots",
    )
    parser.add_argument("--log-y", action="store_true", help="logarithmic loss axis")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dsv3.train.plots import plot_run  # matplotlib and torch only when the command runs (`dsv3 plan` starts fast)

    for path in plot_run(args.run_dir, args.out, log_y=args.log_y):
        print(path)
    return 0
