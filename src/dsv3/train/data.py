"""Training data: documents -> one cached token stream -> packed sequences -> batches.

The pipeline, each step one function or class of this module::

    DataSource          where documents come from: a text file, a directory of text
                        files, .jsonl (a field), .parquet (a column), a pre-tokenised
                        .bin, or the embedded default (the Python standard library)
    tokenize_corpus     every document encoded and followed by EOS, all concatenated
                        into one flat stream, cached as a .bin (uint16 when the
                        vocabulary fits, else uint32) and memory-mapped
    split_stream        validation documents held out (a fraction of the tokens)
    PackedDataset       sequence i = view[i*T : i*T + T + 1]; inputs [:-1], labels [1:]
    TrainLoader         a permutation of the sequences per epoch, drawn from the seed;
                        next_batch(B) of any size; state_dict() restores exactly
    val_batches         the held-out sequences in a fixed order

Packing. The standard pretraining packing (GPT-2/3, nanoGPT, Megatron): documents
are joined into one stream with an EOS token after each, and the stream is cut
into windows of T + 1 tokens every T tokens, so a sequence may span document
boundaries (attention is not masked at EOS; the model learns that a new document
starts after EOS) and every token after the first is a label exactly once per
epoch. No token is padding.

``build_data`` puts it together for the training loop.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsv3.errors import CheckpointError, ConfigError, DataError
from dsv3.train.tokenizer import default_cache_dir, eos_token_id, files_fingerprint, stdlib_corpus_files, tokenizer_hash
from dsv3.utils.io import atomic_path, atomic_write_text

# File patterns a directory source reads by default: common text and source-code files.
DEFAULT_GLOBS: tuple[str, ...] = (
    "*.txt", "*.md", "*.rst", "*.tex", "*.html",
    "*.py", "*.c", "*.h", "*.cc", "*.cpp", "*.hpp", "*.cu", "*.rs", "*.go", "*.java", "*.js", "*.ts",
    "*.sh", "*.toml", "*.yaml", "*.yml",
)  # fmt: skip
FORMATS = ("text", "dir", "jsonl", "parquet", "bin", "stdlib")
_SUFFIX_FORMAT = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".bin": "bin"}
_CACHE_VERSION = 1
_TEXT_CHUNK_CHARS = 1 << 20  # a large text document is read and encoded in ~1M-character pieces
_ENCODE_BATCH_CHARS = 4 << 20  # characters handed to one encode_batch call
_SCAN_CHUNK = 1 << 24  # tokens scanned at a time when checking a .bin


def _dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id 0..vocab_size-1 fits in 16 bits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class DataSource:
    """Where the documents come from.

    Attributes:
        kind: one of FORMATS ("text", "dir", "jsonl", "parquet", "bin", "stdlib").
        path: the path the user gave (None for the stdlib default).
        files: the files read, in reading order (sorted for directories).
        field: the jsonl field / parquet column holding the text.
        dtype: "uint16" or "uint32" for a .bin, else None.
    """

    kind: str
    path: Path | None
    files: tuple[Path, ...]
    field: str = "text"
    dtype: str | None = None

    def describe(self) -> str:
        """A short human description, e.g. ``'data.jsonl (jsonl, field "text")'``."""
        if self.kind == "stdlib":
            return f"the Python standard library ({len(self.files)} files)"
        if self.kind == "dir":
            return f"{self.path} ({len(self.files)} files)"
        if self.kind in ("jsonl", "parquet"):
            what = "field" if self.kind == "jsonl" else "column"
            return f'{self.path} ({self.kind}, {what} "{self.field}")'
        if self.kind == "bin":
            return f"{self.path} (pre-tokenised {self.dtype})"
        return str(self.path)


def _format_of(path: Path) -> str:
    return _SUFFIX_FORMAT.get(path.suffix.lower(), "text")


def resolve_source(
    data: str | os.PathLike | None = None,
    *,
    format: str | None = None,
    field: str = "text",
    glob: str | Sequence[str] | None = None,
    dtype: str | None = None,
    vocab_size: int | None = None,
) -> DataSource:
    """Describe the data at ``data`` (None: the stdlib corpus), checking that it exists.

    Args:
        data: a file or directory path, or None for the Python standard library.
        format: "text", "jsonl", "parquet" or "bin" to override the guess from the suffix
            (``.jsonl``/``.ndjson``, ``.parquet``, ``.bin``; anything else is text).
            Inside a directory each file is read by its own suffix.
        field: the jsonl field / parquet column holding the text.
        glob: pattern(s) a directory's files must match, searched recursively; default
            DEFAULT_GLOBS. Hidden files and directories are skipped.
        dtype: "uint16" or "uint32" for a .bin; default from ``vocab_size``
            (uint16 when vocab_size <= 65536, as dsv3 writes them).
        vocab_size: the model's V, used to infer a .bin's dtype.
    """
    if format is not None and format not in ("text", "jsonl", "parquet", "bin"):
        raise DataError(f"unknown data format {format!r}; use one of text, jsonl, parquet, bin.")
    if data is None:
        return DataSource("stdlib", None, tuple(stdlib_corpus_files()), field)
    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(f"the data path {path} does not exist; check the --data path.")
    if path.is_dir():
        if format is not None:
            raise DataError(
                f"a data format cannot be forced for the directory {path}; its files are read by their suffix "
                "(.jsonl, .parquet, anything else as text), so drop --data-format."
            )
        patterns = (glob,) if isinstance(glob, str) else tuple(glob or DEFAULT_GLOBS)
        found: set[Path] = set()
        for pattern in patterns:
            for f in path.rglob(pattern):
                rel = f.relative_to(path)
                if f.is_file() and not any(part.startswith(".") for part in rel.parts):
                    found.add(f)
        files = tuple(sorted(found))
        if not files:
            raise DataError(
                f"the directory {path} has no files matching {', '.join(patterns)}; "
                "point --data at a directory of text files or change the file pattern."
            )
        bins = [f for f in files if _format_of(f) == "bin"]
        if bins:
            raise DataError(
                f"{bins[0]} is a pre-tokenised .bin inside a directory; give a .bin file on its own as --data."
            )
        return DataSource("dir", path, files, field)
    kind = format or _format_of(path)
    if kind != "bin":
        return DataSource(kind, path, (path,), field)
    if dtype is None:
        dtype = _dtype_for_vocab(vocab_size).name if vocab_size is not None else "uint16"
    if dtype not in ("uint16", "uint32"):
        raise DataError(f"unsupported token dtype {dtype!r} for {path}; use uint16 or uint32.")
    size = path.stat().st_size
    item = np.dtype(dtype).itemsize
    if size % item:
        raise DataError(
            f"the size of {path} ({size} bytes) is not a multiple of {item} bytes, so it is not a {dtype} "
            "token file; check the file or the --data-dtype."
        )
    return DataSource("bin", path, (path,), field, dtype)


def _text_pieces(path: Path) -> Iterator[str]:
    """A text file's content in pieces of about _TEXT_CHUNK_CHARS characters cut after a newline.

    Newlines are kept exactly as in the file (no "\\r\\n" translation).
    """
    carry = ""
    with open(path, encoding="utf-8", newline="") as fh:
        while True:
            block = fh.read(_TEXT_CHUNK_CHARS)
            if not block:
                break
            text = carry + block
            cut = text.rfind("\n") + 1
            if cut == 0 and len(text) < 4 * _TEXT_CHUNK_CHARS:  # no newline yet: read more
                carry = text
                continue
            cut = cut or len(text)
            carry = text[cut:]
            yield text[:cut]
    if carry:
        yield carry


def _jsonl_documents(path: Path, key: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"line {lineno} of {path} is not valid JSON ({exc.msg}); fix or remove that line."
                ) from None
            if not isinstance(record, dict) or key not in record:
                raise DataError(
                    f'line {lineno} of {path} has no "{key}" field; '
                    "choose the field that holds the text with --data-field."
                )
            text = record[key]
            if text is None:
                continue
            if not isinstance(text, str):
                raise DataError(
                    f'the "{key}" field on line {lineno} of {path} is a {type(text).__name__}, not a string; '
                    "choose the field that holds the text with --data-field."
                )
            yield text


def _parquet_documents(path: Path, column: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path} cannot be read as a parquet file ({reason}); check the file.") from None
    names = pf.schema_arrow.names
    if column not in names:
        raise DataError(
            f'{path} has no column "{column}" (its columns: {", ".join(names)}); '
            "choose the text column with --data-field."
        )
    col_type = pf.schema_arrow.field(column).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
        raise DataError(
            f'the column "{column}" of {path} holds {col_type}, not strings; choose the text column with --data-field.'
        )
    for batch in pf.iter_batches(batch_size=1024, columns=[column]):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text


def iter_documents(source: DataSource) -> Iterator[tuple[str, bool]]:
    """The text of every document of ``source``, in order, as ``(piece, ends_document)`` pairs.

    Most documents come as one piece; a large text file comes in pieces cut after
    newlines so it never has to be held in memory. Empty documents are skipped.
    """
    if source.kind == "bin":
        raise DataError(f"{source.path} is already tokenised; it has no text documents to read.")
    for path in source.files:
        kind = source.kind if source.kind in ("jsonl", "parquet") else _format_of(path)
        try:
            if kind == "jsonl":
                for text in _jsonl_documents(path, source.field):
                    if text:
                        yield text, True
            elif kind == "parquet":
                for text in _parquet_documents(path, source.field):
                    if text:
                        yield text, True
            else:
                pieces = _text_pieces(path)
                prev = next(pieces, None)
                for piece in pieces:
                    yield prev, False
                    prev = piece
                if prev is not None:
                    yield prev, True
        except UnicodeDecodeError:
            raise DataError(f"{path} is not UTF-8 text; convert it to UTF-8 or leave it out of the data.") from None
        except FileNotFoundError:
            raise DataError(f"the data file {path} does not exist (was it removed?); check the --data path.") from None
        except OSError as exc:
            raise DataError(
                f"the data file {path} cannot be read ({exc.strerror or exc}); check its permissions."
            ) from None


# --------------------------------------------------------------------------- token stream


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


def _first_at_least(tokens: np.ndarray, value: int) -> int | None:
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
    """Encode every document of ``source`` and concatenate them, each followed by ``eos_id``.

    The stream is cached under ``cache_dir/tokens/`` as ``KEY.bin`` (uint16 when the
    tokenizer's vocabulary fits, else uint32), ``KEY.docs.npy`` (document offsets) and
    ``KEY.json`` (metadata, written last), keyed by the source files (paths, sizes,
    mtimes), the jsonl field / parquet column, the tokenizer's hash and ``eos_id``; each
    file is written atomically, so an interrupted run leaves no half-written entry.

    Args:
        source: a text source (not "bin").
        tokenizer: a ``tokenizers.Tokenizer``; documents are encoded in batches with
            ``encode_batch_fast`` (or ``encode_batch``), ``add_special_tokens=False``.
        eos_id: the id appended after each document.
        cache_dir: default :func:`~dsv3.train.tokenizer.default_cache_dir`.
        parse_special_tokens: when False (default) text such as "<|eos|>" inside a
            document is encoded as plain text, so documents cannot inject special tokens.
    """
    from tokenizers import Tokenizer

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
    dtype = _dtype_for_vocab(tokenizer.get_vocab_size())

    hit = _read_cache(bin_path, docs_path, meta_path, dtype)
    if hit is not None:
        return hit

    start = time.perf_counter()
    tok = Tokenizer.from_str(tokenizer.to_str())  # a private copy whose flag we may set
    tok.encode_special_tokens = not parse_special_tokens
    doc_lengths: list[int] = []
    n_tokens, max_token = 0, -1
    try:
        root.mkdir(parents=True, exist_ok=True)
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
        doc_starts = np.zeros(len(doc_lengths) + 1, dtype=np.int64)
        np.cumsum(doc_lengths, out=doc_starts[1:])
        with atomic_path(docs_path) as tmp, open(tmp, "wb") as fh:
            np.save(fh, doc_starts)
        seconds = time.perf_counter() - start
        meta = {
            "version": _CACHE_VERSION,
            "source": source.describe(),
            "dtype": dtype.name,
            "num_tokens": n_tokens,
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


# --------------------------------------------------------------------------- split and packing


class TokenView:
    """A read-only concatenation of token ranges ``[start, end)`` of a stream, without copying.

    Args:
        tokens: [N] token array (a memmap).
        segments: the ranges, in order; adjacent ranges are merged.
    """

    def __init__(self, tokens: np.ndarray, segments: Sequence[tuple[int, int]]):
        merged: list[list[int]] = []
        for s, e in segments:
            if e <= s:
                continue
            if merged and merged[-1][1] == s:
                merged[-1][1] = e
            else:
                merged.append([s, e])
        self.tokens = tokens
        self.segments = [(s, e) for s, e in merged]
        lengths = np.array([e - s for s, e in self.segments], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # virtual start of each segment

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the view as a new int64 array."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"range [{start}, {start + length}) outside a view of {len(self)} tokens")
        out = np.empty(length, dtype=np.int64)
        seg = int(np.searchsorted(self._offsets, start, side="right")) - 1
        filled = 0
        while filled < length:
            s, e = self.segments[seg]
            pos = s + (start + filled - int(self._offsets[seg]))
            take = min(length - filled, e - pos)
            out[filled : filled + take] = self.tokens[pos : pos + take]
            filled += take
            seg += 1
        return out


def split_stream(
    stream: TokenStream, *, seq_len: int, val_fraction: float = 0.01, split_seed: int = 0
) -> tuple[TokenView, TokenView | None]:
    """Hold out validation data that never overlaps the training data.

    Whole documents are held out: documents are visited in a fixed pseudo-random order
    (from ``split_seed``, independent of the training seed) and taken while they fit,
    until they hold at least ``val_fraction`` of the tokens and at least one sequence
    (``seq_len + 1`` tokens). Without document boundaries (a .bin), or when the documents
    are too large to split that way, the last tokens of the stream are held out instead.

    Args:
        stream: the token stream.
        seq_len: T.
        val_fraction: the fraction of tokens to hold out, in [0, 0.5]; 0 means no validation.
        split_seed: which documents are held out.

    Returns:
        (train, val) views; val is None when ``val_fraction`` is 0.
    """
    if not 0.0 <= val_fraction <= 0.5:
        raise ConfigError(
            f"the validation fraction must be between 0 and 0.5, got {val_fraction}; change --val-fraction."
        )
    n = len(stream)
    need = max(math.ceil(val_fraction * n), seq_len + 1) if val_fraction > 0 else 0
    if n - need < seq_len + 1:
        what = f" plus {need} held out for validation" if need else ""
        raise DataError(
            f"the data has {n} tokens but one training sequence of seq_len {seq_len} needs {seq_len + 1}{what}; "
            "give more data or a smaller --seq-len."
        )
    if need == 0:
        return TokenView(stream.tokens, [(0, n)]), None
    starts = stream.doc_starts
    if starts is not None and len(starts) > 2:
        lengths = np.diff(starts)
        cap = 2 * need  # skip documents that would overshoot the target by too much
        chosen: list[int] = []
        total = 0
        for d in np.random.default_rng(split_seed).permutation(len(lengths)):
            if total + lengths[d] <= cap:
                chosen.append(int(d))
                total += int(lengths[d])
                if total >= need:
                    break
        if total >= need and n - total >= seq_len + 1:
            chosen.sort()
            val = [(int(starts[d]), int(starts[d + 1])) for d in chosen]
            train, prev = [], 0
            for s, e in val:
                train.append((prev, s))
                prev = e
            train.append((prev, n))
            return TokenView(stream.tokens, train), TokenView(stream.tokens, val)
    return TokenView(stream.tokens, [(0, n - need)]), TokenView(stream.tokens, [(n - need, n)])


class PackedDataset:
    """Fixed-length training sequences cut from a token view.

    Sequence i is ``view[i*T : i*T + T + 1]`` (T + 1 tokens; consecutive sequences share
    one token), so ``len = (len(view) - 1) // T`` and every token but the first is a
    label once. The tail that does not fill a sequence is not used.

    Args:
        view: the tokens (a :class:`TokenView`).
        seq_len: T.
    """

    def __init__(self, view: TokenView, seq_len: int):
        if seq_len < 1:
            raise ConfigError(f"seq_len must be at least 1, got {seq_len}; change --seq-len.")
        self.view = view
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max(0, (len(self.view) - 1) // self.seq_len)

    @property
    def num_tokens(self) -> int:
        """Label tokens in one epoch: len(self) * T."""
        return len(self) * self.seq_len

    def __getitem__(self, i: int) -> np.ndarray:
        """Sequence i: [T + 1] int64."""
        if not 0 <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {len(self)} sequences")
        return self.view.read(i * self.seq_len, self.seq_len + 1)

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequences at ``indices`` as ``(input_ids, labels)``, both [B, T] int64.

        ``labels[b, t] = input_ids[b, t + 1]`` for t < T - 1: the next token.
        """
        rows = np.stack([self[int(i)] for i in indices]) if len(indices) else np.zeros((0, self.seq_len + 1), np.int64)
        return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())


