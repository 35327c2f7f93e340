"""Tokenizer: the stdlib corpus, byte-level BPE training, caching, user tokenizer.json, EOS lookup."""

from __future__ import annotations

import os
import random
import sysconfig
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dsv3.data import tokenizer as tk
from dsv3.errors import DataError


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg.endswith("."), msg
    return msg


@pytest.fixture(scope="module")
def stdlib_subset() -> list[Path]:
    files = tk.stdlib_corpus_files()
    # a few real, mid-sized modules: enough text for merges, small enough to train in well under a second
    return [f for f in files if 4_000 < f.stat().st_size < 20_000][:12]


@pytest.fixture(scope="module")
def small_bpe(stdlib_subset) -> Tokenizer:
    return tk.train_bpe_tokenizer(stdlib_subset, 512)


# ----------------------------------------------------------------------------- stdlib corpus


def test_stdlib_corpus_files_are_library_code():
    files = tk.stdlib_corpus_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    assert len(files) > 200
    assert files == sorted(files)
    names = {f.relative_to(root).as_posix() for f in files}
    assert {"os.py", "json/decoder.py", "collections/__init__.py"} <= names
    for f in files:
        rel = f.relative_to(root)
        assert f.suffix == ".py"
        assert not {"test", "tests", "idle_test", "site-packages"} & set(rel.parts[:-1]), rel
        assert not rel.name.startswith("test_"), rel


def test_stdlib_corpus_files_filters_a_fake_root(tmp_path):
    def put(rel: str, data: bytes = b"x = 1\n") -> None:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)

    for rel in ["a.py", "pkg/b.py", "pkg/sub/c.py", "doctest.py", "unittest/case.py"]:
        put(rel)
    for rel in [
        "test/test_os.py", "test/support/helper.py", "pkg/tests/x.py", "idlelib/idle_test/y.py",
        "pkg/test_thing.py", "site-packages/foo/bar.py", "notes.txt", "pkg/__pycache__/a.py",
    ]:  # fmt: skip
        put(rel)
    put("latin1.py", "s = 'caf\xe9'\n".encode("latin-1"))  # not UTF-8
    got = [f.relative_to(tmp_path).as_posix() for f in tk.stdlib_corpus_files(tmp_path)]
    assert got == ["a.py", "doctest.py", "pkg/b.py", "pkg/sub/c.py", "unittest/case.py"]


def test_stdlib_corpus_files_missing_root(tmp_path):
    with pytest.raises(DataError) as exc:
        tk.stdlib_corpus_files(tmp_path / "nope")
    assert "nope" in _one_line(exc)


# ----------------------------------------------------------------------------- BPE training


def test_special_token_ids_match_presets(small_bpe):
    from dsv3.config import load_preset

    cfg = load_preset("tiny")
    assert small_bpe.token_to_id("<|bos|>") == cfg.bos_token_id == 0
    assert small_bpe.token_to_id("<|eos|>") == cfg.eos_token_id == 1
    assert small_bpe.token_to_id("<|pad|>") == 2
    assert tk.eos_token_id(small_bpe) == 1
    assert small_bpe.get_vocab_size() == 512
    # encodings carry no automatic special tokens
    assert small_bpe.encode("x = 1").ids[0] not in (0, 1, 2)


def test_bpe_learns_merges(small_bpe, stdlib_subset):
    text = stdlib_subset[0].read_text(encoding="utf-8")
    n_tokens = len(small_bpe.encode(text).ids)
    assert n_tokens < 0.6 * len(text.encode("utf-8"))  # real compression, not bytes


def test_bpe_training_is_deterministic(stdlib_subset, small_bpe):
    again = tk.train_bpe_tokenizer(stdlib_subset, 512)
    assert again.to_str() == small_bpe.to_str()
    assert tk.tokenizer_hash(again) == tk.tokenizer_hash(small_bpe)


def _random_text(rng: random.Random, n: int) -> str:
    pools = [
        (0x00, 0x7F),
        (0x80, 0x7FF),
        (0x800, 0xD7FF),
        (0xE000, 0xFFFD),
        (0x10000, 0x10FFFF),
    ]  # fmt: skip  (every plane, control characters included, no lone surrogates)
    out = []
    for _ in range(n):
        lo, hi = rng.choice(pools)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def test_round_trip_arbitrary_unicode(small_bpe):
    rng = random.Random(0)
    samples = [
        "",
        " ",
        "\x00\x01\x7f\t\r\n\r\n  \u00a0\u200b\ufeff",
        "  leading spaces and trailing  \n\n",
        "héllo wörld, 世界, 🤖🧠, e\u0301, \U0010fffd, ﷽",
        "def f(x):\n\treturn x  # tab\r\n",
        "<|bos|>literal<|pad|>",
    ] + [_random_text(rng, rng.randint(1, 200)) for _ in range(200)]
    for s in samples:
        ids = small_bpe.encode(s, add_special_tokens=False).ids
        assert small_bpe.decode(ids, skip_special_tokens=False) == s


def test_round_trip_every_byte_symbol(small_bpe):
    # Each of the 256 bytes has a token, so any UTF-8 byte string is representable.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    assert len(alphabet) == 256
    assert all(small_bpe.token_to_id(ch) is not None for ch in alphabet)
    s = bytes(range(256)).decode("latin-1")  # all code points 0..255 -> all 1- and 2-byte UTF-8 forms
    assert small_bpe.decode(small_bpe.encode(s).ids) == s


