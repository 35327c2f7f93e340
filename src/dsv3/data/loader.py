"""Batches: a deterministic, resumable order over packed rows, held-out batches, moving batches to a device.

``TrainLoader`` visits the rows of a :class:`~dsv3.data.packing.PackedDataset` or
:class:`~dsv3.data.packing.PackedChatDataset` in a seeded permutation per epoch; its
``state_dict`` restores the exact position, and ``shard`` gives a data-parallel rank only its
micro-batches of each global batch. ``val_batches`` walks the held-out rows in a fixed order.
A batch is an ``(input_ids, labels)`` pair (pre-training) or an
:class:`~dsv3.data.packing.SFTBatch`; ``split_batch`` and ``batch_to`` take either.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from dsv3.data.packing import PackedDataset, SFTBatch
from dsv3.errors import CheckpointError, ConfigError, DataError


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


def split_batch(batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """``(input_ids, labels, model keyword arguments)`` of a pre-training ``(ids, labels)`` pair or an
    :class:`SFTBatch`."""
    if isinstance(batch, SFTBatch):
        return batch.input_ids, batch.labels, batch.model_kwargs()
    ids, labels = batch
    return ids, labels, {}


def batch_to(batch, device, non_blocking: bool = False, pin: bool = False):
    """A batch (pair or :class:`SFTBatch`) pinned and/or moved to ``device``."""

    def move(t):
        if t is None:
            return None
        if pin:
            t = t.pin_memory()
        return t.to(device, non_blocking=non_blocking) if device is not None else t

    if isinstance(batch, SFTBatch):
        return SFTBatch(move(batch.input_ids), move(batch.labels), move(batch.segment_ids), move(batch.position_ids))
    return tuple(move(t) for t in batch)
