"""Command-line flags generated from the sectioned :class:`~dsv3.train.config.TrainConfig`.

Every config field becomes one flat flag, ``--`` plus its flat name with ``-`` for ``_``
(``optimizer.lr`` -> ``--lr``, ``data.format`` -> ``--data-format``), listed in one help
group per section with the field's description, type, default and allowed values::

    --recompute {none,selective,full}
        recompute activations in backward: none, selective ops, or full blocks (choice; default none)

Booleans take an optional value: ``--fp8``, ``--fp8 false`` and ``--no-fp8``. Values stay strings
here; :meth:`TrainConfig.from_dict` converts and checks them, so a bad value is a
:class:`~dsv3.errors.ConfigError` (one line, exit 2) like a bad run file. Flags default to ``None`` (=
not given), so a run file's value survives unless a flag overrides it. Parsers must be built with
``allow_abbrev=False`` (the CLI's parser class is), so ``--ep`` never silently means ``--eps``.
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Iterable
from typing import Any

from dsv3.train.config import Option, TrainConfig, options

#: Further spellings of a few flags: ``--schedule`` is ``dsv3 plan schedule``'s name for the pipeline schedule.
ALIASES: dict[str, tuple[str, ...]] = {"pipeline": ("--schedule",)}

#: Flags that may be given several times; the values are joined with commas (``--reward math --reward format``).
REPEATABLE = frozenset({"reward"})


def flag_of(opt: Option) -> str:
    """The flag of a config field: ``--micro-batch`` for ``data.micro_batch``."""
    return "--" + opt.flat.replace("_", "-")


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) and (value == "" or value != value.strip()) else str(value)


def describe(opt: Option) -> str:
    """The help line of a field: description, then (type; default)."""
    return f"{opt.help} ({opt.type_name}; default {_show(opt.default)})"


class BoolFlag(argparse.Action):
    """``--fp8`` (true), ``--fp8 false`` / ``--fp8 true``, and ``--no-fp8`` (false)."""

    def __init__(self, option_strings, dest, **kwargs):
        kwargs.setdefault("nargs", "?")
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string is not None and option_string.startswith("--no-"):
            if values is not None:
                parser.error(
                    f"argument {option_string}: takes no value (got {values!r}); "
                    f"write {option_string} or {self.option_strings[0]} {values}"
                )
            values = "false"
        setattr(namespace, self.dest, "true" if values is None else values)


class HelpFormatter(argparse.HelpFormatter):
    """Wider option column, no line breaks inside flag names; a boolean shows as ``--fp8 [BOOL], --no-fp8``."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=110)

    def _split_lines(self, text: str, width: int) -> list[str]:  # never break a --flag-name at its hyphens
        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return textwrap.fill(
            self._whitespace_matcher.sub(" ", text).strip(),
            width,
            initial_indent=indent,
            subsequent_indent=indent,
            break_on_hyphens=False,
        )

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if isinstance(action, BoolFlag):
            return f"{action.option_strings[0]} [BOOL], {', '.join(action.option_strings[1:])}"
        return super()._format_action_invocation(action)


def add_config_arguments(parser: argparse.ArgumentParser, only: Iterable[str] | None = None) -> None:
    """Add one flag per :class:`TrainConfig` field (or per flat name in ``only``), grouped by section."""
    wanted = None if only is None else set(only)
    groups: dict[str, Any] = {}
    sections = {
        name: TrainConfig.__dataclass_fields__[name].metadata["help"] for name in TrainConfig.__dataclass_fields__
    }
    for opt in options():
        if wanted is not None and opt.flat not in wanted:
            continue
        if opt.section not in groups:
            groups[opt.section] = parser.add_argument_group(opt.section, (sections[opt.section] or "").strip())
        group, flag = groups[opt.section], flag_of(opt)
        if opt.kind is bool:
            group.add_argument(
                flag,
                "--no-" + flag[2:],
                dest=opt.flat,
                default=None,
                action=BoolFlag,
                metavar="BOOL",
                help=describe(opt),
            )
        elif opt.choices:
            group.add_argument(
                flag,
                *ALIASES.get(opt.flat, ()),
                dest=opt.flat,
                default=None,
                metavar="{" + ",".join(opt.choices) + "}",
                help=describe(opt),
            )
        else:
            group.add_argument(
                flag,
                dest=opt.flat,
                default=None,
                metavar=opt.kind.__name__.upper(),
                action="append" if opt.flat in REPEATABLE else "store",
                help=describe(opt),
            )
    if wanted is not None:
        missing = wanted - {opt.flat for opt in options()}
        assert not missing, f"not config fields: {sorted(missing)}"


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """``{flat name: value}`` of the config flags given on the command line."""
    values = {opt.flat: getattr(args, opt.flat) for opt in options() if getattr(args, opt.flat, None) is not None}
    return {k: ",".join(v) if isinstance(v, list) else v for k, v in values.items()}
