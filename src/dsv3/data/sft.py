"""Supervised fine-tuning data: a chat .jsonl -> rendered, masked, tokenised conversations -> packed rows.

``build_sft_data`` reads the conversations (:mod:`dsv3.data.chat`), renders them with the chat
template, marks the assistant tokens, checks each against the model (ids below V, length at
most T + 1), holds a seeded share out for validation and packs both parts
(:mod:`dsv3.data.packing`). Bad input never passes silently: a conversation without an
assistant turn or longer than T + 1 tokens is skipped and counted (``on_long="skip"``), cut
(``"truncate"``, long ones only) or refused with one line (``"error"``); malformed records and
a missing template are always refused with one line. :class:`SFTData` offers the interface of
:class:`~dsv3.data.pretrain.TrainingData`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import numpy as np

from dsv3.data.chat import (
    ChatTemplate,
    check_special_tokens,
    read_conversations,
    tokenize_conversation,
    undefined_message,
)
from dsv3.data.loader import TrainLoader, val_batches
from dsv3.data.packing import Conversation, PackedChatDataset, SFTBatch
from dsv3.errors import ConfigError, DataError

ON_LONG = ("skip", "truncate", "error")


@dataclass
class SFTStats:
    """What happened to the conversations of the file."""

    read: int = 0
    kept: int = 0
    no_assistant: int = 0
    too_long: int = 0
    truncated: int = 0

    def describe(self) -> str:
        parts = [f"{self.kept} of {self.read} conversations"]
        if self.no_assistant:
            parts.append(f"{self.no_assistant} skipped without an assistant turn")
        if self.too_long:
            parts.append(f"{self.too_long} skipped as longer than seq_len")
        if self.truncated:
            parts.append(f"{self.truncated} truncated to seq_len")
        return ", ".join(parts)


@dataclass
class SFTData:
    """Everything the training loop needs from chat data (the interface of
    :class:`~dsv3.data.pretrain.TrainingData`; batches are :class:`SFTBatch`).

    Attributes:
        path: the .jsonl file.
        template: the chat template used.
        train, val: the packed rows (val None without validation).
        eos_id: the end-of-turn token id (None when the template names none).
        data_id: fingerprint of the tokens, masks and packing, saved with the loader position.
        stats: counts of kept, skipped and truncated conversations.
    """

    path: Path
    template: ChatTemplate
    train: PackedChatDataset
    val: PackedChatDataset | None
    eos_id: int | None
    data_id: str
    stats: SFTStats
    seq_len: int = field(init=False)

    def __post_init__(self) -> None:
        self.seq_len = self.train.seq_len

    @property
    def packing(self) -> bool:
        return self.train.packing

    def loader(self, seed: int) -> TrainLoader:
        """A :class:`~dsv3.data.loader.TrainLoader` over the training rows (a permutation per epoch)."""
        return TrainLoader(self.train, seed=seed, data_id=self.data_id)

    def val_batches(self, batch_size: int, max_batches: int | None = None) -> Iterator[SFTBatch]:
        """Held-out rows in a fixed order (see :func:`~dsv3.data.loader.val_batches`)."""
        return val_batches(self.val, batch_size, max_batches) if self.val is not None else iter(())

    def steps_for_epochs(self, epochs: float, global_batch: int) -> int:
        """Optimizer steps that visit the training rows ``epochs`` times at ``global_batch`` rows a step."""
        if not epochs > 0:
            raise ConfigError(f"epochs must be positive, got {epochs}; change --epochs.")
        return max(1, math.ceil(epochs * len(self.train) / global_batch))

    def summary(self) -> str:
        """One line for the log."""
        t = self.train
        fill = t.used_positions / max(1, len(t) * t.seq_len)
        val = f", val {len(self.val)} rows" if self.val is not None else ", no validation"
        how = f"packed {fill:.0%} full" if t.packing else "one per row, padded"
        return (
            f"sft data: {self.path}: {self.stats.describe()}; train {len(t)} rows of {t.seq_len} ({how}), "
            f"{t.num_tokens} loss tokens an epoch{val}"
        )


def _fingerprint(conversations: Sequence[Conversation], train_idx, val_idx, seq_len: int, packing: bool) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([seq_len, packing, list(map(int, train_idx)), list(map(int, val_idx))]).encode())
    for c in conversations:
        h.update(c.ids.tobytes())
        h.update(np.packbits(c.mask).tobytes())
    return h.hexdigest()[:16]


def build_sft_data(
    data: str | os.PathLike,
    *,
    tokenizer,
    template: ChatTemplate,
    seq_len: int,
    vocab_size: int,
    on_long: str = "skip",
    packing: bool = True,
    val_fraction: float = 0.0,
    split_seed: int = 0,
    log=None,
) -> SFTData:
    """Read, render, tokenise, check, split and pack chat data.

    Args:
        data: a .jsonl file of conversations.
        tokenizer: the checkpoint's ``tokenizers.Tokenizer``.
        template: the chat template (:func:`~dsv3.data.chat.load_chat_template`).
        seq_len: T, positions per row; a conversation may have at most T + 1 tokens.
        vocab_size: the model's V; a token id >= V is an error.
        on_long: ``"skip"`` (count), ``"truncate"`` or ``"error"`` for conversations longer than
            T + 1 tokens; with ``"error"`` a conversation without an assistant turn is refused
            too, otherwise it is skipped and counted.
        packing: pack several conversations per row (document-masked) or one per row.
        val_fraction: share of the conversations held out for validation (0: none).
        split_seed: seed of the held-out choice.
        log: where a line about skipped conversations goes (default: nowhere; counts are in
            :meth:`SFTData.summary`).
    """
    if on_long not in ON_LONG:
        raise ConfigError(f"on_long must be one of {', '.join(ON_LONG)}, got {on_long!r}; change --on-long.")
    if seq_len < 1:
        raise ConfigError(f"seq_len must be at least 1, got {seq_len}; change --seq-len.")
    check_special_tokens(template)
    if not 0.0 <= val_fraction <= 0.5:
        raise ConfigError(f"the validation fraction must be between 0 and 0.5, got {val_fraction}; change it.")
    stats = SFTStats()
    conversations = _read_and_tokenize(data, tokenizer, template, seq_len, vocab_size, on_long, stats)
    if (stats.no_assistant or stats.too_long) and log is not None:
        log(f"sft data: {stats.describe()}")
    if not conversations:
        raise DataError(
            f"no usable conversation in {data} ({stats.describe()}); check the data, --seq-len and --on-long."
        )
    n_val = 0
    if val_fraction > 0 and len(conversations) >= 2:
        n_val = min(len(conversations) - 1, max(1, round(val_fraction * len(conversations))))
    perm = np.random.default_rng(split_seed).permutation(len(conversations))
    val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    eos_id = tokenizer.token_to_id(template.eos_token) if template.eos_token else None
    pad_id = eos_id if eos_id is not None else 0

    def rows(index) -> PackedChatDataset:
        return PackedChatDataset([conversations[i] for i in index], seq_len, pad_id=pad_id, packing=packing)

    fingerprint = _fingerprint(conversations, train_idx, val_idx, seq_len, packing)
    return SFTData(Path(data), template, rows(train_idx), rows(val_idx) if n_val else None, eos_id, fingerprint, stats)


def _read_and_tokenize(
    data, tokenizer, template: ChatTemplate, seq_len: int, vocab_size: int, on_long: str, stats: SFTStats
) -> list[Conversation]:
    """The usable conversations of ``data``, tokenised and masked; ``stats`` counts what was read, kept and
    skipped."""
    conversations: list[Conversation] = []
    for where, messages in read_conversations(data):
        stats.read += 1
        if not any(m["role"] == "assistant" for m in messages):
            if on_long == "error":
                raise DataError(
                    f"{where} has no assistant turn, so nothing to learn; remove it or pass "
                    "--on-long skip to skip such conversations."
                )
            stats.no_assistant += 1
            continue
        conv = _tokenize(messages, template, tokenizer, where)
        if conv.ids.size and int(conv.ids.max()) >= vocab_size:
            raise DataError(
                f"the tokenizer produces token id {int(conv.ids.max())} on {where}, outside the model's "
                f"vocabulary of {vocab_size}; use the checkpoint's own tokenizer."
            )
        conv = _fit(conv, where, seq_len, on_long, stats)
        if conv is not None:
            conversations.append(conv)
    stats.kept = len(conversations)
    return conversations


def _tokenize(messages: list[dict], template: ChatTemplate, tokenizer, where: str) -> Conversation:
    """:func:`~dsv3.data.chat.tokenize_conversation` with the template's refusals as one-line errors."""
    try:
        return tokenize_conversation(messages, template, tokenizer)
    except jinja2.UndefinedError as exc:
        raise DataError(undefined_message(exc, template, where)) from None
    except jinja2.TemplateError as exc:
        raise DataError(f"the chat template refuses {where} ({exc}); fix the conversation or the template.") from None
    except ValueError as exc:
        raise DataError(
            f"the chat template of {template.origin} cannot mark assistant turns: {exc}; add "
            "{% generation %} markers to it and pass it with --chat-template."
        ) from None


def _fit(conv: Conversation, where: str, seq_len: int, on_long: str, stats: SFTStats) -> Conversation | None:
    """``conv`` if it has assistant tokens and fits T + 1 tokens, cut to fit (``on_long="truncate"``), or None
    (counted in ``stats``); a refusal with ``on_long="error"``."""
    if conv.loss_tokens == 0:
        if on_long == "error":
            raise DataError(f"{where} has no assistant tokens after rendering; remove it or pass --on-long skip.")
        stats.no_assistant += 1
        return None
    if conv.positions > seq_len:
        if on_long == "error":
            raise DataError(
                f'{where} (field "messages") has {len(conv.ids)} tokens, more than seq_len + 1 = '
                f"{seq_len + 1}; raise --seq-len or pass --on-long skip or truncate."
            )
        if on_long == "skip":
            stats.too_long += 1
            return None
        conv = Conversation(conv.ids[: seq_len + 1], conv.mask[: seq_len + 1])
        if conv.loss_tokens == 0:
            stats.too_long += 1
            return None
        stats.truncated += 1
    if conv.positions < 1:
        stats.no_assistant += 1
        return None
    return conv
