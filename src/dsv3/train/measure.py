"""Measuring a whole training configuration (``dsv3 memory``): build it as ``dsv3 train`` does, then step it.

:func:`prepare_config` builds the session of a :class:`~dsv3.train.config.TrainConfig` with
:func:`~dsv3.train.session.build_session` (nothing written but the tokenizer/token caches);
:func:`measure_config` runs :func:`dsv3.memory.measure.measure_training` on it and reports the
bytes per category. The measuring tools themselves live in :mod:`dsv3.memory.measure`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from dsv3.memory.measure import MemoryReport, measure_training
from dsv3.train.session import build_session
from dsv3.train.step import train_step


@dataclass
class TrainingSession:
    """A training configuration built by :func:`dsv3.train.session.build_session` (as ``dsv3 train``
    builds it, without writing a run directory), ready to measure or step (see :func:`prepare_config`)."""

    name: str
    session: Any  # dsv3.train.session.Session

    @property
    def config(self):
        return self.session.config

    @property
    def model(self) -> torch.nn.Module:
        return self.session.model

    @property
    def optimizer(self):
        return self.session.optimizer

    @property
    def ema(self):
        return self.session.ema

    def batches(self) -> tuple:
        """The next micro-batch ``(input_ids, labels)`` on the session's device."""
        return self.session.prefetcher.get(1)[0][0]

    def measure(self, steps: int = 3) -> MemoryReport:
        """:func:`measure_training` on this session, with the config's options recorded."""
        report = measure_training(self.name, self.model, self.optimizer, self.batches, ema=self.ema, steps=steps)
        flat = self.config.to_flat_dict()
        report.options = {
            k: flat[k]
            for k in ("model", "seq_len", "micro_batch", "recompute", "fp8", "optim_states", "ema_decay", "dtype")
        }
        return report

    def step(self) -> float:
        """One timed training step (the trainer's :func:`~dsv3.train.step.train_step`) on the next
        micro-batch; seconds."""
        batch = self.batches()
        cuda = self.session.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(self.session, [batch])
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def close(self) -> None:
        self.session.close()


def prepare_config(config, name: str | None = None) -> TrainingSession:
    """Build the tokenizer, data, model (with its FP8/recomputation transformations), optimizer and EMA
    of the training configuration ``config`` (a :class:`~dsv3.train.config.TrainConfig`) exactly as
    ``dsv3 train`` does (:func:`~dsv3.train.session.build_session`). Nothing is written except the
    tokenizer/token caches.
    """
    return TrainingSession(name or config.model.name, build_session(config, write=False, prefetch=False))


def measure_config(config, *, steps: int = 3, name: str | None = None) -> MemoryReport:
    """Measure the training configuration ``config`` (a :class:`~dsv3.train.config.TrainConfig`).

    Builds it with :func:`prepare_config`, then runs :func:`measure_training` on real batches.
    """
    session = prepare_config(config, name)
    try:
        return session.measure(steps)
    finally:
        session.close()
