"""Intra-op threads of CPU ranks (dsv3.parallel.world.rank_threads): cores / ranks on the node, unless the
user chose OMP_NUM_THREADS; torchrun's own default of 1 (set when the user did not) does not count as a choice."""

import os
import subprocess
import sys

import pytest

from dsv3.parallel.world import rank_threads


@pytest.fixture
def no_thread_env(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    return monkeypatch


def test_cores_are_shared_among_the_ranks_of_a_node(no_thread_env):
    assert rank_threads(4, cores=16) == 4
    assert rank_threads(2, cores=2) == 1
    assert rank_threads(3, cores=2) == 1  # never 0
    assert rank_threads(1, cores=8) == 8
    assert rank_threads(2) == max(1, len(os.sched_getaffinity(0)) // 2)


def test_a_user_choice_is_kept(no_thread_env):
    no_thread_env.setenv("OMP_NUM_THREADS", "3")
    assert rank_threads(4, cores=16) is None


@pytest.mark.parametrize("launcher_has_it", [False, True])
def test_under_torchrun_only_the_launchers_environment_counts(no_thread_env, launcher_has_it):
    """torchrun exports OMP_NUM_THREADS=1 to its ranks when the user gave none: the launcher's (the parent
    process's) environment says which it was. A real process stands in for the launcher."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if launcher_has_it:
        env["OMP_NUM_THREADS"] = "1"
    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], env=env)
    try:
        no_thread_env.setenv("OMP_NUM_THREADS", "1")
        no_thread_env.setenv("TORCHELASTIC_RUN_ID", "test")
        no_thread_env.setattr(os, "getppid", lambda: launcher.pid)
        assert rank_threads(2, cores=16) == (None if launcher_has_it else 8)
    finally:
        launcher.kill()
        launcher.wait()
