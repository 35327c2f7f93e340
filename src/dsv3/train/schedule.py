"""The run's hyper-parameters as pure functions of the 0-based optimizer step (report section 4.2).

- :class:`LRSchedule`: linear warmup, constant, cosine decay, a constant tail and a final value (the
  report: 2.2e-4 after 2K warmup steps until 10T tokens, cosine to 2.2e-5 over 4.3T, 7.3e-6 at the end);
- :class:`BatchRamp`: the global batch ramped linearly over steps or tokens, rounded to a multiple of the
  micro-batch (the report: 3072 -> 15360 sequences over the first 469B tokens);
- :class:`MoESchedule`: gamma (bias update speed) until ``bias_update_stop`` of the run, then 0; alpha
  (balance factor) throughout; lambda (MTP weight) until ``mtp_switch``, then ``mtp_loss_weight_late``
  (the report: 0.3 for the first 10T tokens, then 0.1).

Resuming a run needs only the step: ``lr_at(s)`` is the learning rate of the ``(s+1)``-th optimizer step
(``s`` steps have been taken before it). The shapes are drawn in docs/architecture.md, "Schedules".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from dsv3.config import RECIPE_DEFAULTS
from dsv3.errors import ConfigError

__all__ = ["LRSchedule", "BatchRamp", "MoESchedule", "MoEStep"]

# The report's schedule as fractions of its 14.8T training tokens.
_REPORT_TOKENS = 14.8e12
_REPORT_DECAY_START = 10.0e12 / _REPORT_TOKENS
_REPORT_DECAY_END = 14.3e12 / _REPORT_TOKENS
_REPORT_FINAL = 0.167e12 / _REPORT_TOKENS
_REPORT_MIN_RATIO = 2.2e-5 / 2.2e-4
_REPORT_FINAL_RATIO = 7.3e-6 / 2.2e-4

# A ramp is tabulated step by step; the report's ramp is about 12K steps long.
_MAX_RAMP_STEPS = 10_000_000


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_step(step: int) -> int:
    if not _is_int(step) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    return step


@dataclass(frozen=True)
class LRSchedule:
    """Warmup, constant, cosine decay, constant tail (and an optional final constant), in steps.

    Attributes:
        peak_lr: the learning rate after warmup (the report: 2.2e-4).
        warmup_steps: W; ``lr_at(s) = peak_lr * (s + 1) / W`` for ``s < W``, so
            the rate rises linearly from near 0 and step ``W - 1`` uses ``peak_lr``.
        decay_start: S >= W; ``peak_lr`` for ``W <= s < S``.
        decay_steps: D; for ``S <= s <= S + D``:
            ``lr = min_lr + (peak_lr - min_lr) * (1 + cos(pi * (s - S) / D)) / 2``.
        min_lr: the end of the cosine and the tail (the report: 2.2e-5).
        final_lr: the rate of the last ``final_steps`` steps (the report: 7.3e-6).
        final_steps: F; needs ``total_steps`` (N): ``lr = final_lr`` for ``s >= N - F``.
        total_steps: N, the length of the run (optional; needed only with F > 0).

    Steps past N keep the last rate. Inconsistent settings raise ConfigError.
    """

    peak_lr: float
    warmup_steps: int = 0
    decay_start: int = 0
    decay_steps: int = 0
    min_lr: float = 0.0
    final_lr: float | None = None
    final_steps: int = 0
    total_steps: int | None = None

    @classmethod
    def from_options(cls, sched, peak_lr: float) -> "LRSchedule":
        """The schedule of a run's ``schedule`` config section (fractions of ``sched.steps``) with ``peak_lr``."""
        decay_start = int(sched.decay_start * sched.steps)
        decay_steps = int(sched.decay_end * sched.steps) - decay_start
        return cls(
            peak_lr=peak_lr,
            warmup_steps=min(sched.warmup_steps, decay_start),
            decay_start=decay_start,
            decay_steps=decay_steps,
            min_lr=sched.min_lr,
            final_lr=sched.final_lr,
            final_steps=sched.final_steps,
            total_steps=sched.steps,
        )

    def __post_init__(self) -> None:
        for name in ("peak_lr", "min_lr") + (("final_lr",) if self.final_lr is not None else ()):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("warmup_steps", "decay_start", "decay_steps", "final_steps") + (
            ("total_steps",) if self.total_steps is not None else ()
        ):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
        if self.peak_lr <= 0:
            raise ConfigError(f"peak_lr must be > 0, got {self.peak_lr!r}")
        if self.min_lr > self.peak_lr:
            raise ConfigError(
                f"min_lr ({self.min_lr}) is above peak_lr ({self.peak_lr}); the schedule decays, so lower min_lr"
            )
        if self.decay_start < self.warmup_steps:
            raise ConfigError(
                f"decay_start ({self.decay_start}) is before the end of warmup ({self.warmup_steps}); "
                "start the decay at or after warmup_steps"
            )
        if self.final_steps > 0:
            if self.final_lr is None:
                raise ConfigError(
                    f"final_steps is {self.final_steps} but final_lr is not set; give final_lr or set final_steps to 0"
                )
            if self.total_steps is None:
                raise ConfigError(
                    "final_steps needs total_steps (the final phase is the last final_steps of the run); set total_steps"
                )
            if self.total_steps - self.final_steps < self.decay_start + self.decay_steps:
                raise ConfigError(
                    f"the final phase (last {self.final_steps} of {self.total_steps} steps) starts before the cosine decay "
                    f"ends at step {self.decay_start + self.decay_steps}; shorten the decay or the final phase"
                )
        if self.total_steps is not None and self.decay_start + self.decay_steps > self.total_steps:
            raise ConfigError(
                f"the cosine decay ends at step {self.decay_start + self.decay_steps}, after the run's {self.total_steps} steps; "
                "shorten decay_steps or start the decay earlier"
            )

    @classmethod
    def for_run(
        cls,
        total_steps: int,
        peak_lr: float = 2.2e-4,
        *,
        warmup_steps: int | None = None,
        min_lr: float | None = None,
        final_lr: float | None = None,
        decay_start_fraction: float = _REPORT_DECAY_START,
        decay_end_fraction: float = _REPORT_DECAY_END,
        final_fraction: float = _REPORT_FINAL,
    ) -> LRSchedule:
        """The report's shape scaled to a run of ``total_steps`` steps.

        Defaults follow the report's proportions of its 14.8T tokens: the cosine runs
        from 10/14.8 to 14.3/14.8 of the run, the final phase is the last 0.167/14.8,
        ``min_lr = peak_lr / 10`` and ``final_lr = peak_lr * 7.3e-6 / 2.2e-4``.
        Warmup defaults to the report's 2000 steps or 1% of a shorter run (at least 1).
        ``final_fraction = 0`` gives no final phase.
        """
        if not _is_int(total_steps) or total_steps < 1:
            raise ConfigError(f"total_steps must be an integer >= 1, got {total_steps!r}")
        if not 0.0 <= decay_start_fraction <= decay_end_fraction <= 1.0:
            raise ConfigError(
                f"need 0 <= decay_start_fraction <= decay_end_fraction <= 1, got {decay_start_fraction} and {decay_end_fraction}"
            )
        if not 0.0 <= final_fraction <= 1.0 - decay_end_fraction + 1e-12:
            raise ConfigError(
                f"final_fraction {final_fraction} does not fit after the decay ending at {decay_end_fraction} of the run"
            )
        if warmup_steps is None:
            warmup_steps = min(2000, max(1, round(0.01 * total_steps)))
        if not _is_int(warmup_steps) or not 0 <= warmup_steps <= total_steps:
            raise ConfigError(
                f"warmup_steps must be an integer in [0, total_steps={total_steps}], got {warmup_steps!r}"
            )
        decay_start = max(round(decay_start_fraction * total_steps), warmup_steps)
        decay_end = max(round(decay_end_fraction * total_steps), decay_start)
        final_start = max(total_steps - round(final_fraction * total_steps), decay_end)
        final_steps = total_steps - final_start
        return cls(
            peak_lr=peak_lr,
            warmup_steps=warmup_steps,
            decay_start=decay_start,
            decay_steps=decay_end - decay_start,
            min_lr=peak_lr * _REPORT_MIN_RATIO if min_lr is None else min_lr,
            final_lr=(peak_lr * _REPORT_FINAL_RATIO if final_lr is None else final_lr) if final_steps > 0 else final_lr,
            final_steps=final_steps,
            total_steps=total_steps,
        )

    def lr_at(self, step: int) -> float:
        """The learning rate of the step with 0-based index ``step``."""
        s = _check_step(step)
        if s < self.warmup_steps:
            return self.peak_lr * (s + 1) / self.warmup_steps
        if self.final_steps > 0 and s >= self.total_steps - self.final_steps:  # type: ignore[operator]
            return float(self.final_lr)  # type: ignore[arg-type]
        if s < self.decay_start:
            return float(self.peak_lr)
        if self.decay_steps > 0 and s < self.decay_start + self.decay_steps:
            progress = (s - self.decay_start) / self.decay_steps
            return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return float(self.min_lr)


