"""Run untrusted Python (model-written code) in a subprocess with limits: never in the trainer's process.

Each program gets a throwaway directory, a wall-clock limit (its whole process tree is killed), CPU-time,
address-space, file-size and process-count limits, and a clean environment. :func:`isolation_level` says
what more the platform gives: ``namespaces`` (Linux as root, probed once: no network, a read-only view of
system and Python directories, writes only to a private 64 MiB tmpfs, its own uid and PID namespace) or
``rlimits`` (the limits only, with a warning: sockets and readable files are not prevented). The mechanics
live in :mod:`dsv3.train.sandbox_boot`, run as a separate interpreter. Details: docs/rl.md ("Module notes").
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from typing import Literal

from dsv3.errors import TrainingError

__all__ = ["SandboxResult", "isolation_level", "run_python"]

Isolation = Literal["namespaces", "rlimits"]
_BOOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_boot.py")
_PYTHON = os.path.realpath(sys.executable)
_PREFIX = os.path.dirname(os.path.dirname(_PYTHON))
_OUTPUT_CAP = 4096


@dataclass
class SandboxResult:
    """How one program ended.

    Attributes:
        ok: it exited with status 0 within its limits.
        returncode: its exit status (128 + signal when killed by one), None when killed at the time limit.
        timed_out: it was killed at the wall-clock limit.
        stdout / stderr: the first 4 KiB of each.
        isolation: the isolation it ran under.
    """

    ok: bool
    returncode: int | None
    timed_out: bool
    stdout: str
    stderr: str
    isolation: Isolation


def _launch(mode: Isolation, source: str, time_limit: float, memory_mb: int) -> SandboxResult:
    workdir = tempfile.mkdtemp(prefix="dsv3-sandbox-")
    try:
        box = os.path.join(workdir, "box")
        os.makedirs(box)
        os.makedirs(os.path.join(workdir, "root"))
        with open(os.path.join(box, "main.py"), "w", encoding="utf-8") as f:
            f.write(source)
        if os.geteuid() == 0:
            os.chown(box, 65534, 65534)
            os.chown(os.path.join(box, "main.py"), 65534, 65534)
        out_path, err_path = os.path.join(workdir, "stdout"), os.path.join(workdir, "stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [_PYTHON, "-I", "-S", _BOOT, mode, workdir, _PYTHON, _PREFIX, str(time_limit), str(memory_mb)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env={"PATH": "/usr/bin:/bin"},
                start_new_session=True,
                close_fds=True,
            )
            timed_out = False
            try:
                proc.wait(timeout=time_limit + 1.0)  # + the bootstrap's start-up
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        code = None if timed_out else proc.returncode
        code = 128 - code if code is not None and code < 0 else code
        read = lambda p: open(p, "rb").read(_OUTPUT_CAP).decode("utf-8", "replace")  # noqa: E731
        return SandboxResult(code == 0, code, timed_out, read(out_path), read(err_path), mode)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def isolation_level() -> Isolation:
    """``namespaces`` where a probe program runs fully isolated on this machine, else ``rlimits`` (with a warning).

    Raises :class:`TrainingError` when not even the fallback can run a program (every code reward would be 0).
    """
    if sys.platform.startswith("linux") and os.geteuid() == 0:
        probe = _launch("namespaces", "import os\nassert os.getuid() >= 100000\n", 10.0, 256)
        if probe.ok:
            return "namespaces"
    probe = _launch("rlimits", "print('ok')\n", 10.0, 256)
    if probe.stdout != "ok\n":
        raise TrainingError(
            f"the code sandbox cannot run Python here ({' '.join(probe.stderr.split())[-200:]}); "
            f"the code reward needs it"
        )
    warnings.warn(
        "dsv3 sandbox: namespaces are unavailable here (needs Linux and root); model-written code runs "
        "with resource limits only, and can use the network and read the files its user can read",
        RuntimeWarning,
        stacklevel=2,
    )
    return "rlimits"


def run_python(source: str, *, time_limit: float = 5.0, memory_mb: int = 512) -> SandboxResult:
    """Run ``source`` as a Python program in the sandbox and report how it ended.

    Args:
        source: the program (untrusted).
        time_limit: wall-clock seconds (the CPU limit is the same, rounded up); killed when passed.
        memory_mb: address-space limit in MiB.
    """
    return _launch(isolation_level(), source, time_limit, memory_mb)
