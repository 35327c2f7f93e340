"""Measuring what training really holds in memory.

Two measurements of the activations one micro-batch keeps between forward and backward:
:class:`SavedTensorBytes` counts the storages autograd packs for backward (parameters excluded: what
is saved *outside* recomputed regions); :class:`LiveForwardBytes` counts every storage created during
the forward that is still alive when it returns (the saved tensors plus what recomputation keeps: the
inputs of checkpointed regions and the outputs the selective policy caches), the number that matters
for memory and the one :func:`measure_training` reports. :func:`measure_training` runs a few real
training steps and reports parameter, gradient, optimizer-state, EMA (host) and activation bytes, the
peak CUDA memory where there is one, and the throughput. Stepping a whole training configuration
(``dsv3 memory``) is :mod:`dsv3.train.measure`.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dsv3.optim import optimizer_state_bytes


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class SavedTensorBytes:
    """Context manager: bytes of the distinct storages autograd saves for backward."""

    def __init__(self, exclude: list[torch.Tensor] | None = None) -> None:
        self._exclude = {_storage_key(t) for t in (exclude or []) if t.untyped_storage().nbytes()}
        self.storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            key = _storage_key(t)
            if key and key not in self._exclude:
                self.storages[key] = t.untyped_storage().nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


class LiveForwardBytes(TorchDispatchMode):
    """Dispatch mode recording the storages every op creates; :meth:`live_bytes` counts the survivors."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                known = self._seen.get(key)
                if key and (known is None or known[0].expired()):  # addresses are reused after a free
                    self._seen[key] = (StorageWeakRef(storage), storage.nbytes())
        return out

    def live_bytes(self, exclude: list[torch.Tensor] | None = None) -> int:
        skip = {_storage_key(t) for t in (exclude or [])}
        return sum(n for key, (ref, n) in self._seen.items() if key not in skip and not ref.expired())


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def grad_bytes(model: torch.nn.Module) -> int:
    return sum(
        p.grad.numel() * p.grad.element_size()
        for p in {id(p): p for p in model.parameters()}.values()
        if p.grad is not None
    )


def activation_bytes(
    model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, *, backward: bool = True
) -> tuple[int, int]:
    """(live bytes, autograd-saved bytes) held for backward by one forward of ``model`` on a micro-batch."""
    params = list(model.parameters())
    live = LiveForwardBytes()
    saved = SavedTensorBytes(exclude=params)
    with saved, live:
        out = model(ids, labels)
    loss = out.loss
    del out
    result = live.live_bytes(exclude=[loss, *params, *model.buffers()]), saved.bytes
    if backward:
        loss.backward()
    return result


@dataclass
class MemoryReport:
    """Bytes held by one training configuration, as measured (see module docstring)."""

    name: str
    params: int
    grads: int
    optimizer: int
    ema_host: int
    activations: int  # per micro-batch: storages alive between forward and backward
    saved_tensors: int  # per micro-batch: what autograd packs outside recomputed regions
    tokens_per_s: float
    peak_device: int | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def training_state(self) -> int:
        """Device-resident state: weights + gradients + optimizer (the EMA lives in host memory)."""
        return self.params + self.grads + self.optimizer

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["training_state"] = self.training_state
        return d


def training_step(
    model: torch.nn.Module, optimizer, batch: tuple, *, ema=None, measure: bool = False
) -> tuple[float, int, tuple[int, int] | None]:
    """One training step on one micro-batch: forward, backward, optimizer step, EMA update.

    Returns ``(seconds, gradient bytes, (live, saved) activation bytes or None)``; with ``measure``
    the forward runs under the activation trackers (slower: do not time that step).
    """
    cuda = next(model.parameters()).device.type == "cuda"
    ids, labels = batch
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    acts = None
    if measure:
        acts = activation_bytes(model, ids, labels)
    else:
        model(ids, labels).loss.backward()
    grads = grad_bytes(model)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, grads, acts


def measure_training(
    name: str,
    model: torch.nn.Module,
    optimizer,
    batches: Callable[[], tuple],
    *,
    ema=None,
    steps: int = 3,
    warmup: int = 1,
) -> MemoryReport:
    """Run ``warmup`` steps, one step under memory tracking, then ``steps`` timed steps (one micro-batch each).

    Args:
        batches: returns the next ``(input_ids, labels)`` micro-batch on the model's device.
        steps: timed steps; 0 measures bytes only (``tokens_per_s`` is then NaN).
    """
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    model.train()
    times, acts, grads, tokens = [], None, 0, 0
    for i in range(warmup + 1 + steps):
        batch = batches()
        if cuda and i == warmup:
            torch.cuda.reset_peak_memory_stats()
        dt, grads, measured = training_step(model, optimizer, batch, ema=ema, measure=i == warmup)
        acts = measured or acts
        if i > warmup:  # the measured step runs under tracking: not timed
            times.append(dt)
        tokens = batch[0].numel()
    if ema is not None:
        ema.wait()
    return MemoryReport(
        name=name,
        params=param_bytes(model),
        grads=grads,
        optimizer=optimizer_state_bytes(optimizer),
        ema_host=ema.nbytes() if ema is not None else 0,
        activations=acts[0],
        saved_tensors=acts[1],
        tokens_per_s=tokens / statistics.median(times) if times else float("nan"),
        peak_device=torch.cuda.max_memory_allocated() if cuda else None,
    )
