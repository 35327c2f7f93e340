"""Training data: sources, cached tokenisation, packing, split, deterministic resumable order, bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dsv3.data import pretrain as D
from dsv3.data import sources, tokens
from dsv3.data.sources import CorpusSpec
from dsv3.data.tokenizer import train_bpe_tokenizer
from dsv3.errors import CheckpointError, ConfigError, DataError

EOS = 1
DOCS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 6,
    "import os\nprint(os.getcwd())\r\n# windows line end kept\r\n",
    "héllo wörld 世界 🤖 — unicode survives\n" * 3,
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n" * 4,
    "a literal <|eos|> inside a document is text, not a separator\n",
    "for i in range(10):\n    total += i * i\n" * 5,
    "short\n",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 8,
    "x = [1, 2, 3]\ny = {k: v for k, v in zip(x, x)}\n" * 3,
]


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg.endswith("."), msg
    return msg


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokcorpus")
    files = []
    for i, d in enumerate(DOCS * 3):
        f = root / f"{i:02d}.txt"
        f.write_text(d, encoding="utf-8", newline="")
        files.append(f)
    return train_bpe_tokenizer(files, 300)


def _reference_stream(tok, docs) -> np.ndarray:
    """Independent of data.py: each document encoded on its own, literal specials as text, EOS after each."""
    from tokenizers import Tokenizer

    plain = Tokenizer.from_str(tok.to_str())
    plain.encode_special_tokens = True
    out: list[int] = []
    for d in docs:
        out += plain.encode(d, add_special_tokens=False).ids + [EOS]
    return np.array(out, dtype=np.int64)


def _write_dir(root: Path, docs=DOCS) -> list[Path]:
    """Documents as files in nested directories; sorted path order == document order."""
    paths = []
    for i, d in enumerate(docs):
        p = root / f"g{i % 3}" / f"doc{i:02d}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(d, encoding="utf-8", newline="")
        paths.append(p)
    return sorted(paths)


def _build(path, tok, cache, **kw):
    kw.setdefault("seq_len", 8)
    kw.setdefault("vocab_size", 300)
    corpus = CorpusSpec(path, **{k: kw.pop(k) for k in ("format", "field", "glob", "dtype") if k in kw})
    return D.build_data(corpus, tokenizer=tok, cache_dir=cache, **kw)


# ----------------------------------------------------------------------------- packing


def test_stream_is_documents_joined_by_eos(tmp_path, tok):
    files = _write_dir(tmp_path / "corpus")
    docs = [f.read_bytes().decode("utf-8") for f in files]
    data = _build(tmp_path / "corpus", tok, tmp_path / "cache", val_fraction=0.0)
    ref = _reference_stream(tok, docs)
    np.testing.assert_array_equal(np.asarray(data.stream.tokens, dtype=np.int64), ref)
    assert data.stream.tokens.dtype == np.uint16
    starts = data.stream.doc_starts
    assert len(starts) == len(docs) + 1 and starts[0] == 0 and starts[-1] == len(ref)
    assert all(ref[e - 1] == EOS for e in starts[1:])  # every document ends with EOS
    assert int((ref == EOS).sum()) == len(docs)  # and "<|eos|>" in a document's text is not a separator
    assert tok.decode(ref.tolist(), skip_special_tokens=False) == "<|eos|>".join(docs) + "<|eos|>"


def test_packing_covers_the_stream_in_order(tmp_path, tok):
    _write_dir(tmp_path / "corpus")
    T = 16
    data = _build(tmp_path / "corpus", tok, tmp_path / "cache", seq_len=T, val_fraction=0.0)
    stream = np.asarray(data.stream.tokens, dtype=np.int64)
    ds = data.train
    n = len(ds)
    assert n == (len(stream) - 1) // T > 0
    x, y = ds.batch(range(n))
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (n, T)
    np.testing.assert_array_equal(x.reshape(-1).numpy(), stream[: n * T])
    np.testing.assert_array_equal(y.reshape(-1).numpy(), stream[1 : n * T + 1])
    assert torch.equal(x[:, 1:], y[:, :-1])  # labels are the inputs shifted by one
    assert ds.num_tokens == n * T


def test_large_text_document_is_read_in_pieces(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(sources, "_TEXT_CHUNK_CHARS", 40)
    text = "".join(DOCS) + "no newline at the very end" + "x" * 300
    f = tmp_path / "big.txt"
    f.write_text(text, encoding="utf-8", newline="")
    data = _build(f, tok, tmp_path / "cache", val_fraction=0.0)
    ids = np.asarray(data.stream.tokens).tolist()
    assert ids.count(EOS) == 1 and ids[-1] == EOS  # still one document
    assert tok.decode(ids[:-1], skip_special_tokens=False) == text  # exactly, "\r\n" included


# ----------------------------------------------------------------------------- order and resume


def _loader(tmp_path, tok, seed=0, **kw):
    _write_dir(tmp_path / "corpus")
    data = _build(tmp_path / "corpus", tok, tmp_path / "cache", val_fraction=0.0, **kw)
    return data, data.loader(seed)


def test_order_is_a_permutation_per_epoch_from_the_seed(tmp_path, tok):
    data, loader = _loader(tmp_path, tok, seed=3)
    n = len(data.train)
    assert n >= 20
    first = loader.next_indices(n)
    second = loader.next_indices(n)
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(n))
    assert first.tolist() != second.tolist()
    np.testing.assert_array_equal(first, np.random.default_rng([3, 0]).permutation(n))
    assert (loader.epoch, loader.index) == (2, 0)

    same = data.loader(3)
    np.testing.assert_array_equal(same.next_indices(n), first)
    other = data.loader(4)
    assert other.next_indices(n).tolist() != first.tolist()


def test_varying_batch_sizes_follow_one_order(tmp_path, tok):
    data, loader = _loader(tmp_path, tok, seed=7)
    n = len(data.train)
    order = np.concatenate([np.random.default_rng([7, e]).permutation(n) for e in range(4)])
    sizes = [1, 3, n - 2, 5, 2 * n + 1, 4]  # crosses epochs, one batch spans several
    got = []
    for b in sizes:
        x, y = loader.next_batch(b)
        assert x.shape == y.shape == (b, data.seq_len)
        got.append(x)
    expected = data.train.batch(order[: sum(sizes)])[0]
    assert torch.equal(torch.cat(got), expected)
    assert loader.sequences_seen == sum(sizes)


def test_exact_resume_across_an_epoch_boundary(tmp_path, tok):
    data, loader = _loader(tmp_path, tok, seed=11)
    n = len(data.train)
    sizes = [4, 4, 7, n - 16, 6, 3, 5, 9]  # the 4th/5th batches straddle the first epoch boundary
    uninterrupted = [loader.next_batch(b) for b in sizes]

    resumed_from = 3
    first = data.loader(11)
    for b in sizes[:resumed_from]:
        first.next_batch(b)
    saved = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
    # a new process: the data is rebuilt (from the cache) and the loader restored
    again = _build(tmp_path / "corpus", tok, tmp_path / "cache", val_fraction=0.0)
    assert again.stream.cached
    loader2 = again.loader(11)
    loader2.load_state_dict(saved)
    for b, (x, y) in zip(sizes[resumed_from:], uninterrupted[resumed_from:]):
        x2, y2 = loader2.next_batch(b)
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert loader2.state_dict() == loader.state_dict()


def test_resume_state_checks(tmp_path, tok):
    data, loader = _loader(tmp_path, tok, seed=1)
    loader.next_batch(3)
    state = loader.state_dict()
    with pytest.raises(DataError) as exc:
        data.loader(2).load_state_dict(state)
    assert "seed" in _one_line(exc)
    other = _build(tmp_path / "corpus", tok, tmp_path / "cache", val_fraction=0.0, seq_len=9)
    with pytest.raises(DataError) as exc:
        other.loader(1).load_state_dict(state)
    _one_line(exc)
    with pytest.raises(CheckpointError) as exc:
        data.loader(1).load_state_dict({"epoch": 0})
    _one_line(exc)
    with pytest.raises(CheckpointError) as exc:
        data.loader(1).load_state_dict({**state, "index": len(data.train)})
    _one_line(exc)
    with pytest.raises(ConfigError):
        data.loader(-1)
    with pytest.raises(ConfigError):
        loader.next_batch(0)


# ----------------------------------------------------------------------------- split


def _segments_cover(n, *views):
    marks = np.zeros(n, dtype=np.int64)
    for v in views:
        for s, e in v.segments:
            marks[s:e] += 1
    return marks


def test_validation_split_by_document_is_disjoint(tmp_path, tok):
    docs = [f"document {i}: " + DOCS[i % len(DOCS)] for i in range(60)]
    _write_dir(tmp_path / "corpus", docs)
    data = _build(tmp_path / "corpus", tok, tmp_path / "cache", seq_len=8, val_fraction=0.1)
    n = len(data.stream)
    train, val = data.train.view, data.val.view
    np.testing.assert_array_equal(_segments_cover(n, train, val), np.ones(n))  # disjoint, nothing lost
    starts = set(data.stream.doc_starts.tolist())
    assert all(s in starts and e in starts for s, e in val.segments)  # whole documents
    assert len(val.segments) >= 2  # several documents, not one tail block
    assert 0.1 * n <= len(val) <= 0.2 * n
    assert len(data.val) >= 1
    # every validation sequence lies inside held-out tokens
    held = np.zeros(n, bool)
    for s, e in val.segments:
        held[s:e] = True
    stream = np.asarray(data.stream.tokens, dtype=np.int64)
    vx, vy = data.val.batch(range(len(data.val)))
    flat_val = np.concatenate([stream[s:e] for s, e in val.segments])
    np.testing.assert_array_equal(vx.reshape(-1).numpy(), flat_val[: vx.numel()])
    # the split does not depend on the training seed, and is the same when rebuilt
    again = _build(tmp_path / "corpus", tok, tmp_path / "cache", seq_len=8, val_fraction=0.1)
    assert again.val.view.segments == val.segments
    other = _build(tmp_path / "corpus", tok, tmp_path / "cache", seq_len=8, val_fraction=0.1, split_seed=5)
    assert other.val.view.segments != val.segments


def test_validation_holds_at_least_one_sequence(tmp_path, tok):
    _write_dir(tmp_path / "corpus")
    data = _build(tmp_path / "corpus", tok, tmp_path / "cache", seq_len=32, val_fraction=0.001)
    assert len(data.val) >= 1 and len(data.val.view) >= 33
    n = len(data.stream)
    np.testing.assert_array_equal(_segments_cover(n, data.train.view, data.val.view), np.ones(n))


def test_single_document_is_split_by_token_range(tmp_path, tok):
    f = tmp_path / "one.txt"
    f.write_text("".join(DOCS), encoding="utf-8")
    data = _build(f, tok, tmp_path / "cache", seq_len=8, val_fraction=0.05)
    n = len(data.stream)
    need = max(int(np.ceil(0.05 * n)), 9)
    assert data.train.view.segments == [(0, n - need)]
    assert data.val.view.segments == [(n - need, n)]


def test_val_batches_fixed_order(tmp_path, tok):
    docs = [f"document {i}: " + DOCS[i % len(DOCS)] for i in range(60)]
    _write_dir(tmp_path / "corpus", docs)
    data = _build(tmp_path / "corpus", tok, tmp_path / "cache", seq_len=4, val_fraction=0.2)
    nv = len(data.val)
    assert nv > 10
    full = list(data.val_batches(4))
    assert sum(x.shape[0] for x, _ in full) == nv and len(full) == -(-nv // 4)
    assert torch.equal(torch.cat([x for x, _ in full]), data.val.batch(range(nv))[0])
    few = list(data.val_batches(2, max_batches=3))
    assert [x.shape[0] for x, _ in few] == [2, 2, 2]
    picks = np.linspace(0, nv - 1, 6).round().astype(int)
    assert torch.equal(torch.cat([x for x, _ in few]), data.val.batch(picks)[0])  # spread over the set
    assert all(torch.equal(a[0], b[0]) for a, b in zip(few, data.val_batches(2, max_batches=3)))
    none = _build(tmp_path / "corpus", tok, tmp_path / "cache", seq_len=4, val_fraction=0.0)
    assert none.val is None and list(none.val_batches(4)) == []


# ----------------------------------------------------------------------------- formats


def test_text_file_is_one_document(tmp_path, tok):
    f = tmp_path / "a.txt"
    f.write_text(DOCS[0] + DOCS[1], encoding="utf-8")
    data = _build(f, tok, tmp_path / "cache", val_fraction=0.0)
    assert data.source.kind == "text"
    np.testing.assert_array_equal(np.asarray(data.stream.tokens), _reference_stream(tok, [DOCS[0] + DOCS[1]]))


def test_directory_glob_recursive_sorted_and_hidden_skipped(tmp_path, tok):
    root = tmp_path / "d"
    (root / "b" / "deep").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "b" / "deep" / "z.md").write_text(DOCS[0])
    (root / "a.txt").write_text(DOCS[1])
    (root / "b" / "c.py").write_text(DOCS[2], newline="")
    (root / "b" / "skip.bin").write_bytes(b"\x00\x01")  # not matched by the default patterns
    (root / ".git" / "x.txt").write_text("hidden")
    (root / ".hidden.txt").write_text("hidden")
    (root / "empty.txt").write_text("")  # an empty document is skipped
    data = _build(root, tok, tmp_path / "cache", val_fraction=0.0)
    names = [p.relative_to(root).as_posix() for p in data.source.files]
    assert names == ["a.txt", "b/c.py", "b/deep/z.md", "empty.txt"]
    np.testing.assert_array_equal(np.asarray(data.stream.tokens), _reference_stream(tok, [DOCS[1], DOCS[2], DOCS[0]]))
    only_md = _build(root, tok, tmp_path / "cache", val_fraction=0.0, glob="*.md", seq_len=2)
    np.testing.assert_array_equal(np.asarray(only_md.stream.tokens), _reference_stream(tok, [DOCS[0]]))


def test_jsonl_field(tmp_path, tok):
    f = tmp_path / "d.jsonl"
    rows = [{"content": d, "id": i} for i, d in enumerate(DOCS[:4])]
    lines = [json.dumps(r) for r in rows]
    lines.insert(2, "")  # blank lines are skipped
    f.write_text("\n".join(lines) + "\n")
    data = _build(f, tok, tmp_path / "cache", field="content", val_fraction=0.0)
    assert data.source.kind == "jsonl"
    np.testing.assert_array_equal(np.asarray(data.stream.tokens), _reference_stream(tok, DOCS[:4]))


def test_parquet_column(tmp_path, tok):
    f = tmp_path / "d.parquet"
    table = pa.table({"n": list(range(6)), "body": DOCS[:5] + [None]})
    pq.write_table(table, f, row_group_size=2)
    data = _build(f, tok, tmp_path / "cache", field="body", val_fraction=0.0)
    assert data.source.kind == "parquet"
    np.testing.assert_array_equal(np.asarray(data.stream.tokens), _reference_stream(tok, DOCS[:5]))


def test_directory_mixing_formats_by_suffix(tmp_path, tok):
    root = tmp_path / "mixed"
    root.mkdir()
    (root / "a.jsonl").write_text(json.dumps({"text": DOCS[0]}) + "\n")
    pq.write_table(pa.table({"text": [DOCS[1]]}), root / "b.parquet")
    (root / "c.txt").write_text(DOCS[2], newline="")
    data = _build(root, tok, tmp_path / "cache", val_fraction=0.0, glob=["*.jsonl", "*.parquet", "*.txt"])
    np.testing.assert_array_equal(np.asarray(data.stream.tokens), _reference_stream(tok, DOCS[:3]))


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_pretokenised_bin(tmp_path, dtype):
    rng = np.random.default_rng(0)
    vocab = 70_000 if dtype == "uint32" else 1000
    tokens = rng.integers(0, vocab, size=500).astype(dtype)
    f = tmp_path / "t.bin"
    tokens.tofile(f)
    explicit = D.build_data(
        CorpusSpec(f, dtype=dtype), seq_len=16, vocab_size=vocab, val_fraction=0.1, cache_dir=tmp_path / "c"
    )
    inferred = D.build_data(CorpusSpec(f), seq_len=16, vocab_size=vocab, val_fraction=0.1, cache_dir=tmp_path / "c")
    for data in (explicit, inferred):
        assert data.source.kind == "bin" and data.source.dtype == dtype and data.eos_id is None
        np.testing.assert_array_equal(np.asarray(data.stream.tokens), tokens)
        assert data.val.view.segments == [(450, 500)]  # the tail, by token range
        assert data.train.view.segments == [(0, 450)]
        x, y = data.train.batch([0, 27])
        np.testing.assert_array_equal(x[1].numpy(), tokens[27 * 16 : 28 * 16].astype(np.int64))
    assert not (tmp_path / "c").exists()  # a user .bin is used in place


def test_default_is_the_stdlib_corpus(tmp_path, tok, monkeypatch):
    from dsv3.data.sources import stdlib_corpus_files

    subset = [f for f in stdlib_corpus_files() if 2_000 < f.stat().st_size < 6_000][:4]
    monkeypatch.setattr(sources, "stdlib_corpus_files", lambda: subset)
    data = _build(None, tok, tmp_path / "cache", val_fraction=0.0)
    assert data.source.kind == "stdlib" and data.source.files == tuple(subset)
    docs = [p.read_bytes().decode("utf-8") for p in subset]
    np.testing.assert_array_equal(np.asarray(data.stream.tokens), _reference_stream(tok, docs))
    assert "standard library" in data.summary()


# ----------------------------------------------------------------------------- cache


def test_token_cache_hit_and_invalidation(tmp_path, tok, monkeypatch):
    files = _write_dir(tmp_path / "corpus")
    cache = tmp_path / "cache"
    first = _build(tmp_path / "corpus", tok, cache)
    assert not first.stream.cached and "tokenised" in first.summary()
    entries = sorted(p.name for p in (cache / "tokens").iterdir())
    assert len(entries) == 3 and not any(".tmp" in e for e in entries)  # .bin, .docs.npy, .json
    assert isinstance(first.stream.tokens, np.memmap)

    monkeypatch.setattr(tokens, "iter_documents", lambda *a: pytest.fail("re-tokenised despite a cache entry"))
    second = _build(tmp_path / "corpus", tok, cache)
    assert second.stream.cached and second.stream.path == first.stream.path and "cached" in second.summary()
    assert second.data_id == first.data_id
    monkeypatch.undo()

    st = files[0].stat()
    files[0].write_text("changed\n" * 40)
    os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = _build(tmp_path / "corpus", tok, cache)
    assert not third.stream.cached and third.stream.path != first.stream.path
    assert third.data_id != first.data_id


def test_failed_tokenisation_writes_nothing(tmp_path, tok):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join([json.dumps({"text": d}) for d in DOCS] + ["{broken"]) + "\n")
    with pytest.raises(DataError):
        _build(f, tok, tmp_path / "cache")
    left = list((tmp_path / "cache" / "tokens").iterdir()) if (tmp_path / "cache" / "tokens").exists() else []
    assert left == []


# ----------------------------------------------------------------------------- bad input


def test_missing_path(tmp_path, tok):
    with pytest.raises(DataError) as exc:
        _build(tmp_path / "nope.txt", tok, tmp_path / "c")
    assert "nope.txt" in _one_line(exc)


@pytest.mark.parametrize(
    "name, content, needle",
    [
        ("empty.txt", "", "no documents"),
        ("empty.jsonl", "\n\n", "no documents"),
        ("bad.jsonl", '{"text": "ok"}\n{"text": "fine"}\n{oops\n', "line 3"),
        ("nofield.jsonl", '{"text": "ok"}\n{"body": "x"}\n', "line 2"),
        ("notstr.jsonl", '{"text": 5}\n', "line 1"),
        ("list.jsonl", "[1, 2]\n", "line 1"),
    ],
)
def test_bad_text_sources(tmp_path, tok, name, content, needle):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(DataError) as exc:
        _build(f, tok, tmp_path / "c")
    msg = _one_line(exc)
    assert name in msg and needle in msg


def test_bad_files(tmp_path, tok):
    cases = []
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    cases.append((latin, {}, "UTF-8"))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    cases.append((tmp_path / "nocol.parquet", {}, '"text"'))
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    cases.append((tmp_path / "ints.parquet", {}, "int64"))
    (tmp_path / "fake.parquet").write_text("not parquet")
    cases.append((tmp_path / "fake.parquet", {}, "parquet"))
    (tmp_path / "empty_dir").mkdir()
    cases.append((tmp_path / "empty_dir", {}, "no files matching"))
    for path, kw, needle in cases:
        with pytest.raises(DataError) as exc:
            _build(path, tok, tmp_path / "c", **kw)
        msg = _one_line(exc)
        assert path.name in msg and needle in msg, msg


def test_bad_bin_files(tmp_path):
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x00\x02")
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    big = tmp_path / "big.bin"
    tokens = np.arange(100, dtype=np.uint16)
    tokens[57] = 5000
    tokens.tofile(big)
    u32 = tmp_path / "u32.bin"
    np.arange(6, dtype=np.uint32).tofile(u32)  # 24 bytes: a multiple of 2 and 4
    cases = [
        (odd, {}, "multiple of 2"),
        (odd, {"dtype": "uint32"}, "multiple of 4"),
        (empty, {}, "no tokens"),
        (big, {}, "position 57"),
        (odd, {"dtype": "int8"}, "uint16 or uint32"),
    ]
    for path, kw, needle in cases:
        with pytest.raises(DataError) as exc:
            D.build_data(CorpusSpec(path, **kw), seq_len=4, vocab_size=1000)
        msg = _one_line(exc)
        assert path.name in msg and needle in msg, msg
    # uint32 data read as uint16: the high halves are zeros, the data only looks shorter; read right it works
    ok = D.build_data(CorpusSpec(u32, dtype="uint32"), seq_len=2, vocab_size=1000, val_fraction=0.0)
    assert np.asarray(ok.stream.tokens).tolist() == list(range(6))


def test_vocabulary_and_length_checks(tmp_path, tok):
    _write_dir(tmp_path / "corpus")
    with pytest.raises(DataError) as exc:
        _build(tmp_path / "corpus", tok, tmp_path / "c", vocab_size=200)  # tokenizer has 300
    assert "vocabulary of 200" in _one_line(exc)
    with pytest.raises(DataError) as exc:
        _build(tmp_path / "corpus", tok, tmp_path / "c", seq_len=100_000)
    assert "--seq-len" in _one_line(exc)
    with pytest.raises(ConfigError):
        _build(tmp_path / "corpus", tok, tmp_path / "c", val_fraction=0.9)
    with pytest.raises(DataError) as exc:
        _build(tmp_path / "corpus", tok, tmp_path / "c", format="jsonl")  # a format forced on a directory
    _one_line(exc)
    with pytest.raises(DataError) as exc:
        _build(tmp_path / "corpus", tok, tmp_path / "c", format="csv")
    _one_line(exc)
    with pytest.raises(DataError) as exc:
        _build(tmp_path / "corpus", None, tmp_path / "c")
    _one_line(exc)


def test_bin_inside_a_directory_is_refused(tmp_path, tok):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.bin").write_bytes(b"\x00\x00")
    with pytest.raises(DataError) as exc:
        _build(tmp_path / "d", tok, tmp_path / "c", glob="*")
    assert "x.bin" in _one_line(exc)


def test_bin_with_a_tokenizer_reports_its_eos(tmp_path, tok):
    from tokenizers import Tokenizer, models

    f = tmp_path / "t.bin"
    np.arange(40, dtype=np.uint16).tofile(f)
    assert D.build_data(CorpusSpec(f), tokenizer=tok, seq_len=4, vocab_size=300).eos_id == 1
    no_eos = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    no_bin_eos = D.build_data(CorpusSpec(f), tokenizer=no_eos, seq_len=4, vocab_size=300)
    assert no_bin_eos.eos_id is None  # not needed for a .bin
    with pytest.raises(DataError):
        D.build_data(CorpusSpec(f), tokenizer=no_eos, seq_len=4, vocab_size=300, eos_token="</s>")
