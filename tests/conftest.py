"""Shared fixtures: an isolated cache directory and a small training setup (corpus, model, tokenizer)."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
from helpers import small_config


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
