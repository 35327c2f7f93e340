"""User-facing errors.

Every error a person can cause (a bad path, config, checkpoint, data set or
parallel layout) is raised as a :class:`DsV3Error` subclass whose message is
one sentence saying what is wrong and how to fix it. The CLI prints that line
and exits with code 2, without a traceback.
"""

import errno


def clip(text: object, width: int = 40) -> str:
    """``repr(text)`` for a message, cut to about ``width`` characters (a pasted megabyte stays one short line)."""
    r = repr(text)
    return r if len(r) <= width else r[: width - 4] + "..." + r[-1:]


class DsV3Error(Exception):
    """Base class of errors caused by the user's input."""


class ConfigError(DsV3Error, ValueError):
    """A model or training configuration is malformed or violates a constraint."""


class CheckpointError(DsV3Error):
    """A checkpoint is missing, malformed or does not match the configuration."""


class DataError(DsV3Error):
    """A data path is missing, empty or in an unsupported format."""


class RunDirError(DsV3Error):
    """A run directory cannot be used (for example it holds a different run)."""


class TrainingError(DsV3Error):
    """Training cannot continue (for example too many non-finite losses in a row)."""


def disk_error_message(exc: BaseException) -> str | None:
    """One sentence for a write that failed because the disk is full, over quota or read-only; else None."""
    codes = {
        errno.ENOSPC: "no space left on device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "read-only file system",
    }
    if not isinstance(exc, OSError) or exc.errno not in codes:
        return None
    where = f" writing {exc.filename}" if exc.filename else ""
    return (
        f"{codes[exc.errno]}{where}; free space (or choose a writable --run-dir) and continue from the last "
        f"checkpoint with dsv3 train --resume RUN_DIR"
    )


class OutputError(DsV3Error):
    """An output path would destroy something (a foreign file or directory, a run directory) or cannot be written."""


class TrainingPreempted(BaseException):
    """:func:`dsv3.train.loop.train` stopped on SIGTERM or SIGINT after writing a checkpoint (the preemption contract).

    Raised once the checkpoint of the current step is complete, so that a calling script learns that its
    process was told to stop (and stops, instead of running on past a scheduler's or ``timeout``'s limit).
    Like ``KeyboardInterrupt`` it is a ``BaseException``: an ``except Exception`` in the caller does not
    swallow it. ``dsv3 train`` exits with :attr:`exit_code` (143 for SIGTERM, 130 for SIGINT).

    Attributes:
        signal_name: ``"SIGTERM"`` or ``"SIGINT"``.
        checkpoint: the checkpoint written on the way out (continue with ``train(None, resume=run_dir)``).
        run_dir: the run directory.
        step: the last completed step.
        result: the :class:`~dsv3.train.loop.TrainResult` the run would have returned.
    """

    EXIT_CODES = {"SIGTERM": 143, "SIGINT": 130}  # 128 + the signal number, as a shell reports a killed process

    def __init__(self, signal_name: str, checkpoint: str | None, run_dir: str, step: int, result=None) -> None:
        super().__init__(f"training stopped by {signal_name} after step {step}; checkpoint {checkpoint}")
        self.signal_name, self.checkpoint, self.run_dir, self.step, self.result = (
            signal_name,
            checkpoint,
            run_dir,
            step,
            result,
        )

    @property
    def exit_code(self) -> int:
        return self.EXIT_CODES.get(self.signal_name, 130)