class TrainLoader:
    """Training batches in a deterministic order with an exact, resumable position.

    Epoch e visits the sequences in the order ``numpy.random.default_rng([seed, e])
    .permutation(len(dataset))``. ``next_batch(B)`` takes the next B sequences of that
    order, continuing into the next epoch when the current one runs out, so any sequence
    of batch sizes sees the same sequence order. ``state_dict()`` is the position
    (epoch, index within the epoch) and a fingerprint of the data; ``load_state_dict``
    puts the loader back there, so the next batch equals the next batch of a loader that
    was never interrupted.

    Data parallelism (:meth:`shard`): :meth:`next_batches` hands data-parallel rank ``r`` of ``dp``
    only micro-batches ``r, r + dp, r + 2 dp, ...`` of each global batch and reads nothing else; the
    position still advances over the whole global batch, so the order, the position (and a
    checkpoint's ``state_dict``) are those of one process, for any ``dp``.

    Args:
        dataset: the training sequences.
        seed: a non-negative integer.
        data_id: a fingerprint of the data, checked on ``load_state_dict``.
    """

    dp: int = 1  # data-parallel ranks sharing each global batch (see shard)
    dp_rank: int = 0

    def __init__(self, dataset: PackedDataset, *, seed: int, data_id: str = ""):
        if not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"the data seed must be a non-negative integer, got {seed!r}; change --seed.")
        if len(dataset) == 0:
            raise DataError("the training data holds no complete sequence; give more data or a smaller --seq-len.")
        self.dataset = dataset
        self.seed = seed
        self.data_id = data_id
        self.epoch = 0
        self.index = 0
        self._perm: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of the sequences in ``epoch``: [len(dataset)] int64."""
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset)))
        return self._perm[1]

    def next_indices(self, batch_size: int) -> np.ndarray:
        """Advance by ``batch_size`` sequences and return their indices."""
        if batch_size < 1:
            raise ConfigError(f"the batch size must be at least 1, got {batch_size}; change the batch size.")
        n = len(self.dataset)
        out = []
        remaining = batch_size
        while remaining:
            take = min(remaining, n - self.index)
            out.append(self.permutation(self.epoch)[self.index : self.index + take])
            self.index += take
            remaining -= take
            if self.index == n:
                self.epoch, self.index = self.epoch + 1, 0
        return np.concatenate(out)

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``(input_ids, labels)``, both [batch_size, T] int64."""
        return self.dataset.batch(self.next_indices(batch_size))

    def shard(self, dp: int, rank: int) -> "TrainLoader":
        """Make :meth:`next_batches` hand out only data-parallel rank ``rank``'s micro-batches (of ``dp``)."""
        if not (isinstance(dp, int) and dp >= 1 and isinstance(rank, int) and 0 <= rank < dp):
            raise ConfigError(f"data-parallel rank {rank!r} of {dp!r} ranks is not a valid rank; check --dp.")
        self.dp, self.dp_rank = dp, rank
        return self

    def next_batches(self, n_micro: int, micro_batch: int) -> list:
        """This rank's micro-batches of the next global batch of ``n_micro`` micro-batches of ``micro_batch``
        sequences: micro-batch ``k`` (in the order of one process) goes to data-parallel rank ``k % dp``.

        Every rank advances over all ``n_micro * micro_batch`` sequences (only its own are read), so the
        position after the call is the same on every rank and equals one process's.
        """
        if n_micro % self.dp:
            raise ConfigError(
                f"{n_micro} micro-batches cannot be split over {self.dp} data-parallel ranks; make "
                f"every step's batch a multiple of micro_batch * dp"
            )
        out = []
        for k in range(n_micro):
            indices = self.next_indices(micro_batch)
            if k % self.dp == self.dp_rank:
                out.append(self.dataset.batch(indices))
        return out

    @property
    def sequences_seen(self) -> int:
        """Sequences handed out since the start of epoch 0."""
        return self.epoch * len(self.dataset) + self.index

    def state_dict(self) -> dict[str, Any]:
        """The position, JSON-serialisable: epoch, index, seed, num_sequences, seq_len, data_id."""
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "num_sequences": len(self.dataset),
            "seq_len": self.dataset.seq_len,
            "data_id": self.data_id,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position saved by :meth:`state_dict` of a loader over the same data."""
        try:
            epoch, index = int(state["epoch"]), int(state["index"])
            saved = (int(state["num_sequences"]), int(state["seq_len"]), str(state["data_id"]), int(state["seed"]))
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                "the saved data-loader state is malformed; resume from an intact checkpoint of this run."
            ) from None
        now = (len(self.dataset), self.dataset.seq_len, self.data_id, self.seed)
        if saved != now:
            names = ("number of sequences", "seq_len", "data fingerprint", "seed")
            diff = next(name for name, a, b in zip(names, saved, now) if a != b)
            raise DataError(
                f"the run was saved with different data (its {diff} differs); "
                "resume with the same --data, tokenizer, --seq-len and --seed."
            )
        if epoch < 0 or not 0 <= index < len(self.dataset):
            raise CheckpointError(
                "the saved data-loader position is out of range; resume from an intact checkpoint of this run."
            )
        self.epoch, self.index = epoch, index


def val_batches(
    dataset: PackedDataset, batch_size: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Validation batches ``(input_ids, labels)`` [B, T] in a fixed order.

    All held-out sequences in index order, or, with ``max_batches``, that many batches
    of sequences spread evenly over the held-out set (the same ones every call). The
    last batch may be smaller than ``batch_size``; weight batch losses by their size.
    """
    if batch_size < 1:
        raise ConfigError(f"the validation batch size must be at least 1, got {batch_size}; change it.")
    n = len(dataset)
    indices = np.arange(n)
    if max_batches is not None and max_batches * batch_size < n:
        indices = np.unique(np.linspace(0, n - 1, max_batches * batch_size).round().astype(np.int64))
    for i in range(0, len(indices), batch_size):
        yield dataset.batch(indices[i : i + batch_size])


