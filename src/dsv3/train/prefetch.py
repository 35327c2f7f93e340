"""A step's micro-batches, fetched ahead: :class:`BatchPrefetcher`.

On CUDA the next step's micro-batches are read and pinned by a background thread while the current
step computes; on CPU they are read in the training thread. Either way :meth:`BatchPrefetcher.get`
hands out exactly the batches, and :attr:`BatchPrefetcher.state_after` the loader position, that an
unprefetched run would (a checkpoint records that position, whatever has been fetched ahead).
"""

from __future__ import annotations

import queue
import threading

import torch

from dsv3.data.loader import batch_to

Batch = tuple[torch.Tensor, torch.Tensor]  # (input_ids [b, T], labels [b, T])


class BatchPrefetcher:
    """Hands out each step's micro-batches, on CUDA fetching the next step's in a background thread.

    Args:
        loader: the :class:`~dsv3.data.loader.TrainLoader` (its order decides the batches).
        micro_batch: sequences per micro-batch.
        device: where the batches go; on CUDA they are pinned and copied asynchronously.
        background: fetch ahead in a thread (default: only on CUDA).

    :meth:`get` returns ``(micro-batches of one step, loader state before them)``; ``state_after``
    is the loader position right after the last step handed out (what a checkpoint records),
    whatever has been fetched ahead.
    """

    def __init__(self, loader, micro_batch: int, device: torch.device, *, background: bool | None = None) -> None:
        self.loader, self.micro_batch, self.device = loader, micro_batch, device
        self.background = device.type == "cuda" if background is None else background
        self._pending: tuple[int, queue.Queue] | None = None
        self.state_after: dict = loader.state_dict()
        self.sequences_after: int = loader.sequences_seen

    def _fetch(self, n_micro: int) -> tuple[list[Batch], dict]:
        state = self.loader.state_dict()
        pin = self.device.type == "cuda"
        batches = []
        for batch in self.loader.next_batches(n_micro, self.micro_batch):  # this dp rank's part (all in one process)
            if not isinstance(batch, tuple):  # an SFT batch (with document-mask ids)
                batches.append(batch_to(batch, None, pin=pin))
                continue
            ids, labels = batch
            if pin:
                ids, labels = ids.pin_memory(), labels.pin_memory()
            batches.append((ids, labels))
        return batches, state

    def _start(self, n_micro: int) -> None:
        box: queue.Queue = queue.Queue(maxsize=1)

        def work() -> None:
            try:
                box.put(self._fetch(n_micro))
            except BaseException as exc:  # re-raised in the training thread
                box.put(exc)

        threading.Thread(target=work, name="dsv3-prefetch", daemon=True).start()
        self._pending = (n_micro, box)

    def get(self, n_micro: int, next_n_micro: int | None = None) -> tuple[list[Batch], dict]:
        """This step's ``n_micro`` micro-batches (on the device) and the loader state before them;
        starts fetching ``next_n_micro`` for the next step when prefetching."""
        if self._pending is not None and self._pending[0] == n_micro:
            got = self._pending[1].get()
            if isinstance(got, BaseException):
                raise got
            batches, state = got
        else:
            self.drain()
            batches, state = self._fetch(n_micro)
        self._pending = None
        self.state_after = self.loader.state_dict()
        self.sequences_after = self.loader.sequences_seen
        if self.background and next_n_micro:
            self._start(next_n_micro)
        nb = self.device.type == "cuda"
        return [batch_to(b, self.device, non_blocking=nb) for b in batches], state

    def drain(self) -> None:
        """Wait for and drop a fetch in flight, putting the loader back where the next step starts."""
        if self._pending is not None:
            self._pending[1].get()
            self._pending = None
            self.loader.load_state_dict(self.state_after)
