"""The run file's field index and flat conversion: YAML/TOML in, ``{flat name: typed value}`` out.

Every field of a sectioned config class (:class:`~dsv3.train.config.TrainConfig`) is an :class:`Option`
with a flat name (the CLI flag and the key of flat run files). :func:`field_index` lists them,
:func:`flatten` turns a sectioned or flat mapping into flat names (unknown keys: a
:class:`~dsv3.errors.ConfigError` with a suggestion), :func:`coerce` checks one value against its declared
type, and :func:`read_run_file` reads a YAML or TOML file. :mod:`dsv3.train.config` re-exports them.
Retired flat keys (:data:`RETIRED_OPTIONS`) load and are ignored.
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any, Literal, get_args, get_origin

from dsv3.config import as_int
from dsv3.errors import ConfigError

__all__ = ["Option", "RETIRED_OPTIONS", "field_index", "suggest", "flatten", "coerce", "read_run_file"]

#: Flat keys of older run files that are accepted and ignored.
RETIRED_OPTIONS = frozenset({"log_every"})


@dataclass(frozen=True)
class Option:
    """One configuration field: ``section.name``, its flat name, type, default, choices and description."""

    section: str
    name: str
    flat: str
    kind: type  # int, float, bool or str
    optional: bool  # None allowed
    choices: tuple[str, ...] | None
    default: Any
    help: str

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def type_name(self) -> str:
        base = "choice" if self.choices else self.kind.__name__
        return f"{base} or none" if self.optional else base


def _unwrap(hint: Any) -> tuple[type, bool, tuple[str, ...] | None]:
    """(base type, optional, Literal choices) of a field's type hint."""
    args = get_args(hint) if get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    optional = type(None) in args
    (inner,) = [a for a in args if a is not type(None)]
    if get_origin(inner) is Literal:
        return str, optional, tuple(get_args(inner))
    return inner, optional, None


@lru_cache(maxsize=None)
def field_index(config_cls: type) -> tuple[Option, ...]:
    """Every field of every section of ``config_cls`` (a dataclass of section dataclasses), in declaration order."""
    out = []
    for sec in fields(config_cls):
        cls = sec.default_factory  # type: ignore[misc]
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            kind, optional, choices = _unwrap(hints[f.name])
            out.append(
                Option(
                    sec.name,
                    f.name,
                    f.metadata.get("flag") or f.name,
                    kind,
                    optional,
                    choices,
                    f.default,
                    f.metadata["help"],
                )
            )
    return tuple(out)


def suggest(name: str, candidates) -> str:
    """``" (did you mean X?)"``: the candidates that ``name`` abbreviates (up to three), else the closest one, or ``""``."""
    candidates = list(candidates)
    close = [c for c in candidates if c.startswith(name)][:3] if len(name) > 2 else []
    close = close or difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def flatten(data: Any, source: str, index: tuple[Option, ...]) -> dict[str, Any]:
    """A sectioned/flat mapping as ``{flat name: value}`` over the options ``index``; unknown keys are errors
    with a suggestion."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a mapping of training options, got {type(data).__name__}")
    flat_index = {o.flat: o for o in index}
    sections = {o.section for o in index}
    out: dict[str, Any] = {}
    where: dict[str, str] = {}

    def put(flat: str, value: Any, key: str) -> None:
        if flat in out and out[flat] != value:
            raise ConfigError(f"{source} sets {flat} twice ({where[flat]} and {key}) with different values")
        out[flat], where[flat] = value, key

    for key, value in data.items():
        key = str(key)
        if key in sections and not isinstance(value, dict) and key not in flat_index:
            raise ConfigError(
                f"{source}: section {key} must be a mapping of its options ({key}: {{...}} or "
                f"[{key}]), got {type(value).__name__}"
            )
        if key in sections and isinstance(value, dict):  # "model"/"data" are also flat names (of str values)
            by_name = {o.name: o for o in index if o.section == key}
            for sub, sub_value in value.items():
                if str(sub) not in by_name:
                    dotted = f"{key}.{sub}"
                    raise ConfigError(
                        f"{source} has unknown option {dotted}"
                        f"{suggest(dotted, [o.dotted for o in index])}; see `dsv3 train --help`"
                    )
                put(by_name[str(sub)].flat, sub_value, f"{key}.{sub}")
        elif key in flat_index:
            put(key, value, key)
        elif "." in key and key.split(".", 1)[0] in sections:  # "optimizer.lr: 1e-3"
            sec, sub = key.split(".", 1)
            match = [o for o in index if o.section == sec and o.name == sub]
            if not match:
                raise ConfigError(
                    f"{source} has unknown option {key}"
                    f"{suggest(key, [o.dotted for o in index])}; see `dsv3 train --help`"
                )
            put(match[0].flat, value, key)
        elif key in RETIRED_OPTIONS:
            continue  # accepted for old run directories; see the module docstring
        else:
            raise ConfigError(f"{source} has unknown option {key!r}{suggest(key, flat_index)}; see `dsv3 train --help`")
    return out


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def coerce(opt: Option, value: Any, source: str) -> Any:
    """Check/convert one option value to its declared type (int, float, bool, str, a Literal choice, or None)."""
    if value is None or (opt.optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if opt.optional:
            return None
        raise ConfigError(f"{source}: option {opt.flat} cannot be none")
    kind = opt.kind
    try:
        if kind is bool:
            if isinstance(value, str):
                low = value.lower()
                if low not in _TRUE + _FALSE:
                    raise ValueError
                return low in _TRUE
            if not isinstance(value, (bool, int)) or value not in (0, 1):
                raise ValueError
            return bool(value)
        if kind is int:
            return as_int(  # the one strict integer parser (rejects 2.5, "2.5", true)
                value, f"{source}: option {opt.flat}"
            )
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if isinstance(value, (dict, list, bool, int, float)):  # a number where a name or path belongs
            raise ValueError
        value = str(value)
    except (TypeError, ValueError, OverflowError):
        named = opt.flat if opt.flat == opt.name else f"{opt.flat} ({opt.dotted})"
        raise ConfigError(f"{source}: option {named} must be {kind.__name__}, got {value!r}") from None
    if opt.choices is not None and value not in opt.choices:
        raise ConfigError(
            f"{source}: option {opt.flat} must be one of {', '.join(opt.choices)}, got {value!r}"
            f"{suggest(value, opt.choices)}"
        )
    return value


def read_run_file(path: str) -> dict[str, Any]:
    """The mapping of a YAML or TOML run file (sectioned or flat), unvalidated."""
    if not os.path.isfile(path):
        raise ConfigError(f"training config {path} does not exist")
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        if path.endswith(".toml"):
            import tomllib  # lazy: in the standard library from Python 3.11 only

            data = tomllib.loads(raw.decode("utf-8"))
        else:
            import yaml  # lazy: an optional dependency, needed only for YAML files

            data = yaml.safe_load(raw) or {}
    except Exception as exc:  # yaml/toml raise many types; all mean "malformed"
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"training config {path} is malformed ({msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"training config {path} must be a mapping of options")
    return data
