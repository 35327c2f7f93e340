"""The run directory: chosen and checked before anything is written, owned by one training process at a time.

- :func:`prepare_run_dir` picks a new run's directory (new or empty) or checks a resumed one;
  :func:`resume_config` reads a resumed run's saved ``config.yaml``.
- :func:`check_run_dir_usable` says, before the run writes anything, why a run
  directory could not be created or written: a path component is a file, the
  nearest existing parent is not writable, or the filesystem is read-only.
- :class:`RunLock` is an exclusive ``fcntl`` lock on ``RUN_DIR/.lock``, held for as
  long as a process trains in the directory. A second ``dsv3 train --resume RUN_DIR``
  fails at once with one line instead of training the same steps twice. The kernel
  drops the lock when the process ends, however it ends (even ``kill -9``), so a
  stale lock never blocks a resume. The file holds the owner's pid for the message.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Any

from dsv3.errors import RunDirError
from dsv3.train.config import TrainConfig, load_train_config

LOCK_FILE = ".lock"
CONFIG_FILE = "config.yaml"  # the run's effective TrainConfig
MODEL_CONFIG_FILE = "model_config.json"  # the model config the run started with


def prepare_run_dir(config: TrainConfig, resume: str | None) -> str:
    """Pick and check the run directory (``resume``, or a new or empty ``config.run.dir``)."""
    if resume is not None:
        if not os.path.isfile(os.path.join(resume, CONFIG_FILE)):
            raise RunDirError(f"{resume} is not a dsv3 run directory (no {CONFIG_FILE}); check --resume")
        return resume
    run_dir = config.run.dir or config.default_run_dir()
    if os.path.exists(run_dir):
        if not os.path.isdir(run_dir):
            raise RunDirError(f"run directory {run_dir} exists and is not a directory; choose another --run-dir")
        if os.listdir(run_dir):
            if os.path.isfile(os.path.join(run_dir, CONFIG_FILE)):
                raise RunDirError(
                    f"run directory {run_dir} already holds a run; continue it with --resume {run_dir} "
                    f"or choose another --run-dir"
                )
            raise RunDirError(f"run directory {run_dir} is not empty and holds no dsv3 run; choose another --run-dir")
    return run_dir


def resume_config(run_dir: str, overrides: dict[str, Any]) -> TrainConfig:
    """The saved config of ``run_dir`` with ``overrides`` (e.g. a larger ``steps``) applied."""
    config = load_train_config(os.path.join(run_dir, CONFIG_FILE), overrides)
    config.run.dir = run_dir
    return config


def _nearest_existing(path: str) -> str:
    """``path`` itself or its closest ancestor that exists."""
    current = os.path.abspath(path)
    while not os.path.lexists(current):
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return current


def _read_only_fs(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def check_run_dir_usable(run_dir: str) -> None:
    """Raise :class:`RunDirError` (one line) when ``run_dir`` cannot be created or written; write nothing.

    Checks, in order: the path (or a parent) is a file; the nearest existing
    directory is on a read-only filesystem; it is not writable by this user.
    """
    existing = _nearest_existing(run_dir)
    if not os.path.isdir(existing):
        what = "is" if existing == os.path.abspath(run_dir) else "would be created under"
        raise RunDirError(
            f"run directory {run_dir} {what} the file {existing}, not a directory; choose another --run-dir"
        )
    if _read_only_fs(existing):
        raise RunDirError(
            f"run directory {run_dir} is on a read-only filesystem ({existing}); choose a writable --run-dir"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(
            f"run directory {run_dir} cannot be written: {existing} is not writable by this user; "
            f"choose another --run-dir or fix its permissions"
        )


class RunLock:
    """An exclusive, non-blocking lock on ``RUN_DIR/.lock`` (a context manager).

    Args:
        run_dir: the run directory (it must exist when the lock is acquired).
        enabled: False makes the lock a no-op, for the ranks of a parallel run other than 0.

    Raises:
        RunDirError: on ``acquire`` when another process holds the lock.
    """

    def __init__(self, run_dir: str, *, enabled: bool = True) -> None:
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_FILE)
        self.enabled = enabled  # False: acquire() does nothing (ranks other than 0 of a parallel run)
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        if not self.enabled:
            return self

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunDirError(
                f"cannot create the lock file {self.path} ({exc.strerror or exc}); choose a writable --run-dir"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = ""
            with contextlib.suppress(OSError, ValueError):
                owner = os.pread(fd, 32, 0).decode().strip()
            os.close(fd)
            who = f" (pid {owner})" if owner.isdigit() else ""
            raise RunDirError(
                f"run directory {self.run_dir} is in use by another dsv3 process{who}; wait for it "
                f"to finish or stop it before training here"
            ) from None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:  # a lock whose owner was dropped by an exception is not kept
        self.release()
