"""Crash-safe file writing: write to a temporary name in the same directory, fsync, rename; and JSON lines.

A reader (or a resumed run) therefore sees either the old file or the new one,
never a half-written file, whatever moment the writer is killed at. :func:`json_lines` reads
the records of a JSON-lines text (blank lines skipped), each bad line one clear error.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from dsv3.errors import DataError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str) -> None:
    """Flush a directory entry (after a rename) where the platform allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary file path next to ``path``; rename it to ``path`` on success.

    On an exception the temporary file is removed and ``path`` is untouched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual mode
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(directory)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary directory next to ``path``; rename it to ``path`` on success.

    An existing ``path`` is replaced only after the new directory is complete:
    it is first renamed aside, then removed, so that at every instant one
    complete directory exists under ``path`` or its aside name.
    """
    path = os.fspath(path).rstrip(os.sep)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=parent)
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        mode = 0o666 & ~_umask()
        for name in os.listdir(tmp):
            full = os.path.join(tmp, name)
            if os.path.isfile(full):
                os.chmod(full, mode)  # some writers (safetensors, mkstemp) create 0600 files
                with open(full, "rb+") as fh:
                    os.fsync(fh.fileno())
        aside = None
        if os.path.exists(path):
            aside = path + ".old"
            if os.path.exists(aside):
                shutil.rmtree(aside)
            os.replace(path, aside)
        os.replace(tmp, path)
        fsync_dir(parent)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def json_lines(lines: Iterable[str], bad_line: Callable[[int, str], str]) -> Iterator[tuple[int, Any]]:
    """``(line number from 1, record)`` of each non-blank line; a line that is not JSON raises
    :class:`~dsv3.errors.DataError` with the sentence ``bad_line(number, json_error_message)``."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(bad_line(number, exc.msg)) from None
        yield number, record
