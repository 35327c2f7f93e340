"""Helpers of the robustness tests: tiny run options, flags, file-tree digests, ``dsv3`` in a subprocess.

The CLI driver and the one-line-error check (``cli``, ``assert_one_error``) are in ``helpers``."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys

from helpers import quick_options


def tiny_options(setup, run_dir, **changes):
    """TrainConfig options for a run of one or two seconds (2 steps of 2 x 16 tokens)."""
    opts = quick_options(
        setup,
        run_dir,
        seq_len=16,
        micro_batch=2,
        global_batch=2,
        steps=2,
        eval_every=2,
        eval_batches=1,
        save_every=2,
        sample_tokens=0,
    )
    opts.update(changes)
    return {k: v for k, v in opts.items() if v is not None}


def flags(options: dict) -> list[str]:
    out = []
    for k, v in options.items():
        out += ["--" + k.replace("_", "-"), str(v)]
    return out


def tree_digest(path, skip=(".lock",)):
    """{relative path: sha256} of every file under ``path`` (the lock file, which holds a pid, skipped)."""
    digest = {}
    for root, _, files in os.walk(path):
        for f in files:
            if f in skip:
                continue
            full = os.path.join(root, f)
            with open(full, "rb") as fh:
                digest[os.path.relpath(full, path)] = hashlib.sha256(fh.read()).hexdigest()
    return digest


def run_dsv3(argv, timeout=240, **kwargs):
    """``python -m dsv3 ARGV`` in a subprocess (one intra-op thread); returns the CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "dsv3", *[str(a) for a in argv]],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        **kwargs,
    )


@contextlib.contextmanager
def mounted_tmpfs(path, options: str):
    """A tmpfs mounted at ``path`` (created) with mount ``options`` for the block; skips the test where
    this process may not mount (no root); unmounted lazily afterwards."""
    import pytest

    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip(f"cannot mount a tmpfs ({options}) here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