def test_vocab_too_small(stdlib_subset):
    with pytest.raises(DataError) as exc:
        tk.train_bpe_tokenizer(stdlib_subset, 200)
    assert "259" in _one_line(exc)


def test_training_on_non_utf8_file(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError) as exc:
        tk.train_bpe_tokenizer([bad], 300)
    assert "bad.txt" in _one_line(exc)


# ----------------------------------------------------------------------------- cache


def test_cache_hit_reuses_the_file(tmp_path, stdlib_subset, monkeypatch):
    tok = tk.get_tokenizer(None, vocab_size=400, cache_dir=tmp_path, files=stdlib_subset)
    cached = list((tmp_path / "tokenizers").iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".json"
    mtime = cached[0].stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the cache holds this tokenizer")

    monkeypatch.setattr(tk, "train_bpe_tokenizer", no_training)
    again = tk.get_tokenizer(None, vocab_size=400, cache_dir=tmp_path, files=stdlib_subset)
    assert tk.tokenizer_hash(again) == tk.tokenizer_hash(tok)
    assert cached[0].stat().st_mtime_ns == mtime
    assert list((tmp_path / "tokenizers").iterdir()) == cached  # nothing else (no temp files) written


def test_cache_key_follows_corpus_and_vocab(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    files = []
    for i in range(3):
        f = corpus / f"m{i}.py"
        f.write_text(f"def function_{i}(argument):\n    return argument * {i}\n" * 20)
        files.append(f)
    cache = tmp_path / "cache"
    calls = []
    real = tk.train_bpe_tokenizer

    def counting(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(tk, "train_bpe_tokenizer", counting)
    tk.get_tokenizer(None, vocab_size=300, cache_dir=cache, files=files)
    tk.get_tokenizer(None, vocab_size=300, cache_dir=cache, files=files)
    assert calls == [300]
    tk.get_tokenizer(None, vocab_size=320, cache_dir=cache, files=files)
    assert calls == [300, 320]
    st = files[1].stat()
    files[1].write_text("changed = True\n" * 30)
    os.utime(files[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    tk.get_tokenizer(None, vocab_size=300, cache_dir=cache, files=files)
    assert calls == [300, 320, 300]
    assert len(list((cache / "tokenizers").iterdir())) == 3


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("DSV3_CACHE", str(tmp_path / "c"))
    assert tk.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DSV3_CACHE")
    assert tk.default_cache_dir() == Path.home() / ".cache" / "dsv3"


def test_default_training_corpus_is_stdlib(tmp_path, monkeypatch, stdlib_subset):
    seen = []
    monkeypatch.setattr(tk, "stdlib_corpus_files", lambda: seen.append(1) or list(stdlib_subset[:3]))
    tok = tk.get_tokenizer(None, vocab_size=300, cache_dir=tmp_path)
    assert seen and tok.token_to_id("<|eos|>") == 1


# ----------------------------------------------------------------------------- user tokenizer.json


def _gpt2_like(tmp_path: Path) -> Path:
    """A user tokenizer with its own special tokens and EOS spelling, saved as tokenizer.json."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["the cat sat on the mat " * 50, "a dog ran " * 30], trainer=trainer)
    path = tmp_path / "user" / "tokenizer.json"
    path.parent.mkdir()
    tok.save(str(path))
    return path


def test_user_tokenizer_json(tmp_path):
    path = _gpt2_like(tmp_path)
    tok = tk.get_tokenizer(path, vocab_size=4096, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # nothing trained or cached
    assert tok.to_str() == Tokenizer.from_file(str(path)).to_str()
    assert tk.eos_token_id(tok) == 2  # "</s>"
    assert tk.eos_token_id(tok, "<s>") == 1
    # a directory holding tokenizer.json (a Hugging Face model directory) works too
    assert tk.get_tokenizer(path.parent, vocab_size=4096).to_str() == tok.to_str()


def test_user_tokenizer_missing_or_broken(tmp_path):
    with pytest.raises(DataError) as exc:
        tk.get_tokenizer(tmp_path / "missing.json", vocab_size=4096)
    assert "missing.json" in _one_line(exc)
    with pytest.raises(DataError) as exc:
        tk.get_tokenizer(tmp_path, vocab_size=4096)  # a directory without tokenizer.json
    assert "tokenizer.json" in _one_line(exc)
    broken = tmp_path / "broken.json"
    broken.write_text('{"version": "1.0", "model": {"type": "Nope"}}')
    with pytest.raises(DataError) as exc:
        tk.get_tokenizer(broken, vocab_size=4096)
    assert "broken.json" in _one_line(exc)
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(b"\x00\x01 not json")
    with pytest.raises(DataError) as exc:
        tk.get_tokenizer(garbage, vocab_size=4096)
    assert "garbage.json" in _one_line(exc)


def test_eos_token_errors(tmp_path):
    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    with pytest.raises(DataError) as exc:
        tk.eos_token_id(tok)
    assert "--eos-token" in _one_line(exc)
    with pytest.raises(DataError) as exc:
        tk.eos_token_id(tok, "<|eos|>")
    assert "<|eos|>" in _one_line(exc)
    assert tk.eos_token_id(tok, "b") == 1