# --------------------------------------------------------------------------- all together


def _data_fingerprint(stream: TokenStream, train: TokenView, val: TokenView | None) -> str:
    """Identity of the token content and split: length, segments and 64 sampled 4k-token windows."""
    h = hashlib.sha256()
    n = len(stream)
    h.update(json.dumps([n, train.segments, val.segments if val else None]).encode())
    for start in np.linspace(0, max(0, n - 4096), 64).astype(np.int64):
        h.update(np.ascontiguousarray(stream.tokens[start : start + 4096]).tobytes())
    return h.hexdigest()[:16]


@dataclass
class TrainingData:
    """Everything the training loop needs from the data.

    Attributes:
        source: where the documents came from.
        stream: the full token stream.
        train: the training sequences.
        val: the held-out sequences (None without validation).
        eos_id: the document separator id (None for a .bin read without a tokenizer).
        data_id: fingerprint of the tokens and split, saved with the loader position.
    """

    source: DataSource
    stream: TokenStream
    train: PackedDataset
    val: PackedDataset | None
    eos_id: int | None
    data_id: str
    seq_len: int = dc_field(init=False)

    def __post_init__(self) -> None:
        self.seq_len = self.train.seq_len

    def loader(self, seed: int) -> TrainLoader:
        """A :class:`TrainLoader` over the training sequences."""
        return TrainLoader(self.train, seed=seed, data_id=self.data_id)

    def val_batches(
        self, batch_size: int, max_batches: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """See :func:`val_batches`; empty without validation data."""
        return val_batches(self.val, batch_size, max_batches) if self.val is not None else iter(())

    def summary(self) -> str:
        """One line for the log, e.g. ``data: ... 3.5M tokens (train 3.4M, val 35k) ...``."""
        s = self.stream
        docs = f"{len(s.doc_starts) - 1} documents, " if s.doc_starts is not None else ""
        val = f", val {_human(self.val.num_tokens)}" if self.val is not None else ", no validation"
        how = "cached" if s.cached else f"tokenised in {s.seconds:.1f}s"
        return (
            f"data: {self.source.describe()}: {docs}{_human(len(s))} tokens "
            f"(train {_human(self.train.num_tokens)} in {len(self.train)} sequences of {self.seq_len}{val}), {how}"
        )


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.{1 if n < 100 * scale else 0}f}{unit}"
    return str(n)


