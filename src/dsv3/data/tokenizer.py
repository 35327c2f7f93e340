"""Tokenizers for training: a byte-level BPE trained on the Python standard library, or any HF one.

The embedded default corpus is the source of the running interpreter's standard
library (its ``.py`` files, tests excluded): a real, sizeable (~12 MB) text
corpus that exists on every machine with Python. :func:`get_tokenizer` trains a
byte-level BPE tokenizer on it once with Hugging Face ``tokenizers`` and caches
the result; any Hugging Face ``tokenizer.json`` can be given instead.

Byte-level means the pre-tokenizer maps every UTF-8 byte to a visible
character before BPE (GPT-2 style) and the decoder maps it back, so every
string round-trips exactly through ``encode``/``decode``. The special tokens get
fixed ids that match the presets (``bos_token_id=0``, ``eos_token_id=1``)::

    <|bos|> = 0    <|eos|> = 1    <|pad|> = 2
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dsv3.data.sources import CorpusSpec, files_fingerprint, iter_documents, resolve_source, stdlib_corpus_files
from dsv3.errors import DataError
from dsv3.utils.io import atomic_path

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)

# End-of-sequence spellings of common tokenizers, tried in this order by eos_token_id().
COMMON_EOS_TOKENS: tuple[str, ...] = (
    EOS_TOKEN,
    "<｜end▁of▁sentence｜>",  # DeepSeek-V2/V3/R1
    "<|endoftext|>",  # GPT-2, Qwen, Phi
    "<|end_of_text|>",  # Llama 3
    "</s>",  # Llama 2, Mistral, T5
    "<eos>",  # Gemma
    "<|eot_id|>",
    "[EOS]",
)

# Bump when the training procedure changes, so old cache entries are not reused.
_BPE_RECIPE_VERSION = 1
# A tokenizer trained on a user's corpus reads at most this many characters of it (its start).
_BPE_MAX_CHARS = 1 << 27


def default_cache_dir() -> Path:
    """The dsv3 cache directory: ``$DSV3_CACHE`` if set, else ``~/.cache/dsv3``."""
    env = os.environ.get("DSV3_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dsv3"


def _read_documents(files: Sequence[str | os.PathLike]) -> Iterator[str]:
    for f in files:
        try:
            with open(f, encoding="utf-8", newline="") as fh:  # newline="": keep "\r\n" as is
                yield fh.read()
        except FileNotFoundError:
            raise DataError(f"the corpus file {f} does not exist; check the path.") from None
        except UnicodeDecodeError:
            raise DataError(f"the corpus file {f} is not UTF-8 text; convert it or leave it out.") from None


def _check_vocab_size(vocab_size: int, special_tokens: Sequence[str]) -> None:
    """V holds the special tokens and the 256 byte symbols, else one sentence."""
    n_fixed = len(special_tokens) + 256
    if vocab_size < n_fixed:
        raise DataError(
            f"a byte-level BPE vocabulary needs at least {n_fixed} entries but vocab_size is {vocab_size}; "
            "use a model with a larger vocab_size."
        )


def train_bpe_tokenizer(
    files: Sequence[str | os.PathLike],
    vocab_size: int,
    *,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on the given UTF-8 text files (one document per file).

    The result is deterministic for the same files and arguments. ``special_tokens[i]``
    gets id ``i``; the 256 byte symbols follow, then the learned merges, up to
    ``vocab_size`` entries in total (fewer when the corpus has no more pairs that occur
    ``min_frequency`` times). Special tokens are not added to encodings automatically.

    Args:
        files: UTF-8 text files to learn merges from.
        vocab_size: V, the largest vocabulary to build (special tokens and bytes included).
        special_tokens: tokens with fixed ids 0..len-1 (default ``<|bos|>``, ``<|eos|>``, ``<|pad|>``).
        min_frequency: a pair must occur this many times to be merged.
    """
    _check_vocab_size(vocab_size, special_tokens)
    if not files:
        raise DataError("the tokenizer training corpus has no files; give a corpus with at least one text file.")
    return train_bpe_from_texts(
        _read_documents(files),
        vocab_size,
        special_tokens=special_tokens,
        min_frequency=min_frequency,
        length=len(files),
    )


