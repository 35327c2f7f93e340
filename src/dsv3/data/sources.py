"""Documents: where they come from and how they are read (used by the tokenizer and the data alike).

``CorpusSpec`` is what a user asks for (the five ``--data*`` options as one frozen value);
``resolve_source`` checks it and returns a ``DataSource`` (the files to read, in order);
``iter_documents`` yields each document's text. Sources: a text file, a directory of text
files (by pattern, recursively), .jsonl (a field), .parquet (a column), a pre-tokenised .bin
(read by :mod:`dsv3.data.tokens`), or the embedded default, the running interpreter's
standard library (``stdlib_corpus_files``). Bad input raises :class:`~dsv3.errors.DataError`
with one line.
"""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dsv3.errors import DataError
from dsv3.utils.io import json_lines

# File patterns a directory source reads by default: common text and source-code files.
DEFAULT_GLOBS: tuple[str, ...] = (
    "*.txt", "*.md", "*.rst", "*.tex", "*.html",
    "*.py", "*.c", "*.h", "*.cc", "*.cpp", "*.hpp", "*.cu", "*.rs", "*.go", "*.java", "*.js", "*.ts",
    "*.sh", "*.toml", "*.yaml", "*.yml",
)  # fmt: skip
FORMATS = ("text", "dir", "jsonl", "parquet", "bin", "stdlib")
_SUFFIX_FORMAT = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".bin": "bin"}
_TEXT_CHUNK_CHARS = 1 << 20  # a large text document is read and encoded in ~1M-character pieces
# Directory names (anywhere below the stdlib root) that hold tests, not library code.
_TEST_DIRS = frozenset({"test", "tests", "idle_test", "testing"})
# Directory names below the stdlib root that hold third-party code.
_THIRD_PARTY_DIRS = frozenset({"site-packages", "dist-packages"})


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id 0..vocab_size-1 fits in 16 bits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _skip_dir(name: str) -> bool:
    """True for a stdlib sub-directory that holds tests, third-party or generated files."""
    return name in _TEST_DIRS or name in _THIRD_PARTY_DIRS or name == "__pycache__" or name.startswith("config-")


def _is_test_module(name: str) -> bool:
    return name.startswith("test_") or name.endswith("_test.py") or name == "conftest.py"


def stdlib_corpus_files(root: str | os.PathLike | None = None) -> list[Path]:
    """The standard-library ``.py`` files of the running interpreter, sorted by path.

    Test packages and modules (``test/``, ``tests/``, ``idle_test/``, ``test_*.py``,
    ``*_test.py``), ``site-packages``, build-configuration scripts (``config-*/``) and
    files that are not valid UTF-8 are excluded.

    Args:
        root: the directory to scan; default ``sysconfig.get_paths()["stdlib"]``.
    """
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(f"the standard-library directory {root} does not exist; pass a corpus with --data instead.")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not _skip_dir(d)]  # prune: never descend into tests
        for name in filenames:
            if not name.endswith(".py") or _is_test_module(name):
                continue
            path = Path(dirpath, name)
            try:
                path.read_bytes().decode("utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            files.append(path)
    return sorted(files)


def files_fingerprint(files: Sequence[str | os.PathLike]) -> list[list]:
    """``[path, size, mtime_ns]`` of each file: a cheap identity of a corpus for cache keys."""
    out = []
    for f in files:
        st = os.stat(f)
        out.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
    return out


@dataclass(frozen=True)
class CorpusSpec:
    """The corpus a user asks for: one value instead of five loose keyword arguments.

    Attributes:
        path: a text file, a directory, a .jsonl, a .parquet or a pre-tokenised .bin (``--data``);
            None for the Python standard library.
        format: "text", "jsonl", "parquet" or "bin" to override the guess from the suffix
            (``.jsonl``/``.ndjson``, ``.parquet``, ``.bin``; anything else is text); never for a
            directory, whose files are read by their own suffix (``--data-format``).
        field: the jsonl field / parquet column holding the text (``--data-field``).
        glob: pattern(s) a directory's files must match, searched recursively; default
            DEFAULT_GLOBS. Hidden files and directories are skipped (``--data-glob``).
        dtype: "uint16" or "uint32" for a .bin; default from the model's vocab_size (uint16 when
            V <= 65536, as dsv3 writes them) (``--data-dtype``).
    """

    path: str | os.PathLike | None = None
    format: str | None = None
    field: str = "text"
    glob: str | tuple[str, ...] | None = None
    dtype: str | None = None

    def __post_init__(self) -> None:
        if self.glob is not None and not isinstance(self.glob, str):
            object.__setattr__(self, "glob", tuple(self.glob))  # a list from a caller stays hashable

    @classmethod
    def of(cls, options) -> CorpusSpec:
        """The corpus of a run's data options (anything with ``path``, ``format``, ``field``, ``glob``
        and ``dtype`` attributes: ``TrainConfig.data``)."""
        return cls(options.path, options.format, options.field, options.glob, options.dtype)


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


def resolve_source(corpus: CorpusSpec, *, vocab_size: int | None = None) -> DataSource:
    """Describe the documents of ``corpus``, checking that they exist.

    Args:
        corpus: what to read (see :class:`CorpusSpec`).
        vocab_size: the model's V, used to infer a .bin's dtype.
    """
    if corpus.format is not None and corpus.format not in ("text", "jsonl", "parquet", "bin"):
        raise DataError(f"unknown data format {corpus.format!r}; use one of text, jsonl, parquet, bin.")
    if corpus.path is None:
        return DataSource("stdlib", None, tuple(stdlib_corpus_files()), corpus.field)
    path = Path(corpus.path).expanduser()
    if not path.exists():
        raise DataError(f"the data path {path} does not exist; check the --data path.")
    if path.is_dir():
        return DataSource("dir", path, _directory_files(path, corpus), corpus.field)
    kind = corpus.format or _format_of(path)
    if kind != "bin":
        return DataSource(kind, path, (path,), corpus.field)
    return _bin_source(path, corpus, vocab_size)


def _directory_files(path: Path, corpus: CorpusSpec) -> tuple[Path, ...]:
    """The files of the directory ``path`` that match ``corpus.glob``, sorted; hidden ones skipped."""
    if corpus.format is not None:
        raise DataError(
            f"a data format cannot be forced for the directory {path}; its files are read by their suffix "
            "(.jsonl, .parquet, anything else as text), so drop --data-format."
        )
    glob = corpus.glob
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
        raise DataError(f"{bins[0]} is a pre-tokenised .bin inside a directory; give a .bin file on its own as --data.")
    return files


def _bin_source(path: Path, corpus: CorpusSpec, vocab_size: int | None) -> DataSource:
    """A pre-tokenised .bin, its dtype given or inferred from ``vocab_size`` and checked against its size."""
    dtype = corpus.dtype
    if dtype is None:
        dtype = dtype_for_vocab(vocab_size).name if vocab_size is not None else "uint16"
    if dtype not in ("uint16", "uint32"):
        raise DataError(f"unsupported token dtype {dtype!r} for {path}; use uint16 or uint32.")
    size = path.stat().st_size
    item = np.dtype(dtype).itemsize
    if size % item:
        raise DataError(
            f"the size of {path} ({size} bytes) is not a multiple of {item} bytes, so it is not a {dtype} "
            "token file; check the file or the --data-dtype."
        )
    return DataSource("bin", path, (path,), corpus.field, dtype)


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
        for lineno, record in json_lines(
            fh, lambda n, msg: f"line {n} of {path} is not valid JSON ({msg}); fix or remove that line."
        ):
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
