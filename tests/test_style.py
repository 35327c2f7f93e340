"""The team's style holds on the whole tree: `ruff format --check` and `ruff check` (rules in pyproject.toml)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> str:
    exe = Path(sys.executable).with_name("ruff")
    found = str(exe) if exe.exists() else shutil.which("ruff")
    if found is None:
        pytest.fail("ruff is not installed: `make install` installs the test extras, ruff among them")
    return found


@pytest.mark.parametrize("command", [["format", "--check"], ["check"]])
def test_the_tree_follows_the_style(command):
    done = subprocess.run([_ruff(), *command, str(ROOT)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
