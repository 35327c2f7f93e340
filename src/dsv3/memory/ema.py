"""An exponential moving average of the parameters, kept in CPU memory and updated in the background.

After optimizer step k, with parameters theta_k and decay beta (report 3.2.3)::

    ema_k = beta * ema_{k-1} + (1 - beta) * theta_k,     ema_0 = theta_0

:meth:`CPUEMA.update` only copies the parameters into one of two CPU staging buffers (on CUDA a
``non_blocking`` copy into pinned memory and an event) and queues it; a worker thread at the lowest CPU
priority does the FP32 arithmetic ``ema <- ema + (1 - beta) (theta - ema)``. ``update()`` waits only when
one EMA update takes longer than a whole training step. Memory: FP32 shadows (4 bytes a parameter) plus
two staging buffers in the parameters' dtype, all in CPU memory. How it stays off the step's critical
path is in docs/memory.md ("The CPU EMA").
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dsv3.errors import CheckpointError, ConfigError

__all__ = ["CPUEMA"]


@dataclass
class _Slot:
    """One staging buffer: a CPU copy of every parameter, and whether the worker is done with it."""

    buffers: list[torch.Tensor]
    free: threading.Event = field(default_factory=threading.Event)
    events: list[Any] = field(default_factory=list)  # CUDA events recorded after the copies


@dataclass
class _Shared:
    """What the caller and the worker thread share (the worker holds no reference to the CPUEMA)."""

    error: BaseException | None = None
    before_apply: Callable[[], None] | None = None  # test hook: runs in the worker before each update


def _lowest_priority() -> None:
    """Run the calling thread at the lowest CPU priority (Linux: nice 19 for this thread only).

    The EMA arithmetic then runs on cycles the training step leaves idle (between kernels, during
    Python overhead, data loading and communication) instead of taking a core from the step's
    threads; when the worker falls a whole step behind, :meth:`CPUEMA.update` waits for it and the
    step's threads are idle, so it always finishes.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux, or not permitted: keep the default priority
        pass


def _worker(jobs: queue.SimpleQueue, shadow: list[torch.Tensor], slots: list[_Slot], shared: _Shared) -> None:
    """Apply queued updates ``(slot index, decay)`` to the FP32 shadows until ``None`` arrives."""
    _lowest_priority()
    while True:
        job = jobs.get()
        if job is None:
            return
        index, decay = job
        slot = slots[index]
        try:
            if shared.error is None:
                if shared.before_apply is not None:
                    shared.before_apply()
                for event in slot.events:
                    event.synchronize()
                # In pieces below ATen's parallel grain size: the worker never opens a thread team of
                # its own, so it does not fight the training step's threads for the cores.
                for ema_piece, src in zip(_pieces(shadow), _pieces(slot.buffers)):
                    src = [b if b.dtype == torch.float32 else b.float() for b in src]
                    torch._foreach_lerp_(ema_piece, src, 1.0 - decay)  # ema + (1 - beta)(theta - ema)
        except BaseException as exc:  # re-raised in the caller by update()/wait()
            shared.error = exc
        finally:
            slot.free.set()


_PIECE = 16384  # elements: below ATen's GRAIN_SIZE (32768), so each op runs on the calling thread


def _pieces(tensors: list[torch.Tensor], per_call: int = 4096) -> list[list[torch.Tensor]]:
    """Flat views of ``tensors`` cut into ``_PIECE``-element pieces, in lists of ``per_call`` pieces."""
    pieces = [p for t in tensors for p in t.reshape(-1).split(_PIECE)]
    return [pieces[i : i + per_call] for i in range(0, len(pieces), per_call)]


def _shutdown(jobs: queue.SimpleQueue, thread: threading.Thread) -> None:
    jobs.put(None)
    if thread.is_alive() and thread is not threading.current_thread():
        thread.join(timeout=60)


def _named_tensors(
    source: nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
) -> list[tuple[str, torch.Tensor]]:
    if isinstance(source, nn.Module):
        return list(source.named_parameters())
    if isinstance(source, Mapping):
        return list(source.items())
    return list(source)