@dataclass(frozen=True)
class BatchRamp:
    """A global batch size (in sequences) that grows linearly from ``start`` to ``end``, then stays.

    Give the ramp's length either in optimizer steps (``ramp_steps``) or in
    training tokens (``ramp_tokens`` with ``seq_len``; the report: 3072 -> 15360
    over 469B tokens of 4096-token sequences). Either way the batch of a step is
    rounded to the nearest multiple of ``micro_batch`` (pass micro-batch size
    times the data-parallel size when data-parallel), at least one multiple.

    In steps: ``b(s) = start + (end - start) * s / ramp_steps`` for ``s < ramp_steps``.
    In tokens: ``b(s) = start + (end - start) * T(s) / ramp_tokens`` while
    ``T(s) < ramp_tokens``, where ``T(s)`` is the tokens of steps ``0..s-1``
    (rounded batches times ``seq_len``); the ramp is tabulated once, lazily.

    Attributes:
        start: batch size at step 0, in sequences.
        end: batch size after the ramp (>= start).
        ramp_steps: length of the ramp in steps (0: ``end`` from the first step).
        ramp_tokens: length of the ramp in tokens (instead of ``ramp_steps``).
        seq_len: tokens per sequence (needed with ``ramp_tokens``; also gives :meth:`tokens_before`).
        micro_batch: the rounding granularity.
    """

    start: int
    end: int
    ramp_steps: int | None = None
    ramp_tokens: int | None = None
    seq_len: int | None = None
    micro_batch: int = 1
    _table: list[list[int]] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("start", "end", "micro_batch"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"batch ramp {name} must be an integer >= 1, got {value!r}")
        if self.end < self.start:
            raise ConfigError(f"batch ramp end ({self.end}) is below its start ({self.start}); the ramp only grows")
        if self.micro_batch > self.end:
            raise ConfigError(
                f"micro_batch ({self.micro_batch}) is larger than the final batch ({self.end}); lower micro_batch"
            )
        if (self.ramp_steps is None) == (self.ramp_tokens is None):
            raise ConfigError("give the batch ramp's length as exactly one of ramp_steps or ramp_tokens")
        length = self.ramp_steps if self.ramp_steps is not None else self.ramp_tokens
        if not _is_int(length) or length < 0:
            raise ConfigError(f"the batch ramp length must be an integer >= 0, got {length!r}")
        if self.seq_len is not None and (not _is_int(self.seq_len) or self.seq_len < 1):
            raise ConfigError(f"seq_len must be an integer >= 1, got {self.seq_len!r}")
        if self.ramp_tokens is not None and self.seq_len is None:
            raise ConfigError("a batch ramp measured in tokens needs seq_len (tokens per sequence)")
        if self.ramp_steps is not None and self.ramp_steps > _MAX_RAMP_STEPS:
            raise ConfigError(
                f"a batch ramp of {self.ramp_steps} steps is longer than the supported {_MAX_RAMP_STEPS}; shorten it"
            )

    @classmethod
    def constant(cls, batch: int, micro_batch: int = 1, seq_len: int | None = None) -> BatchRamp:
        """A batch size that never changes."""
        return cls(start=batch, end=batch, ramp_steps=0, seq_len=seq_len, micro_batch=micro_batch)

    @classmethod
    def report(cls, micro_batch: int = 1, seq_len: int = 4096) -> BatchRamp:
        """The report's ramp: 3072 -> 15360 sequences over the first 469B tokens."""
        return cls(start=3072, end=15360, ramp_tokens=469_000_000_000, seq_len=seq_len, micro_batch=micro_batch)

    def _round(self, batch: float) -> int:
        m = self.micro_batch
        return max(m, int(math.floor(batch / m + 0.5)) * m)

    def _ramp(self) -> tuple[list[int], list[int]]:
        """(batch of each ramp step, sequences before each ramp step), computed once.

        The last entry of the first list is the constant batch after the ramp.
        """
        if not self._table:
            batches = []
            if self.ramp_steps is not None:
                for s in range(self.ramp_steps):
                    batches.append(self._round(self.start + (self.end - self.start) * s / self.ramp_steps))
            else:
                assert self.ramp_tokens is not None and self.seq_len is not None
                tokens = 0
                while tokens < self.ramp_tokens:
                    if len(batches) >= _MAX_RAMP_STEPS:
                        raise ConfigError(
                            f"the batch ramp over {self.ramp_tokens} tokens takes more than {_MAX_RAMP_STEPS} steps; "
                            "shorten ramp_tokens or raise the batch sizes"
                        )
                    b = self._round(self.start + (self.end - self.start) * tokens / self.ramp_tokens)
                    batches.append(b)
                    tokens += b * self.seq_len
            batches.append(self._round(self.end))
            before, total = [], 0
            for b in batches:
                before.append(total)
                total += b
            self._table.extend([batches, before])
        return self._table[0], self._table[1]

    def batch_size_at(self, step: int) -> int:
        """Global batch size, in sequences, of the step with 0-based index ``step``."""
        s = _check_step(step)
        batches, _ = self._ramp()
        return batches[min(s, len(batches) - 1)]

    def accumulation_steps(self, step: int, micro_batch: int | None = None) -> int:
        """Micro-batches to accumulate at ``step``: ``batch_size_at(step) / micro_batch``.

        ``micro_batch`` defaults to the ramp's own; the batch must be a multiple of it.
        """
        m = self.micro_batch if micro_batch is None else micro_batch
        if not _is_int(m) or m < 1:
            raise ConfigError(f"micro_batch must be an integer >= 1, got {m!r}")
        b = self.batch_size_at(step)
        if b % m:
            raise ConfigError(
                f"batch size {b} at step {step} is not a multiple of micro_batch {m}; make the ramp's micro_batch a multiple of it"
            )
        return b // m

    def sequences_before(self, step: int) -> int:
        """Sequences consumed by steps ``0 .. step-1``."""
        s = _check_step(step)
        batches, before = self._ramp()
        last = len(batches) - 1
        if s <= last:
            return before[s]
        return before[last] + (s - last) * batches[last]

    def tokens_before(self, step: int) -> int:
        """Tokens consumed by steps ``0 .. step-1`` (needs ``seq_len``)."""
        if self.seq_len is None:
            raise ConfigError("tokens_before needs the ramp's seq_len; construct the BatchRamp with seq_len")
        return self.sequences_before(step) * self.seq_len


