"""Pre-training data: a corpus -> one cached token stream -> held-out split -> packed sequences.

``build_data`` puts :mod:`~dsv3.data.sources`, :mod:`~dsv3.data.tokens` and
:mod:`~dsv3.data.packing` together for the training loop and checks the result against the
model (every id below V, at least one training sequence); the returned :class:`TrainingData`
hands out a :class:`~dsv3.data.loader.TrainLoader` and validation batches. Its ``data_id``
fingerprints the tokens and the split and is saved with the loader position, so a resume on
other data is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field as dc_field

import numpy as np
import torch

from dsv3.data.loader import TrainLoader, val_batches
from dsv3.data.packing import PackedDataset, TokenView, split_stream
from dsv3.data.sources import CorpusSpec, DataSource, resolve_source
from dsv3.data.tokenizer import eos_token_id
from dsv3.data.tokens import TokenStream, first_at_least, load_bin, tokenize_corpus
from dsv3.errors import ConfigError, DataError


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
        """See :func:`~dsv3.data.loader.val_batches`; empty without validation data."""
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
    corpus: CorpusSpec,
    *,
    tokenizer=None,
    seq_len: int,
    vocab_size: int,
    eos_token: str | None = None,
    val_fraction: float = 0.01,
    split_seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    parse_special_tokens: bool = False,
) -> TrainingData:
    """Read, tokenise (cached), check, split and pack the training data.

    Args:
        corpus: the documents (:class:`~dsv3.data.sources.CorpusSpec`; ``CorpusSpec()`` is the
            Python standard library).
        tokenizer: a ``tokenizers.Tokenizer`` (required unless the corpus is a .bin).
        seq_len: T, tokens per training sequence.
        vocab_size: the model's V; a token id >= V is an error.
        eos_token: the document separator's text; default: found by
            :func:`~dsv3.data.tokenizer.eos_token_id`.
        val_fraction, split_seed: see :func:`~dsv3.data.packing.split_stream`.
        cache_dir: where token streams are cached; default ``$DSV3_CACHE`` or ``~/.cache/dsv3``.
        parse_special_tokens: see :func:`~dsv3.data.tokens.tokenize_corpus`.
    """
    if seq_len < 1:
        raise ConfigError(f"seq_len must be at least 1, got {seq_len}; change --seq-len.")
    source = resolve_source(corpus, vocab_size=vocab_size)
    if source.kind == "bin":
        stream, eos_id = _read_bin(source, tokenizer, eos_token, vocab_size)
    else:
        stream, eos_id = _tokenize(source, tokenizer, eos_token, vocab_size, cache_dir, parse_special_tokens)
    train_view, val_view = split_stream(stream, seq_len=seq_len, val_fraction=val_fraction, split_seed=split_seed)
    train = PackedDataset(train_view, seq_len)
    val = PackedDataset(val_view, seq_len) if val_view is not None else None
    return TrainingData(source, stream, train, val, eos_id, _data_fingerprint(stream, train_view, val_view))


def _read_bin(source: DataSource, tokenizer, eos_token: str | None, vocab_size: int) -> tuple[TokenStream, int | None]:
    """A pre-tokenised .bin, checked to hold only ids below ``vocab_size``, and the tokenizer's EOS id if it
    has one (the file already holds its separators; the id is only reported)."""
    stream = load_bin(source)
    eos_id = None
    if tokenizer is not None:
        try:
            eos_id = eos_token_id(tokenizer, eos_token)
        except DataError:
            if eos_token is not None:
                raise
    if stream.max_token >= vocab_size:
        pos = first_at_least(stream.tokens, vocab_size)
        raise DataError(
            f"{source.path} holds token id {int(stream.tokens[pos]) if pos is not None else 0} at position {pos}, "
            f"outside the model's vocabulary of {vocab_size}; check --data-dtype or use a model with a larger "
            "vocab_size."
        )
    _check_eos(eos_id, vocab_size)
    return stream, eos_id


def _tokenize(
    source: DataSource, tokenizer, eos_token: str | None, vocab_size: int, cache_dir, parse_special_tokens: bool
) -> tuple[TokenStream, int]:
    """The token stream of a text source (cached), checked to hold only ids below ``vocab_size``, and its EOS id."""
    if tokenizer is None:
        raise DataError(
            f"{source.describe()} is text and needs a tokenizer; pass a tokenizer.json or use the default one."
        )
    eos_id = eos_token_id(tokenizer, eos_token)
    stream = tokenize_corpus(
        source, tokenizer, eos_id=eos_id, cache_dir=cache_dir, parse_special_tokens=parse_special_tokens
    )
    if stream.max_token >= vocab_size:
        raise DataError(
            f"the tokenizer produces token id {stream.max_token} on {source.describe()}, outside the model's "
            f"vocabulary of {vocab_size}; use a tokenizer whose vocabulary fits the model or a model with a "
            "larger vocab_size."
        )
    _check_eos(eos_id, vocab_size)
    return stream, eos_id


def _check_eos(eos_id: int | None, vocab_size: int) -> None:
    if eos_id is not None and eos_id >= vocab_size:
        raise DataError(
            f"the end-of-sequence id {eos_id} is outside the model's vocabulary of {vocab_size}; "
            "use a tokenizer whose vocabulary fits the model."
        )
