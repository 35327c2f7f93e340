"""Where a command may write: the output rules that every writing sub-command follows.

No command destroys what it did not write. Before anything is computed, an output path is
checked, and a :class:`~dsv3.errors.OutputError` (one line, exit 2) refuses:

- a path under a file (``out.json/x.png``), a file output that is a directory, or a directory output
  that is a file;
- an existing file that is not this command's own output (``is_own(path)``: a dsv3-drawn PNG, a JSON
  document with the command's keys);
- a directory output that exists and is not empty unless the command wrote everything in it
  (``is_own_dir``), or that is, or lies inside, a training run directory (``RUN_DIR/config.yaml``,
  ``checkpoints/``, ``dcp-*``), whose checkpoints must never be replaced.

Writes are atomic (:mod:`dsv3.utils.io`): an interrupted command leaves the old output or the new one.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator

from dsv3.errors import OutputError

#: The PNG ``Software`` text chunk dsv3 writes into its figures (matplotlib ``savefig(metadata=...)``).
PNG_SOFTWARE = "dsv3"
PNG_METADATA = {"Software": PNG_SOFTWARE}
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_DCP = re.compile(r"^dcp-\d{8}$")


def _upwards(path: str) -> Iterator[str]:
    """``path`` (absolute) and each of its ancestors up to the root."""
    current = os.path.abspath(path)
    while True:
        yield current
        parent = os.path.dirname(current)
        if parent == current:
            return
        current = parent


def _file_above(path: str) -> str | None:
    """The first ancestor of ``path`` that exists and is not a directory (``path`` would be under a file)."""
    for current in _upwards(os.path.dirname(os.path.abspath(path))):
        if os.path.lexists(current):
            return None if os.path.isdir(current) else current
    return None


def is_run_dir(path: str) -> bool:
    """Whether ``path`` is a dsv3 training run directory (its config, one-process or sharded checkpoints)."""
    if not os.path.isdir(path):
        return False
    names = set(os.listdir(path))
    own_run = "config.yaml" in names and ("model_config.json" in names or "metrics.jsonl" in names)
    one_process = "checkpoints" in names and os.path.isdir(os.path.join(path, "checkpoints"))
    return own_run or one_process or any(_DCP.match(n) for n in names)


def enclosing_run_dir(path: str) -> str | None:
    """``path`` itself or its nearest ancestor that is a run directory, or None."""
    return next((current for current in _upwards(path) if is_run_dir(current)), None)


def check_output_file(path: str, flag: str, *, is_own: Callable[[str], bool], what: str) -> None:
    """Refuse (one line) a file output that would destroy something; write nothing.

    Args:
        path: the file the command will write (atomically).
        flag: how the user gave it (``--stats``), for the message.
        is_own: whether an existing file at ``path`` is this command's own earlier output (then it is replaced).
        what: what the command writes (``a generate --stats JSON file``), for the message.
    """
    above = _file_above(path)
    if above is not None:
        raise OutputError(
            f"{flag} {path} would be written under the file {above}, which is not a directory; choose another path"
        )
    if os.path.isdir(path):
        raise OutputError(f"{flag} {path} is a directory; give the name of {what} to write")
    if os.path.lexists(path) and not (os.path.isfile(path) and is_own(path)):
        raise OutputError(
            f"{flag} {path} exists and is not {what}; dsv3 replaces only its own output: "
            f"remove the file or choose another name"
        )


def check_output_dir(
    path: str, flag: str, *, is_own_dir: Callable[[str], bool], what: str, allow: Iterable[str] = ()
) -> None:
    """Refuse (one line) a directory output that would destroy something; write nothing.

    Args:
        path: the directory the command will fill (created when missing).
        flag: how the user gave it (``OUT_DIR``), for the message.
        is_own_dir: whether an existing non-empty directory holds only this command's earlier output.
        what: what the command writes there, for the message.
        allow: directories accepted as they are, and whose subdirectories are not refused as inside a run
            directory (``dsv3 plot``'s own run directory), except its checkpoints.
    """
    allowed = {os.path.abspath(a) for a in allow}
    if os.path.abspath(path) in allowed:
        return
    above = _file_above(path)
    if above is not None:
        raise OutputError(
            f"{flag} {path} would be created under the file {above}, which is not a directory; choose another directory"
        )
    if os.path.lexists(path) and not os.path.isdir(path):
        raise OutputError(f"{flag} {path} is an existing file, not a directory; choose a new directory for {what}")
    run = enclosing_run_dir(path)
    inside = os.path.relpath(os.path.abspath(path), run).split(os.sep)[0] if run is not None else ""
    if run is not None and (run not in allowed or inside == "checkpoints" or _DCP.match(inside)):
        where = "is" if run == os.path.abspath(path) else "is inside"
        raise OutputError(
            f"{flag} {path} {where} the training run directory {run}; write {what} to a new directory outside it"
        )
    if os.path.isdir(path) and os.listdir(path) and not is_own_dir(path):
        raise OutputError(
            f"{flag} {path} is not empty and was not written by this command; choose a new or "
            f"empty directory for {what}"
        )


def is_dsv3_png(path: str) -> bool:
    """Whether ``path`` is a PNG that dsv3 drew (its ``Software`` text chunk, or matplotlib's of older runs)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    return head.startswith(_PNG_MAGIC) and (
        b"tEXtSoftware\x00" + PNG_SOFTWARE.encode() in head or b"tEXtSoftware\x00Matplotlib" in head
    )


def json_with_keys(*keys: str) -> Callable[[str], bool]:
    """A test of ``is_own`` for JSON outputs: the file is a JSON object holding all of ``keys``."""

    def test(path: str) -> bool:
        try:
            with open(path, encoding="utf-8") as fh:
                doc = json.load(fh)
        except (OSError, ValueError):
            return False
        return isinstance(doc, dict) and all(k in doc for k in keys)

    return test
