"""Shared fixtures (an isolated cache directory, a small training setup) and the suite's use of the cores.

Under pytest-xdist (``make test``: ``-n 2``) each worker runs torch on its share of the cores: torch's default,
every core in every worker, oversubscribes them, and OpenMP threads then spin while their partner waits for a
core (one GRPO run on the loaded 2-core machine: 39 s of CPU with 2 threads, 2.5-5.7 s with 1). pyproject's ``--dist loadscope`` sends
each module to one worker, so that a module-scoped fixture (a spawned world, a trained model) runs once.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import pytest
import torch
from helpers import small_config


def pytest_configure(config):
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(workers)))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test writes its tokenizer/token caches under a session temp dir, never ~/.cache."""
    monkeypatch.setenv("DSV3_CACHE", str(tmp_path_factory.getbasetemp() / "dsv3-cache"))


@pytest.fixture(scope="session")
def train_setup(tmp_path_factory):
    """A real small corpus (stdlib sources), a 512-token BPE tokenizer and a small model config."""
    from dsv3.data.tokenizer import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("train_setup")
    corpus = root / "corpus"
    corpus.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in (
        "textwrap.py",
        "shlex.py",
        "fnmatch.py",
        "colorsys.py",
        "bisect.py",
        "keyword.py",
        "glob.py",
        "heapq.py",
        "this.py",
        "stat.py",
        "operator.py",
        "numbers.py",
    ):
        src = stdlib / name
        if src.is_file():
            (corpus / (name + ".txt")).write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
    tok = train_bpe_tokenizer(sorted(corpus.iterdir()), 512)
    tok.save(str(root / "tokenizer.json"))
    cfg = small_config(vocab_size=512)
    (root / "model").mkdir()
    cfg.save(root / "model" / "config.json")
    return {
        "corpus": str(corpus),
        "tokenizer": str(root / "tokenizer.json"),
        "model": str(root / "model" / "config.json"),
        "root": root,
    }
