"""The ``dsv3`` command line: a thin layer over library functions.

Each sub-command lives in its own module of this package with two functions,
``register(subparsers)`` and ``run(args)``. Commands import torch only inside
``run``, so ``dsv3 plan`` starts in milliseconds. A :class:`~dsv3.errors.DsV3Error`
(bad input) prints one line on stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dsv3.errors import DsV3Error

# Sub-command modules, in the order `dsv3 --help` lists them.
COMMANDS = ("train", "generate", "plot", "plan", "memory", "convert", "eplb")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # usage errors: one line, exit 2
        self.exit(2, f"dsv3: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dsv3", description="Train and plan DeepSeek-V3-architecture MoE models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"dsv3.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"dsv3.cli.{name}":
                continue  # command not built in this version
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["train"]  # the embedded default: `dsv3` alone trains the tiny preset
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except DsV3Error as exc:
        print(f"dsv3: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dsv3: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
