"""Token streams: every document encoded, followed by EOS, concatenated, cached on disk and memory-mapped.

``tokenize_corpus`` encodes a :class:`~dsv3.data.sources.DataSource` once into
``cache_dir/tokens/KEY.bin`` (uint16 when the vocabulary fits, else uint32) with its document
offsets (``KEY.docs.npy``) and metadata (``KEY.json``, written last); KEY hashes the source
files (paths, sizes, mtimes), the field, the tokenizer and the EOS id, and every file is
written atomically, so an interrupted run leaves no half-written entry and a second run
reads the cache. ``load_bin`` maps a user's pre-tokenised .bin in place. Both return a
:class:`TokenStream`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from dsv3.data.sources import DataSource, dtype_for_vocab, files_fingerprint, iter_documents
from dsv3.data.tokenizer import default_cache_dir, tokenizer_hash
from dsv3.errors import DataError
from dsv3.utils.io import atomic_path, atomic_write_text

_CACHE_VERSION = 1
_ENCODE_BATCH_CHARS = 4 << 20  # characters handed to one encode_batch call
_SCAN_CHUNK = 1 << 24  # tokens scanned at a time when checking a .bin


@dataclass
class TokenStream:
    """One flat token stream on disk, memory-mapped.

    Attributes:
        tokens: [N] uint16/uint32 memmap, every document followed by EOS.
        doc_starts: [n_docs + 1] int64 offsets of the documents in ``tokens`` (the last is N),
            or None when document boundaries are unknown (a pre-tokenised .bin).
        max_token: the largest id in ``tokens``.
        path: the .bin file.
        cached: True when the stream was read from the cache (or is a user .bin).
        seconds: time spent building it (0 for a cache hit).
    """

    tokens: np.ndarray
    doc_starts: np.ndarray | None
    max_token: int
    path: Path
    cached: bool
    seconds: float = 0.0

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def _open_tokens(path: Path, dtype: np.dtype) -> np.ndarray:
    if os.path.getsize(path) == 0:  # np.memmap cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def load_bin(source: DataSource) -> TokenStream:
    """Memory-map a user's pre-tokenised .bin (tokens already separated by EOS)."""
    assert source.kind == "bin" and source.path is not None and source.dtype is not None
    tokens = _open_tokens(source.path, np.dtype(source.dtype))
    if tokens.shape[0] == 0:
        raise DataError(f"{source.path} holds no tokens; give a non-empty token file.")
    max_token = max(int(tokens[i : i + _SCAN_CHUNK].max()) for i in range(0, tokens.shape[0], _SCAN_CHUNK))
    return TokenStream(tokens, None, max_token, source.path, cached=True)


def first_at_least(tokens: np.ndarray, value: int) -> int | None:
    """The first index i with ``tokens[i] >= value``, or None."""
    for i in range(0, tokens.shape[0], _SCAN_CHUNK):
        hits = np.flatnonzero(tokens[i : i + _SCAN_CHUNK] >= value)
        if hits.size:
            return i + int(hits[0])
    return None