def train_bpe_from_texts(
    texts: Iterable[str],
    vocab_size: int,
    *,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    min_frequency: int = 2,
    length: int | None = None,
    max_chars: int | None = None,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on an iterable of texts (see :func:`train_bpe_tokenizer`).

    Args:
        texts: the documents (or pieces of documents) to learn merges from.
        vocab_size: V, the largest vocabulary to build.
        special_tokens, min_frequency: see :func:`train_bpe_tokenizer`.
        length: the number of texts, if known (only for the trainer's bookkeeping).
        max_chars: stop reading after about this many characters (a large corpus is
            sampled from its start; merges converge long before 100M characters).
    """
    _check_vocab_size(vocab_size, special_tokens)
    if max_chars is not None:
        texts = _take_chars(texts, max_chars)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    for i, t in enumerate(special_tokens):
        assert tok.token_to_id(t) == i, f"special token {t!r} did not get id {i}"
    return tok


def _take_chars(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    seen = 0
    for text in texts:
        if seen >= max_chars:
            return
        seen += len(text)
        yield text


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    """SHA-256 (hex) of the tokenizer's canonical JSON: equal hashes mean identical tokenisation."""
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a Hugging Face tokenizer.

    Args:
        path: a ``tokenizer.json``; or a directory holding one (a Hugging Face
            checkpoint, a dsv3 run or checkpoint directory); or a directory with a
            GPT-2-style byte-level BPE as ``vocab.json`` + ``merges.txt``.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(
            f"the tokenizer path {p} does not exist; pass a tokenizer.json or a Hugging Face "
            "checkpoint directory with --tokenizer."
        )
    if p.is_dir():
        if not (p / "tokenizer.json").is_file() and (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
            return _load_vocab_merges(p)
        if not (p / "tokenizer.json").is_file():
            raise DataError(
                f"the directory {p} holds no tokenizer.json (nor vocab.json + merges.txt); pass a "
                "tokenizer.json or a Hugging Face checkpoint directory with --tokenizer."
            )
        p = p / "tokenizer.json"
    if not p.is_file():
        raise DataError(f"the tokenizer path {p} is not a file; pass the path of a Hugging Face tokenizer.json.")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as exc:  # tokenizers raises a bare Exception for malformed files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"the tokenizer file {p} cannot be read ({reason}); pass a valid Hugging Face tokenizer.json."
        ) from None


def _load_vocab_merges(directory: Path) -> Tokenizer:
    """A byte-level BPE from ``vocab.json`` + ``merges.txt`` (GPT-2 / RoBERTa checkpoints)."""
    try:
        model = models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt"))
    except Exception as exc:  # tokenizers raises a bare Exception for malformed files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"the vocab.json/merges.txt in {directory} cannot be read ({reason}); pass a valid tokenizer.json."
        ) from None
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def get_tokenizer(
    spec: str | os.PathLike | None = None,
    *,
    vocab_size: int,
    cache_dir: str | os.PathLike | None = None,
    files: Sequence[str | os.PathLike] | None = None,
    source=None,
) -> Tokenizer:
    """The tokenizer for a run.

    Args:
        spec: a Hugging Face ``tokenizer.json``, or a directory holding one (see
            :func:`load_tokenizer`), used as is; None trains a byte-level BPE on ``source``
            (or ``files``; default: the stdlib corpus), cached under ``cache_dir/tokenizers/``
            keyed by the corpus (kind, field, file paths, sizes, mtimes), ``vocab_size``
            and the ``tokenizers`` version.
        vocab_size: V for a trained tokenizer (the model's vocab_size); unused with ``spec``.
        cache_dir: default :func:`default_cache_dir`.
        files: plain-text files to train on (one document per file) when ``spec`` is None.
        source: a :class:`~dsv3.data.sources.DataSource` of any text kind (a text file, a
            directory, .jsonl, .parquet) to train on; takes precedence over ``files``.
    """
    if spec is not None:
        return load_tokenizer(spec)
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
        raise DataError(f"the tokenizer's vocab_size must be a positive integer, got {vocab_size!r}.")
    if source is not None:
        if source.kind == "bin":
            raise DataError(f"{source.path} is already tokenised; no tokenizer can be trained on it.")
        corpus_files = list(source.files)
        kind, field = source.kind, source.field if source.kind in ("jsonl", "parquet", "dir") else None
    else:
        corpus_files = stdlib_corpus_files() if files is None else [Path(f) for f in files]
        kind, field = "files", None
    if not corpus_files:
        raise DataError("the tokenizer training corpus has no files; give a corpus with at least one text file.")
    try:
        fingerprint = files_fingerprint(corpus_files)
    except FileNotFoundError as exc:
        raise DataError(f"the corpus file {exc.filename} does not exist; check the path.") from None
    key = {
        "recipe": _BPE_RECIPE_VERSION,
        "tokenizers": tokenizers.__version__,
        "vocab_size": vocab_size,
        "special_tokens": list(SPECIAL_TOKENS),
        "files": fingerprint,
    }
    if kind != "files":  # a plain file list keeps its old cache key
        key.update(kind=kind, field=field, max_chars=_BPE_MAX_CHARS)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    root = Path(cache_dir if cache_dir is not None else default_cache_dir())
    path = root / "tokenizers" / f"bpe-v{vocab_size}-{digest}.json"
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception:
            pass  # a corrupt cache entry (should not happen: writes are atomic): retrain below
    if source is not None:
        texts = (text for text, _ in iter_documents(source))
        tok = train_bpe_from_texts(texts, vocab_size, max_chars=_BPE_MAX_CHARS)
        if tok.get_vocab_size() <= len(SPECIAL_TOKENS):
            raise DataError(f"{source.describe()} holds no text to train a tokenizer on; give data with some text.")
    else:
        tok = train_bpe_tokenizer(corpus_files, vocab_size)
    try:
        with atomic_path(path) as tmp:
            tok.save(tmp)
    except OSError as exc:
        raise DataError(
            f"cannot write the tokenizer cache {path} ({exc.strerror}); set DSV3_CACHE to a writable directory."
        ) from None
    return tok


def tokenizer_for_data(
    corpus: CorpusSpec,
    *,
    tokenizer: str | os.PathLike | None = None,
    vocab_size: int,
    cache_dir: str | os.PathLike | None = None,
) -> Tokenizer | None:
    """The tokenizer a run over ``corpus`` uses (what ``dsv3 train`` does without a saved one).

    ``tokenizer`` given: that one (:func:`load_tokenizer`). Otherwise a byte-level BPE
    trained (and cached) on the corpus itself, whatever its kind: a text file, a directory
    of text files, a .jsonl or a .parquet; no path: the stdlib corpus. A pre-tokenised
    .bin needs no tokenizer: None.
    """
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    if corpus.path is None:
        return get_tokenizer(None, vocab_size=vocab_size, cache_dir=cache_dir)
    source = resolve_source(corpus, vocab_size=vocab_size)
    if source.kind == "bin":
        return None  # pre-tokenised: no tokenizer needed (no text sample at the end)
    return get_tokenizer(None, vocab_size=vocab_size, cache_dir=cache_dir, source=source)


def eos_token_id(tokenizer: Tokenizer, eos_token: str | None = None) -> int:
    """The id of the end-of-sequence token that separates documents.

    Args:
        tokenizer: any ``tokenizers.Tokenizer``.
        eos_token: the token's text; default: the first of :data:`COMMON_EOS_TOKENS` in the vocabulary.
    """
    if eos_token is not None:
        idx = tokenizer.token_to_id(eos_token)
        if idx is None:
            raise DataError(f"the tokenizer has no token {eos_token!r}; pass an --eos-token that is in its vocabulary.")
        return idx
    for t in COMMON_EOS_TOKENS:
        idx = tokenizer.token_to_id(t)
        if idx is not None:
            return idx
    raise DataError(
        "the tokenizer has no known end-of-sequence token; pass the token that ends a document with --eos-token."
    )
