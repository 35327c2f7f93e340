"""Training checkpoints that lose nothing: weights, optimizer, data position, RNG, EMA, step.

A checkpoint is a directory ``RUN_DIR/checkpoints/step-NNNNNNN/``:

- ``config.json`` + ``model.safetensors``: the weights (router biases included) in the
  Hugging Face layout, so ``dsv3.from_pretrained`` and transformers load it directly;
- ``tokenizer.json``: the run's tokenizer (the checkpoint is self-contained);
- ``optimizer.safetensors``, ``rng.safetensors``, ``ema.safetensors``: tensors;
- ``training_state.json``: everything else (step, data-loader position, optimizer
  hyper-parameters, Python/NumPy RNG states, counters).

No pickle anywhere. The directory is assembled under a temporary name and renamed
into place (:func:`dsv3.utils.io.atomic_dir`), so a kill at any moment leaves the
previous checkpoints intact; only complete ``step-*`` directories are ever seen.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dsv3.errors import CheckpointError
from dsv3.utils.io import atomic_dir

CHECKPOINTS = "checkpoints"
STATE_FILE = "training_state.json"
_STEP_RE = re.compile(r"^step-(\d+)$")


# ------------------------------------------------------------------ tensors out of nested state
def split_tensors(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Replace every tensor in a nested dict/list by ``{"__tensor__": key}``; return (json_obj, tensors)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            tensors[path] = x.detach().cpu().contiguous()
            return {"__tensor__": path}
        if isinstance(x, torch.dtype):
            return {"__dtype__": str(x).removeprefix("torch.")}
        if isinstance(x, dict):
            return {"__dict__": [[walk(k, f"{path}.k{i}"), walk(v, f"{path}.{i}")] for i, (k, v) in enumerate(x.items())]}
        if isinstance(x, (list, tuple)):
            return {"__list__" if isinstance(x, list) else "__tuple__": [walk(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot store a {type(x).__name__} in a checkpoint")

    return walk(obj, prefix or "t"), tensors


def join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_tensors`."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dtype__" in obj:
            return getattr(torch, obj["__dtype__"])
        if "__dict__" in obj:
            return {join_tensors(k, tensors): join_tensors(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            return [join_tensors(v, tensors) for v in obj["__list__"]]
        if "__tuple__" in obj:
            return tuple(join_tensors(v, tensors) for v in obj["__tuple__"])
    return obj


# ------------------------------------------------------------------ RNG
def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Python, NumPy and torch (CPU and CUDA) generator states."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    np_state = np.random.get_state()
    meta = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return meta, tensors


def set_rng_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if states:
            torch.cuda.set_rng_state_all(states)


# ------------------------------------------------------------------ checkpoint directories
def checkpoint_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, CHECKPOINTS, f"step-{step:07d}")


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints of a run, oldest first, as ``(step, path)``."""
    root = os.path.join(run_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_RE.match(name)
        if m and os.path.isfile(os.path.join(root, name, STATE_FILE)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def latest_checkpoint(run_dir: str) -> str | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory, or a run directory (its latest checkpoint)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is neither a run directory nor a checkpoint directory")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path} holds no checkpoint (no config.json and no {CHECKPOINTS}/step-*)")
    return latest


def save_checkpoint(run_dir: str, step: int, *, model, optimizer=None, loader_state: dict | None = None,
                    tokenizer=None, ema=None, extra: dict[str, Any] | None = None, keep_last: int | None = None,
                    before_commit=None) -> str:
    """Write the complete training state after ``step`` optimizer steps; return its directory.

    ``before_commit`` (tests only) is called with the temporary directory just before
    it is renamed into place, to simulate a kill in the middle of a write.
    """
    from dsv3.checkpoint.hf import write_pretrained

    path = checkpoint_dir(run_dir, step)
    with atomic_dir(path) as tmp:
        write_pretrained(model, tmp)
        if tokenizer is not None:
            tokenizer.save(os.path.join(tmp, "tokenizer.json"))
        state: dict[str, Any] = {"step": step, "loader": loader_state, "extra": extra or {}}
        if optimizer is not None:
            meta, tensors = split_tensors(optimizer.state_dict(), "optim")
            save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
            state["optimizer"] = meta
        rng_meta, rng_tensors = rng_state()
        save_file(rng_tensors, os.path.join(tmp, "rng.safetensors"))
        state["rng"] = rng_meta
        if ema is not None:
            meta, tensors = split_tensors(ema.state_dict(), "ema")
            save_file(tensors, os.path.join(tmp, "ema.safetensors"))
            state["ema"] = meta
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as fh:
            json.dump(state, fh)
        if before_commit is not None:
            before_commit(tmp)
    if keep_last:
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint_state(path: str, *, model=None, optimizer=None, ema=None, restore_rng: bool = True
                          ) -> dict[str, Any]:
    """Restore what is given from checkpoint ``path``; return the JSON state (step, loader, extra)."""
    from dsv3.checkpoint.hf import load_state_into

    state_file = os.path.join(path, STATE_FILE)
    try:
        with open(state_file, encoding="utf-8") as fh:
            state = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path} has no readable {STATE_FILE} ({exc})") from None
    if model is not None:
        load_state_into(model, path)
    if optimizer is not None:
        if "optimizer" not in state:
            raise CheckpointError(f"checkpoint {path} holds no optimizer state")
        tensors = load_file(os.path.join(path, "optimizer.safetensors"))
        try:
            optimizer.load_state_dict(join_tensors(state["optimizer"], tensors))
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"the optimizer state in {path} does not fit this model ({exc})") from None
    if ema is not None:
        if "ema" not in state:
            raise CheckpointError(f"checkpoint {path} holds no EMA weights; start the run without --ema-decay")
        ema.load_state_dict(join_tensors(state["ema"], load_file(os.path.join(path, "ema.safetensors"))))
    if restore_rng:
        set_rng_state(state["rng"], load_file(os.path.join(path, "rng.safetensors")))
    return state