def _stream_key(source: DataSource, tokenizer, eos_id: int, parse_special_tokens: bool) -> str:
    key = {
        "version": _CACHE_VERSION,
        "kind": source.kind,
        "field": source.field if source.kind in ("jsonl", "parquet", "dir") else None,
        "files": files_fingerprint(source.files),
        "tokenizer": tokenizer_hash(tokenizer),
        "eos": eos_id,
        "parse_special_tokens": parse_special_tokens,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def _batched(pieces: Iterator[tuple[str, bool]]) -> Iterator[list[tuple[str, bool]]]:
    """Group document pieces into lists of about _ENCODE_BATCH_CHARS characters (at most 4096 pieces)."""
    batch: list[tuple[str, bool]] = []
    chars = 0
    for piece in pieces:
        batch.append(piece)
        chars += len(piece[0])
        if chars >= _ENCODE_BATCH_CHARS or len(batch) >= 4096:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _stream_chunks(source: DataSource, tok, eos_id: int) -> Iterator[tuple[np.ndarray, list[int]]]:
    """Consecutive pieces of the token stream as (int64 tokens, lengths of the documents they complete)."""
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast (tokenizers >= 0.21) skips offsets
    open_doc = 0  # tokens so far of a document that arrives in several pieces
    for batch in _batched(iter_documents(source)):
        encodings = encode([text for text, _ in batch], add_special_tokens=False)
        parts, lengths = [], []
        for enc, (_, ends) in zip(encodings, batch):
            parts.append(np.asarray(enc.ids, dtype=np.int64))
            open_doc += len(enc.ids)
            if ends:
                parts.append(np.array([eos_id], dtype=np.int64))
                lengths.append(open_doc + 1)
                open_doc = 0
        chunk = np.concatenate(parts)
        if chunk.size:
            yield chunk, lengths


def tokenize_corpus(
    source: DataSource,
    tokenizer,
    *,
    eos_id: int,
    cache_dir: str | os.PathLike | None = None,
    parse_special_tokens: bool = False,
) -> TokenStream:
    """Encode every document of ``source`` and concatenate them, each followed by ``eos_id`` (cached: see
    the module docstring).

    Args:
        source: a text source (not "bin").
        tokenizer: a ``tokenizers.Tokenizer``; documents are encoded in batches with
            ``encode_batch_fast`` (or ``encode_batch``), ``add_special_tokens=False``.
        eos_id: the id appended after each document.
        cache_dir: default :func:`~dsv3.data.tokenizer.default_cache_dir`.
        parse_special_tokens: when False (default) text such as "<|eos|>" inside a
            document is encoded as plain text, so documents cannot inject special tokens.
    """
    root = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "tokens"
    if source.kind == "stdlib" and not source.files:
        raise DataError("no standard-library .py files were found; pass a corpus with --data instead.")
    try:
        key = _stream_key(source, tokenizer, eos_id, parse_special_tokens)
    except FileNotFoundError as exc:
        raise DataError(
            f"the data file {exc.filename} does not exist (was it removed?); check the --data path."
        ) from None
    bin_path, docs_path, meta_path = root / f"{key}.bin", root / f"{key}.docs.npy", root / f"{key}.json"
    dtype = dtype_for_vocab(tokenizer.get_vocab_size())
    hit = _read_cache(bin_path, docs_path, meta_path, dtype)
    if hit is not None:
        return hit

    start = time.perf_counter()
    tok = Tokenizer.from_str(tokenizer.to_str())  # a private copy whose flag we may set
    tok.encode_special_tokens = not parse_special_tokens
    try:
        root.mkdir(parents=True, exist_ok=True)
        doc_lengths, max_token = _write_tokens(bin_path, source, tok, eos_id, dtype)
        doc_starts = np.zeros(len(doc_lengths) + 1, dtype=np.int64)
        np.cumsum(doc_lengths, out=doc_starts[1:])
        with atomic_path(docs_path) as tmp, open(tmp, "wb") as fh:
            np.save(fh, doc_starts)
        seconds = time.perf_counter() - start
        meta = {
            "version": _CACHE_VERSION,
            "source": source.describe(),
            "dtype": dtype.name,
            "num_tokens": int(doc_starts[-1]),
            "num_documents": len(doc_lengths),
            "max_token": max_token,
            "eos_id": eos_id,
            "tokenizer_sha256": tokenizer_hash(tokenizer),
            "seconds": round(seconds, 3),
        }
        atomic_write_text(meta_path, json.dumps(meta, indent=1) + "\n")
    except OSError as exc:
        raise DataError(
            f"cannot write the token cache under {root} ({exc.strerror}); set DSV3_CACHE to a writable directory."
        ) from None
    return TokenStream(_open_tokens(bin_path, dtype), doc_starts, max_token, bin_path, cached=False, seconds=seconds)


def _write_tokens(bin_path: Path, source: DataSource, tok, eos_id: int, dtype: np.dtype) -> tuple[list[int], int]:
    """Encode ``source`` into ``bin_path`` (atomically): ``(document lengths, largest id)``."""
    doc_lengths: list[int] = []
    n_tokens, max_token = 0, -1
    with atomic_path(bin_path) as tmp, open(tmp, "wb") as out:
        for chunk, lengths in _stream_chunks(source, tok, eos_id):
            max_token = max(max_token, int(chunk.max()))
            if max_token > np.iinfo(dtype).max:
                raise DataError(
                    f"the tokenizer produced id {max_token}, beyond its own vocabulary; check the tokenizer file."
                )
            out.write(chunk.astype(dtype).tobytes())
            n_tokens += chunk.size
            doc_lengths += lengths
        out.flush()
        if not doc_lengths:
            raise DataError(f"{source.describe()} contains no documents; give data with some text in it.")
        if n_tokens == len(doc_lengths):  # only the EOS separators
            raise DataError(f"{source.describe()} encodes to zero tokens; give data with some text in it.")
    return doc_lengths, max_token


def _read_cache(bin_path: Path, docs_path: Path, meta_path: Path, dtype: np.dtype) -> TokenStream | None:
    """The cached stream, or None when the entry is missing or inconsistent."""
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("version") != _CACHE_VERSION or meta["dtype"] != dtype.name:
            return None
        if bin_path.stat().st_size != meta["num_tokens"] * dtype.itemsize:
            return None
        doc_starts = np.load(docs_path)
        if doc_starts.shape != (meta["num_documents"] + 1,) or int(doc_starts[-1]) != meta["num_tokens"]:
            return None
        return TokenStream(_open_tokens(bin_path, dtype), doc_starts, int(meta["max_token"]), bin_path, cached=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None