@dataclass(frozen=True)
class MoEStep:
    """The balancing and MTP hyper-parameters of one optimizer step.

    Attributes:
        gamma: the bias update speed (``model.update_router_bias(load, gamma)``).
        seq_aux_alpha: alpha, the sequence-wise balance factor (``model(..., seq_aux_alpha=...)``).
        mtp_loss_weight: lambda, the MTP loss weight (``model(..., mtp_loss_weight=...)``).
    """

    gamma: float
    seq_aux_alpha: float
    mtp_loss_weight: float


@dataclass(frozen=True)
class MoESchedule:
    """gamma, alpha and lambda over a run of ``steps`` optimizer steps (the trainer owns them).

    Attributes:
        gamma, seq_aux_alpha, mtp_loss_weight: the values from step 0.
        mtp_loss_weight_late: lambda from fraction ``mtp_switch`` of the run on (None: unchanged).
        gamma_stop: fraction of the run from which gamma is 0.
    """

    gamma: float
    seq_aux_alpha: float
    mtp_loss_weight: float
    steps: int
    mtp_loss_weight_late: float | None = None
    mtp_switch: float = 1.0
    gamma_stop: float = 1.0

    @classmethod
    def from_options(cls, moe, steps: int, model_keys: Mapping[str, float] | None = None) -> MoESchedule:
        """From a :class:`~dsv3.train.config.MoEOptions`. A value it leaves unset (None) is the model config.json's
        extension key (``ModelConfig.recipe()``, ``model_keys``) when present, else the report's
        (:data:`dsv3.config.RECIPE_DEFAULTS`)."""
        keys = dict(model_keys or {})

        def value(name: str) -> float:
            set_here = getattr(moe, name)
            return float(set_here if set_here is not None else keys.get(name, RECIPE_DEFAULTS[name]))

        return cls(
            gamma=value("bias_update_speed"),
            seq_aux_alpha=value("seq_aux_alpha"),
            mtp_loss_weight=value("mtp_loss_weight"),
            steps=steps,
            mtp_loss_weight_late=moe.mtp_loss_weight_late,
            mtp_switch=moe.mtp_switch,
            gamma_stop=moe.bias_update_stop,
        )

    def at(self, step: int) -> MoEStep:
        """The values of 0-based optimizer step ``step``."""
        _check_step(step)
        late = self.mtp_loss_weight_late is not None and step >= self.mtp_switch * self.steps
        return MoEStep(
            gamma=self.gamma if step < self.gamma_stop * self.steps else 0.0,
            seq_aux_alpha=self.seq_aux_alpha,
            mtp_loss_weight=self.mtp_loss_weight_late if late else self.mtp_loss_weight,
        )