class CPUEMA:
    """FP32 EMA of parameters in CPU memory, updated by a background thread.

    Args:
        model_or_named_params: a module (all its ``named_parameters()``), a
            ``{name: tensor}`` mapping or an iterable of ``(name, tensor)``.
            The tensors are tracked: :meth:`update` reads their current values.
        decay: beta in [0, 1), e.g. 0.999.
        pin_memory: pin the staging buffers; ``None`` pins when some parameter
            is on CUDA (and CUDA is available).

    Use::

        ema = CPUEMA(model, 0.999)
        for batch in data:
            ...; optimizer.step()
            ema.update()                 # copies, returns; the worker averages
        with ema.applied():              # EMA weights in the model, restored after
            validate(model)
        ema.close()

    Errors raised in the worker are re-raised by the next :meth:`update`,
    :meth:`wait` (or any method that waits). The thread is a daemon and stops on
    :meth:`close`, when the object is garbage-collected, or at interpreter exit.
    """

    def __init__(
        self,
        model_or_named_params: nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
        decay: float,
        *,
        pin_memory: bool | None = None,
    ) -> None:
        if (
            isinstance(decay, bool)
            or not isinstance(decay, (int, float))
            or not (0.0 <= decay < 1.0)
            or math.isnan(decay)
        ):
            raise ConfigError(f"the EMA decay must be a number in [0, 1), e.g. 0.999, got {decay!r}")
        named = _named_tensors(model_or_named_params)
        if not named:
            raise ConfigError("there are no parameters to average; pass a model with parameters to CPUEMA")
        names = [n for n, _ in named]
        if len(set(names)) != len(names):
            raise ValueError("CPUEMA got duplicate parameter names")
        self.decay = float(decay)
        self._names = names
        self._params = [t.detach() for _, t in named]
        self._num_updates = 0
        on_cuda = any(p.is_cuda for p in self._params)
        self._pinned = bool((on_cuda if pin_memory is None else pin_memory) and torch.cuda.is_available())
        with torch.no_grad():
            self._shadow = [p.to(device="cpu", dtype=torch.float32, copy=True) for p in self._params]
        self._slots = [
            _Slot([torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=self._pinned) for p in self._params])
            for _ in range(2)
        ]
        for slot in self._slots:
            slot.free.set()
        self._all_cpu = all(p.device.type == "cpu" for p in self._params)
        self._next = 0
        self._applied = False
        self._closed = False
        self._shared = _Shared()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=_worker, args=(self._jobs, self._shadow, self._slots, self._shared), name="dsv3-cpu-ema", daemon=True
        )
        self._thread.start()
        self._finalizer = weakref.finalize(self, _shutdown, self._jobs, self._thread)

    # ------------------------------------------------------------------ updates

    @property
    def num_updates(self) -> int:
        """How many times :meth:`update` has been called (including restored ones)."""
        return self._num_updates

    @property
    def names(self) -> list[str]:
        """Parameter names, in order."""
        return list(self._names)

    def update(self, decay: float | None = None) -> None:
        """Queue ``ema <- decay * ema + (1 - decay) * theta`` with the parameters' current values.

        Returns once the parameters are copied to the staging buffer (on CUDA,
        once the asynchronous copy is issued). Blocks only while the worker is
        still applying the update before the previous one (see the module notes).
        """
        self._check_usable()
        if self._applied:
            raise RuntimeError("CPUEMA.update() was called inside applied(); leave the context first")
        beta = self.decay if decay is None else float(decay)
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"the EMA decay must be a number in [0, 1), got {decay!r}")
        slot = self._slots[self._next]
        slot.free.wait()
        self._raise_worker_error()
        slot.free.clear()
        try:
            slot.events = self._copy_params_into(slot.buffers)
        except BaseException:
            slot.free.set()
            raise
        self._jobs.put((self._next, beta))
        self._next ^= 1
        self._num_updates += 1

    def _copy_params_into(self, buffers: list[torch.Tensor]) -> list[Any]:
        """Copy the parameters into CPU ``buffers``; return CUDA events to wait on (none on CPU)."""
        with torch.no_grad():
            if self._all_cpu:
                torch._foreach_copy_(buffers, self._params)
                return []
            devices = set()
            for buf, p in zip(buffers, self._params):
                buf.copy_(p, non_blocking=self._pinned)
                if p.is_cuda:
                    devices.add(p.device)
            events = []
            for device in devices:
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(device))
                events.append(event)
            return events

    def wait(self) -> None:
        """Block until every queued update is applied; re-raise a worker error."""
        self._check_usable()
        for slot in self._slots:
            slot.free.wait()
        self._raise_worker_error()

    synchronize = wait

    def _raise_worker_error(self) -> None:
        if self._shared.error is not None:
            raise self._shared.error

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError("this CPUEMA is closed")

    # --------------------------------------------------------------- weights out

    def shadow(self) -> dict[str, torch.Tensor]:
        """``{name: FP32 CPU tensor}`` of the EMA (waits first; live tensors, do not modify)."""
        self.wait()
        return dict(zip(self._names, self._shadow))

    def _targets(
        self, model: nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | None
    ) -> list[torch.Tensor]:
        if model is None:
            return self._params
        found = {n: t.detach() for n, t in _named_tensors(model)}
        missing = [n for n in self._names if n not in found]
        if missing:
            raise ValueError(f"the model lacks {len(missing)} averaged parameter(s), e.g. {missing[0]!r}")
        targets = [found[n] for n in self._names]
        for name, t, s in zip(self._names, targets, self._shadow):
            if t.shape != s.shape:
                raise ValueError(
                    f"parameter {name!r} has shape {tuple(t.shape)} in the model but {tuple(s.shape)} in the EMA"
                )
        return targets

    def copy_to(
        self, model: nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | None = None
    ) -> None:
        """Overwrite the parameters of ``model`` (default: the tracked ones) with the EMA, cast to their dtype."""
        self.wait()
        with torch.no_grad():
            for t, s in zip(self._targets(model), self._shadow):
                t.copy_(s)

    @contextlib.contextmanager
    def applied(self, model: nn.Module | Mapping[str, torch.Tensor] | None = None) -> Iterator[None]:
        """Swap the EMA weights into ``model`` (default: the tracked parameters), restore them after.

        The training weights are kept in a CPU copy of their own dtype (one
        staging buffer when shapes and dtypes match), so the restore is exact.
        :meth:`update` may not be called inside.
        """
        if self._applied:
            raise RuntimeError("CPUEMA.applied() does not nest")
        self.wait()
        targets = self._targets(model)
        backup = [
            buf if (buf.dtype == t.dtype and buf.shape == t.shape) else torch.empty(t.shape, dtype=t.dtype)
            for buf, t in zip(self._slots[0].buffers, targets)
        ]
        self._applied = True
        try:
            with torch.no_grad():
                for b, t in zip(backup, targets):
                    b.copy_(t)
                for t, s in zip(targets, self._shadow):
                    t.copy_(s)
            try:
                yield
            finally:
                with torch.no_grad():
                    for t, b in zip(targets, backup):
                        t.copy_(b)
        finally:
            self._applied = False

    # ------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """``{"decay", "num_updates", "shadow": {name: FP32 CPU tensor}}`` after waiting for the worker.

        Like ``nn.Module.state_dict()`` the shadow tensors are live: save them
        before the next :meth:`update` (or clone them).
        """
        return {"decay": self.decay, "num_updates": self._num_updates, "shadow": self.shadow()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (the EMA weights and the update count; ``decay`` stays as constructed)."""
        self.wait()
        if not isinstance(state, Mapping) or not isinstance(state.get("shadow"), Mapping):
            raise CheckpointError(
                "the EMA state in this checkpoint is malformed (no 'shadow' weights); resume without --ema-decay or use another checkpoint"
            )
        shadow = state["shadow"]
        missing = [n for n in self._names if n not in shadow]
        extra = [n for n in shadow if n not in set(self._names)]
        if missing or extra:
            what = f"lacks {missing[0]!r}" if missing else f"has unknown {extra[0]!r}"
            raise CheckpointError(
                f"the checkpoint's EMA weights do not match the model (it {what}); resume with the same model config"
            )
        for name, s in zip(self._names, self._shadow):
            t = shadow[name]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(s.shape):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise CheckpointError(
                    f"EMA weight {name!r} in the checkpoint has shape {got}, the model needs {tuple(s.shape)}; resume with the same model config"
                )
        with torch.no_grad():
            for name, s in zip(self._names, self._shadow):
                s.copy_(shadow[name])
        self._num_updates = int(state.get("num_updates", 0))

    # ------------------------------------------------------------------- memory

    def nbytes(self) -> int:
        """CPU bytes held: FP32 shadows plus the two staging buffers."""
        tensors = self._shadow + [b for slot in self._slots for b in slot.buffers]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def pinned(self) -> bool:
        """Whether the staging buffers are in pinned (page-locked) memory."""
        return self._pinned

    # ---------------------------------------------------------------- shutdown

    def close(self) -> None:
        """Finish queued updates and stop the worker thread (idempotent)."""
        if self._closed:
            return
        try:
            for slot in self._slots:
                slot.free.wait()
        finally:
            self._closed = True
            self._finalizer()

    def __enter__(self) -> CPUEMA:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
