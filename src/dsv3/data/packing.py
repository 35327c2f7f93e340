"""Packing: token streams and tokenised conversations -> fixed-length rows.

Pre-training (GPT-2/3, nanoGPT, Megatron): documents are joined into one stream with an EOS
after each (:mod:`dsv3.data.tokens`); ``split_stream`` holds whole documents out for
validation; ``PackedDataset`` cuts windows of T + 1 tokens every T tokens, so a sequence may
span documents (attention is not masked at EOS) and no token is padding.

Fine-tuning: ``pack`` places conversations into rows of T positions (best-fit decreasing);
``PackedChatDataset`` gives each row its segment ids (a block-diagonal causal mask,
:func:`dsv3.model.mla.document_mask`) and RoPE positions restarting at 0 per conversation,
so a packed conversation gets the same logits as run alone; targets are the assistant tokens
only (docs/sft.md). Both datasets hand out batches through :mod:`dsv3.data.loader`.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dsv3.data.tokens import TokenStream
from dsv3.errors import ConfigError, DataError
from dsv3.model.loss import IGNORE_INDEX

# --------------------------------------------------------------------------- pre-training: windows of a stream


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


# --------------------------------------------------------------------------- fine-tuning: conversations in rows


@dataclass
class Conversation:
    """One tokenised conversation.

    Attributes:
        ids: [n] int64 token ids of the rendered conversation.
        mask: [n] bool, True for tokens of assistant turns (content and end-of-turn token).
    """

    ids: np.ndarray
    mask: np.ndarray

    @property
    def positions(self) -> int:
        """Positions it takes in a row: n - 1 (inputs t_1..t_{n-1}, targets t_2..t_n)."""
        return len(self.ids) - 1

    @property
    def loss_tokens(self) -> int:
        """Targets that count in the loss: assistant tokens after the first token."""
        return int(self.mask[1:].sum())


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing: rows of item indices whose lengths sum to at most ``capacity``.

    Items are placed longest first into the fullest row that still has room (ties: the
    earlier item and row first), so the result is deterministic. Every length must be
    between 1 and ``capacity``.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i in order:
        n = lengths[i]
        if not 0 < n <= capacity:
            raise ValueError(f"item length {n} does not fit a row of {capacity}")
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            rows.append([i])
            bisect.insort(free, (capacity - n, len(rows) - 1))
        else:
            room, r = free.pop(k)
            rows[r].append(i)
            bisect.insort(free, (room - n, r))
    return rows


@dataclass
class SFTBatch:
    """A batch of SFT rows.

    Attributes:
        input_ids: [B, T] token ids.
        labels: [B, T] next-token targets, ``-100`` outside assistant turns and on padding.
        segment_ids: [B, T] conversation index within its row (0 for the padding tail), or None
            without packing.
        position_ids: [B, T] RoPE positions restarting at each conversation, or None without packing.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    segment_ids: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "SFTBatch":
        move = (lambda t: t.to(device)) if device is not None else (lambda t: t)
        return SFTBatch(
            move(self.input_ids),
            move(self.labels),
            None if self.segment_ids is None else move(self.segment_ids),
            None if self.position_ids is None else move(self.position_ids),
        )

    def model_kwargs(self) -> dict[str, torch.Tensor | None]:
        """The keyword arguments of the model's forward for document masking."""
        return {"segment_ids": self.segment_ids, "position_ids": self.position_ids}

    @property
    def loss_tokens(self) -> torch.Tensor:
        """Number of targets that count in the loss (a 0-d tensor on the batch's device)."""
        return (self.labels != IGNORE_INDEX).sum()


class PackedChatDataset:
    """Rows of ``seq_len`` positions built from tokenised conversations.

    Args:
        conversations: the tokenised conversations (each at most ``seq_len`` + 1 tokens).
        seq_len: T.
        pad_id: the token id of padding positions (never a target).
        packing: several conversations per row (document-masked) or one per row.
    """

    def __init__(self, conversations: Sequence[Conversation], seq_len: int, *, pad_id: int, packing: bool = True):
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.packing = packing
        self.conversations = list(conversations)
        lengths = [c.positions for c in self.conversations]
        self.rows = pack(lengths, seq_len) if packing else [[i] for i in range(len(lengths))]
        self.num_tokens = sum(c.loss_tokens for c in self.conversations)  # loss tokens per epoch
        self.used_positions = sum(lengths)

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Row i: ``(input_ids, labels, segment_ids, position_ids)``, each [T] int64."""
        T = self.seq_len
        ids = np.full(T, self.pad_id, dtype=np.int64)
        labels = np.full(T, IGNORE_INDEX, dtype=np.int64)
        segments = np.zeros(T, dtype=np.int64)
        positions = np.zeros(T, dtype=np.int64)
        at = 0
        for s, c in enumerate(self.rows[i], start=1):
            conv = self.conversations[c]
            n = conv.positions
            ids[at : at + n] = conv.ids[:-1]
            labels[at : at + n] = np.where(conv.mask[1:], conv.ids[1:], IGNORE_INDEX)
            segments[at : at + n] = s
            positions[at : at + n] = np.arange(n)
            at += n
        positions[at:] = np.arange(T - at)
        return ids, labels, segments, positions

    def batch(self, indices: Sequence[int]) -> SFTBatch:
        """Rows ``indices`` as an :class:`SFTBatch` ([B, T] each)."""
        rows = [self.row(int(i)) for i in indices]
        if not rows:
            empty = torch.zeros(0, self.seq_len, dtype=torch.long)
            return SFTBatch(empty, empty.clone())
        ids, labels, segments, positions = (torch.from_numpy(np.stack(col)) for col in zip(*rows))
        if not self.packing:
            return SFTBatch(ids, labels)
        return SFTBatch(ids, labels, segments, positions)
