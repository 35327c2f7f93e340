"""Byte sizes written by people: ``"80GiB"``, ``"80 GB"``, ``"512M"``, ``"5e9"``.

One parser for the whole package (``dsv3 plan --gpu-memory``, ``save_pretrained(max_shard_size=...)``).
Units follow their usual meanings: ``KB/MB/GB/TB`` are decimal (10^3...), ``KiB/MiB/GiB/TiB``
binary (2^10...), and the bare letters ``K/M/G/T`` binary, as ``ls -h`` and ``free -h`` print
them. Imports no torch.
"""

from __future__ import annotations

import re

from dsv3.errors import ConfigError

UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
}
_SIZE_RE = re.compile(r"^\s*((?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int, what: str = "size", *, unit_required: bool = True) -> int:
    """Bytes of ``text``: a number with a unit (``"80GiB"``, ``"80 GB"``, ``"80G"``, ``"1.5TiB"``).

    Args:
        text: the size; an ``int`` is taken as bytes.
        what: how the error message names the value (e.g. ``"--gpu-memory"``).
        unit_required: if False, a bare number (``"5e9"``) means bytes.

    Raises:
        ConfigError: one sentence, when ``text`` is not such a size.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ConfigError(f"{what} {text} must not be negative")
        return text
    match = _SIZE_RE.match(str(text))
    unit = match.group(2).lower() if match else None
    shown = repr(text) if len(str(text)) <= 40 else repr(str(text)[:40] + "...")  # the message stays one short line
    if match is None or (unit == "" and unit_required) or (unit and unit not in UNITS):
        raise ConfigError(f"{what} {shown} is not a size with a unit; write it like 80GiB, 80GB or 512MiB")
    value = float(match.group(1)) * (UNITS[unit] if unit else 1)
    if not value < 2**60:  # an exbibyte; also catches hundreds of digits overflowing to inf
        raise ConfigError(f"{what} {shown} is larger than any device; write a size below 1 EiB")
    return int(round(value))
