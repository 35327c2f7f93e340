"""Integrity of sharded (DCP) checkpoints: the manifest written with every ``dcp-*`` directory, its check,
and the choice of the newest intact checkpoint.

A ``dcp-{step:08d}`` directory holds DCP's ``.metadata``, one ``__{rank}_{n}.distcp`` file per writing rank,
dsv3's ``meta.json`` and, written last by rank 0 before the directory is renamed into place, ``manifest.json``:
the size and SHA-256 of every other file (the format of the one-process checkpoints,
:func:`dsv3.checkpoint.state.write_manifest`); each rank hashes the shards it wrote, rank 0 gathers them.
A checkpoint damaged afterwards (a shard truncated, deleted or changed on disk, ``.metadata`` lost) fails
:func:`verify_sharded`; :func:`select_sharded` then falls back to the newest intact checkpoint and says so,
or raises one line naming the damaged file.

Checkpoints written before manifests existed are checked for their ``.metadata`` and ``meta.json`` only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

from dsv3.checkpoint.state import (
    MANIFEST,
    file_sha256,
    read_manifest,
    verify_listed_files,
    write_manifest,
)
from dsv3.errors import CheckpointError

SHARDED_NAME = re.compile(r"^dcp-(\d{8})$")
SHARDED_META = "meta.json"  # dsv3's own record (step, data position, counters), dsv3.parallel.checkpoint.META
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of the shards

__all__ = [
    "shard_entries",
    "write_sharded_manifest",
    "verify_sharded",
    "select_sharded",
    "sharded_checkpoints",
    "check_sharded",
]


def shard_entries(directory: str, rank: int) -> dict[str, dict[str, Any]]:
    """``{name: {"bytes", "sha256"}}`` of the shard files rank ``rank`` wrote (DCP's ``__{rank}_{n}.distcp``).

    Each rank hashes its own shards right after writing them (from the page cache, all ranks at once), so that
    rank 0 never reads the whole checkpoint back."""
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.startswith(f"__{rank}_") and name.endswith(".distcp"):
            full = os.path.join(directory, name)
            out[name] = {"bytes": os.path.getsize(full), "sha256": file_sha256(full)}
    return out


def write_sharded_manifest(directory: str, step: int, shards: dict[str, dict[str, Any]] | None = None) -> None:
    """Record the size and SHA-256 of every file of the complete ``dcp-*`` ``directory`` (rank 0, before the rename).

    ``shards``: the entries the ranks computed for their own shard files (:func:`shard_entries`, gathered);
    every other file (``.metadata``, ``meta.json``, a shard missing from ``shards``) is hashed here."""
    write_manifest(directory, step, shards)


def verify_sharded(path: str, *, hashes: bool = True) -> str | None:
    """Why the sharded checkpoint ``path`` is damaged (one clause naming the file), or None when it is intact.

    Args:
        path: a ``dcp-*`` directory.
        hashes: also hash every file (reads all bytes); False checks sizes only.
    """
    if not os.path.isdir(path):
        return "it is not a directory"
    if not os.path.isfile(os.path.join(path, MANIFEST)):  # written before manifests: what can be checked
        for need in (SHARDED_META, DCP_METADATA):
            if not os.path.isfile(os.path.join(path, need)):
                return f"{need} is missing"
        return None
    files = read_manifest(path)
    if isinstance(files, str):
        return files
    for need in (SHARDED_META, DCP_METADATA):
        if need not in files:
            return f"its manifest does not list {need}"
    if not any(name.endswith(".distcp") for name in files):
        return "its manifest lists no .distcp shard"
    return verify_listed_files(path, files, hashes=hashes)


def sharded_checkpoints(run_dir: str) -> list[str]:
    """Every renamed-into-place ``dcp-*`` directory of ``run_dir`` (oldest first), intact or not.

    A ``dcp-*`` directory with neither ``meta.json`` nor ``manifest.json`` was never completed by dsv3 and
    is not listed."""
    if not os.path.isdir(run_dir):
        return []
    found = []
    for name in sorted(os.listdir(run_dir)):
        full = os.path.join(run_dir, name)
        written = any(os.path.isfile(os.path.join(full, f)) for f in (SHARDED_META, MANIFEST))
        if SHARDED_NAME.match(name) and written:  # neither file: never completed by dsv3, ignored
            found.append(full)
    return found


def select_sharded(run_dir: str, log: Callable[[str], None] | None = None, *, hashes: bool = True) -> str | None:
    """The newest intact sharded checkpoint of ``run_dir``; None when it has none.

    Each newer damaged one is reported with ``log`` ("sharded checkpoint dcp-N is damaged (...); falling back
    to dcp-M") and left in place (the run's next save of that step replaces it).

    Raises:
        CheckpointError: when the run has sharded checkpoints and every one is damaged.
    """
    damaged: list[tuple[str, str]] = []
    for path in reversed(sharded_checkpoints(run_dir)):
        reason = verify_sharded(path, hashes=hashes)
        if reason is None:
            for bad, why in damaged:
                if log is not None:
                    log(
                        f"sharded checkpoint {os.path.basename(bad)} is damaged ({why}); falling back to "
                        f"{os.path.basename(path)}"
                    )
            return path
        damaged.append((path, reason))
    if damaged:
        path, reason = damaged[0]
        raise CheckpointError(
            f"every sharded checkpoint of {run_dir} is damaged (the newest, {path}: {reason}); "
            f"restore the files or start a new run"
        )
    return None


def check_sharded(path: str, *, hashes: bool = True) -> None:
    """Raise a one-line :class:`CheckpointError` naming the damaged file when ``path`` is not intact
    (``hashes=False``: sizes only, for a checkpoint :func:`select_sharded` has just verified)."""
    reason = verify_sharded(path, hashes=hashes)
    if reason is not None:
        raise CheckpointError(
            f"sharded checkpoint {path} is damaged: {reason}; pick another checkpoint (or pass "
            f"the run directory to use its newest intact one)"
        )
