"""The ``dsv3`` command line: a thin layer over library functions.

Each sub-command lives in its own module of this package with two functions,
``register(subparsers)`` and ``run(args)``. Commands import torch (and the modules that
import it) only inside ``run``, so ``dsv3 plan`` starts in milliseconds without torch. A :class:`~dsv3.errors.DsV3Error`
(bad input) prints one line on stderr and exits with code 2.

Every parser is a :class:`Parser`: no abbreviations (``--ep`` never means ``--eps``),
and an unknown flag is a one-line error with the closest real flag of that command
(``dsv3: error: unrecognized arguments: --warmup 3 (did you mean --warmup-steps?)``), exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import time

from dsv3.cli.options import HelpFormatter
from dsv3.errors import DsV3Error, TrainingPreempted, disk_error_message
from dsv3.train.config import suggest

# Sub-command modules, in the order `dsv3 --help` lists them.
COMMANDS = ("train", "generate", "plot", "plan", "memory", "eval", "eplb", "export")


class Parser(argparse.ArgumentParser):
    """argparse without prefix matching, with one-line usage errors (exit 2) and "did you mean"."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["allow_abbrev"] = False  # `--ep 2` must not set --eps
        if kwargs.get("formatter_class") in (None, argparse.HelpFormatter):
            kwargs["formatter_class"] = HelpFormatter
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # usage errors: one line, exit 2
        choice = re.search(r"invalid choice: '([^']*)'", message)
        if choice is not None:  # `plan --typo 4`: the typo's value 4 was taken for a sub-command
            argv = getattr(self, "_argv", [])
            before = argv[: argv.index(choice.group(1))] if choice.group(1) in argv else []
            unknown = [a.split("=", 1)[0] for a in before if a.startswith("--")]
            unknown = [a for a in unknown if a not in self._option_string_actions]
            if unknown:
                flags = [s for s in self._option_string_actions if s.startswith("--")]
                message = f"unrecognized arguments: {unknown[0]}{suggest(unknown[0], flags)}"
        self.exit(2, f"dsv3: error: {message}\n")

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        self._argv = list(sys.argv[1:] if args is None else args)  # for error(); sub-parsers get their part
        return super().parse_known_args(args, namespace)

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        args, extras = self.parse_known_args(args, namespace)
        if extras:
            active = self._active_parser(args)
            flags = [s for s in active._option_string_actions if s.startswith("--")]
            first = next((e.split("=", 1)[0] for e in extras if e.startswith("-")), None)
            hint = suggest(first, flags) if first else ""
            active.error(f"unrecognized arguments: {' '.join(extras)}{hint or f'; see `{active.prog} --help`'}")
        return args

    def _active_parser(self, args: argparse.Namespace) -> "argparse.ArgumentParser":
        """The (sub-)parser of the command that was chosen: unknown flags are compared with its flags."""
        parser = self
        while True:
            subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
            chosen = getattr(args, subs[0].dest, None) if subs and subs[0].dest != argparse.SUPPRESS else None
            if chosen is None or chosen not in subs[0].choices:
                return parser
            parser = subs[0].choices[chosen]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="dsv3", description="Train and plan DeepSeek-V3-architecture MoE models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in COMMANDS:
        importlib.import_module(f"dsv3.cli.{name}").register(sub)
    return parser


#: Seconds a torchrun rank other than 0 waits before it reports an error of its own (see :func:`_report_once`).
RANK_ERROR_DELAY = 10.0  # long enough for torchrun's agent to stop a waiting rank on a loaded machine


def _report_once(line: str) -> None:
    """Print an error line once per torchrun world: rank 0 at once; another rank only after
    :data:`RANK_ERROR_DELAY` seconds. A bad layout fails on every rank at the same point, so rank 0 speaks and
    exits first, torchrun's agent stops the waiting ranks (they never print), and its summary names rank 0 as the
    root cause; an error of one rank alone (a file only it reads) is still printed, a moment later."""
    rank = os.environ.get("RANK", "0") or "0"
    if rank != "0" and os.environ.get("TORCHELASTIC_RUN_ID"):  # launched by torchrun (its agent stops the others)
        time.sleep(RANK_ERROR_DELAY)
    print(line, file=sys.stderr, flush=True)


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
        _report_once(f"dsv3: error: {exc}")
        return 2
    except TrainingPreempted as exc:  # the checkpoint is written and the run said so: 143 (SIGTERM) or 130
        return exc.exit_code
    except KeyboardInterrupt:
        print("dsv3: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a disk that fills up or turns read-only mid-run (metrics, caches, plots)
        message = disk_error_message(exc)
        if message is None:
            raise
        print(f"dsv3: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