def build_data(
    data: str | os.PathLike | None = None,
    *,
    tokenizer=None,
    seq_len: int,
    vocab_size: int,
    format: str | None = None,
    field: str = "text",
    glob: str | Sequence[str] | None = None,
    dtype: str | None = None,
    eos_token: str | None = None,
    val_fraction: float = 0.01,
    split_seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    parse_special_tokens: bool = False,
) -> TrainingData:
    """Read, tokenise (cached), check, split and pack the training data.

    Args:
        data: a text file, a directory, a .jsonl, a .parquet or a pre-tokenised .bin;
            None for the Python standard library corpus.
        tokenizer: a ``tokenizers.Tokenizer`` (required unless ``data`` is a .bin).
        seq_len: T, tokens per training sequence.
        vocab_size: the model's V; a token id >= V is an error.
        format, field, glob, dtype: see :func:`resolve_source`.
        eos_token: the document separator's text; default: found by
            :func:`~dsv3.train.tokenizer.eos_token_id`.
        val_fraction, split_seed: see :func:`split_stream`.
        cache_dir: where token streams are cached; default ``$DSV3_CACHE`` or ``~/.cache/dsv3``.
        parse_special_tokens: see :func:`tokenize_corpus`.
    """
    if seq_len < 1:
        raise ConfigError(f"seq_len must be at least 1, got {seq_len}; change --seq-len.")
    source = resolve_source(data, format=format, field=field, glob=glob, dtype=dtype, vocab_size=vocab_size)
    if source.kind == "bin":
        stream = load_bin(source)
        eos_id = None  # the file already holds its separators; the id is only reported
        if tokenizer is not None:
            try:
                eos_id = eos_token_id(tokenizer, eos_token)
            except DataError:
                if eos_token is not None:
                    raise
        pos = _first_at_least(stream.tokens, vocab_size)
        where = f"{source.path} holds token id {int(stream.tokens[pos]) if pos is not None else 0} at position {pos}"
        fix = "check --data-dtype or use a model with a larger vocab_size"
    else:
        if tokenizer is None:
            raise DataError(
                f"{source.describe()} is text and needs a tokenizer; pass a tokenizer.json or use the default one."
            )
        eos_id = eos_token_id(tokenizer, eos_token)
        stream = tokenize_corpus(
            source, tokenizer, eos_id=eos_id, cache_dir=cache_dir, parse_special_tokens=parse_special_tokens
        )
        where = f"the tokenizer produces token id {stream.max_token} on {source.describe()}"
        fix = "use a tokenizer whose vocabulary fits the model or a model with a larger vocab_size"
    if stream.max_token >= vocab_size:
        raise DataError(f"{where}, outside the model's vocabulary of {vocab_size}; {fix}.")
    if eos_id is not None and eos_id >= vocab_size:
        raise DataError(
            f"the end-of-sequence id {eos_id} is outside the model's vocabulary of {vocab_size}; "
            "use a tokenizer whose vocabulary fits the model."
        )
    train_view, val_view = split_stream(stream, seq_len=seq_len, val_fraction=val_fraction, split_seed=split_seed)
    train = PackedDataset(train_view, seq_len)
    val = PackedDataset(val_view, seq_len) if val_view is not None else None
    return TrainingData(source, stream, train, val, eos_id, _data_fingerprint(stream, train_view, val_view))
