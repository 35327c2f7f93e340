"""Training checkpoints that lose nothing: weights, optimizer, data position, RNG, EMA, step.

A checkpoint is a directory ``RUN_DIR/checkpoints/step-NNNNNNN/``: the Hugging Face weights
(``config.json`` + ``model.safetensors``), ``tokenizer.json`` (and a fine-tuning run's chat template),
``optimizer/rng/ema.safetensors``, ``training_state.json`` (step, loader position, counters) and
``manifest.json`` (size and SHA-256 of every other file), written last. No pickle anywhere.
The directory is assembled under a temporary name and renamed into place; a damaged checkpoint fails
:func:`verify_checkpoint` and :func:`select_resume_checkpoint` moves it aside and resumes from the newest
intact one; a failed write raises :class:`~dsv3.errors.CheckpointError` and leaves earlier checkpoints
untouched. :func:`from_pretrained` loads a Hugging Face directory or a run directory's newest checkpoint.
Narrative: docs/checkpoints.md.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dsv3.config import ModelConfig
from dsv3.errors import CheckpointError
from dsv3.model.hf import load_state_into, read_pretrained, write_pretrained
from dsv3.model.transformer import DeepseekV3ForCausalLM
from dsv3.utils.io import atomic_dir

CHECKPOINTS = "checkpoints"
STATE_FILE = "training_state.json"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
#: A fine-tuning run's chat template and special tokens (``dsv3.data.chat.RUN_TEMPLATE_FILE``), copied into
#: each of its checkpoints so that ``dsv3 eval`` on chat data and ``dsv3 export`` find it there.
CHAT_TEMPLATE_FILE = "tokenizer_config.json"
_STEP_RE = re.compile(r"^step-(\d+)$")
_TEMP_RE = re.compile(r"^\.step-\d+\..*\.tmp$")  # atomic_dir's temporary name for step-N
_ASIDE_RE = re.compile(r"^(step-\d+)\.old$")  # atomic_dir's aside name while replacing step-N


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
            return {
                "__dict__": [[walk(k, f"{path}.k{i}"), walk(v, f"{path}.{i}")] for i, (k, v) in enumerate(x.items())]
            }
        if isinstance(x, (list, tuple)):
            return {
                "__list__" if isinstance(x, list) else "__tuple__": [walk(v, f"{path}.{i}") for i, v in enumerate(x)]
            }
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
    """The ``step-*`` checkpoint directories of a run, oldest first, as ``(step, path)``.

    Every renamed-into-place directory is listed (a write is atomic, so each one was
    complete when written); whether it is still intact is :func:`verify_checkpoint`'s job.
    """
    root = os.path.join(run_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_RE.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    """SHA-256 (hex) of a file's bytes, read in ``chunk``-byte pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: str, step: int, known: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Record the size and SHA-256 of every file in ``directory`` in ``directory/manifest.json``.

    ``known``: entries already computed (file name -> ``{"bytes", "sha256"}``); every other file is hashed here.
    """
    files = {}
    for name in sorted(os.listdir(directory)):
        full = os.path.join(directory, name)
        if name != MANIFEST and os.path.isfile(full):
            files[name] = (known or {}).get(name) or {"bytes": os.path.getsize(full), "sha256": file_sha256(full)}
    manifest = {"format": MANIFEST_FORMAT, "step": step, "files": files}
    with open(os.path.join(directory, MANIFEST), "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1)
    return manifest


def read_manifest(path: str) -> dict[str, Any] | str:
    """The ``files`` table of ``path/manifest.json``, or why it cannot be read (a str)."""
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as fh:
            manifest = json.load(fh)
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError
    except FileNotFoundError:
        return f"{MANIFEST} is missing"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    return files


def verify_listed_files(path: str, files: dict[str, Any], *, hashes: bool = True) -> str | None:
    """Why a file that ``files`` (a manifest's table) lists is missing, truncated or changed in ``path``; else None."""
    for name, entry in files.items():
        full = os.path.join(path, name)
        try:
            size = os.path.getsize(full)
        except OSError:
            return f"{name} is missing"
        try:
            if size != entry["bytes"]:
                return f"{name} is truncated or changed ({size} bytes, {entry['bytes']} written)"
            if hashes and file_sha256(full) != entry["sha256"]:
                return f"{name} does not match its recorded SHA-256"
        except (KeyError, TypeError):
            return f"{MANIFEST} is unreadable"
        except OSError as exc:
            return f"{name} cannot be read ({exc.strerror or exc})"
    return None


def verify_checkpoint(path: str, *, hashes: bool = True) -> str | None:
    """Why the checkpoint directory ``path`` is damaged, or None when it is intact.

    Intact means: ``manifest.json`` is readable, every file it lists exists with the
    recorded size (and, with ``hashes``, the recorded SHA-256), and the files a resume
    needs (config, weights, training state, RNG) are among them.

    Args:
        path: a ``step-*`` directory.
        hashes: also hash every file (reads all bytes); False checks sizes only.
    """
    files = read_manifest(path)
    if isinstance(files, str):
        return files
    weights = "model.safetensors" in files or "model.safetensors.index.json" in files
    for need in ("config.json", STATE_FILE, "rng.safetensors"):
        if need not in files:
            return f"its manifest does not list {need}"
    if not weights:
        return "its manifest lists no model weights"
    return verify_listed_files(path, files, hashes=hashes)


def latest_checkpoint(run_dir: str, *, hashes: bool = False) -> str | None:
    """The newest checkpoint of a run that passes :func:`verify_checkpoint` (sizes only by default)."""
    for _, path in reversed(list_checkpoints(run_dir)):
        if verify_checkpoint(path, hashes=hashes) is None:
            return path
    return None


def _move_aside(path: str) -> str:
    """Rename a damaged checkpoint to ``step-N.damaged`` (``.damaged-2``, ...) so it is never resumed."""
    target, n = path + ".damaged", 1
    while os.path.exists(target):
        n += 1
        target = f"{path}.damaged-{n}"
    os.replace(path, target)
    return target


def select_resume_checkpoint(run_dir: str, log: Callable[[str], None] = print) -> str | None:
    """The newest intact checkpoint of ``run_dir`` (full SHA-256 check) to resume from.

    Each newer damaged checkpoint is renamed to ``step-N.damaged`` and reported with
    ``log`` ("checkpoint step-N is damaged (...); falling back to step-M"), so that
    later pruning and ``--resume`` never pick it. None when the run has no checkpoint.

    Raises:
        CheckpointError: when the run has checkpoints but every one is damaged.
    """
    found = list_checkpoints(run_dir)
    damaged: list[tuple[str, str]] = []
    chosen = None
    for _, path in reversed(found):
        reason = verify_checkpoint(path)
        if reason is None:
            chosen = path
            break
        damaged.append((path, reason))
    if damaged and chosen is None:
        path, reason = damaged[0]
        raise CheckpointError(
            f"every checkpoint of {run_dir} is damaged (the newest, {os.path.basename(path)}: "
            f"{reason}); start a new run or restore the files"
        )
    for path, reason in damaged:
        aside = _move_aside(path)
        log(
            f"checkpoint {os.path.basename(path)} is damaged ({reason}); moved it to {os.path.basename(aside)} "
            f"and falling back to {os.path.basename(chosen)}"
        )
    return chosen


def remove_stale_temporaries(run_dir: str) -> list[str]:
    """Remove what a killed writer left in ``run_dir``; return the removed paths.

    ``checkpoints/.step-N.*.tmp`` directories (a checkpoint being assembled), and
    ``.NAME.*.tmp`` files next to ``config.yaml``/``tokenizer.json`` (an atomic file write).
    A ``step-N.old`` directory (the previous version while ``step-N`` was being replaced)
    is put back as ``step-N`` when the kill came between the two renames, else removed.
    Call it only while holding the run's lock.
    """
    removed = []
    for name in os.listdir(run_dir) if os.path.isdir(run_dir) else []:
        full = os.path.join(run_dir, name)
        if name.startswith(".") and name.endswith(".tmp") and os.path.isfile(full):
            os.remove(full)
            removed.append(full)
    root = os.path.join(run_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return removed
    for name in sorted(os.listdir(root)):
        full = os.path.join(root, name)
        aside = _ASIDE_RE.match(name)
        if _TEMP_RE.match(name):
            shutil.rmtree(full, ignore_errors=True) if os.path.isdir(full) else os.remove(full)
            removed.append(full)
        elif aside:
            original = os.path.join(root, aside.group(1))
            if os.path.exists(original):
                shutil.rmtree(full, ignore_errors=True)
                removed.append(full)
            else:
                os.replace(full, original)
    return removed


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory, or a run directory (its latest intact checkpoint)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is neither a run directory nor a checkpoint directory")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        sharded = re.match(r"^dcp-\d{8}$", os.path.basename(os.path.normpath(path))) or any(
            re.match(r"^dcp-\d{8}$", n) for n in os.listdir(path)
        )
        if sharded and not list_checkpoints(path):
            raise CheckpointError(
                f"{path} holds a sharded (torchrun) checkpoint, which this command does not read; "
                f"write it as a Hugging Face directory with dsv3 export {path} OUT_DIR first"
            )
        if list_checkpoints(path):
            raise CheckpointError(f"every checkpoint in {path} is damaged (files missing or truncated)")
        raise CheckpointError(f"{path} holds no checkpoint (no config.json and no {CHECKPOINTS}/step-*)")
    return latest


_DISK_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EIO: "input/output error",
}


def pretrained_dir(path: str | os.PathLike) -> str:
    """The Hugging Face directory of ``path``: ``path`` itself, or a run directory's latest intact checkpoint."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    return path if os.path.isfile(os.path.join(path, "config.json")) else resolve_checkpoint(path)


def resolve_pretrained(path: str | os.PathLike) -> tuple[str, ModelConfig, dict[str, str]]:
    """The checkpoint directory of ``path`` (a run directory: its latest intact checkpoint), its config
    (without MTP modules when the checkpoint has no weights for them, with a warning) and its tensor files."""
    path = pretrained_dir(path)
    return (path, *read_pretrained(path))


def from_pretrained(path: str | os.PathLike, **kwargs) -> DeepseekV3ForCausalLM:
    """:meth:`DeepseekV3ForCausalLM.from_pretrained` of a Hugging Face directory or of a dsv3 run directory
    (its latest intact checkpoint); ``kwargs``: ``dtype``, ``device``, ``strict``."""
    return DeepseekV3ForCausalLM.from_pretrained(pretrained_dir(path), **kwargs)


def _write_failure(exc: BaseException) -> str | None:
    """A short reason when ``exc`` is a failed file write (full disk, quota, permissions), else None."""
    if isinstance(exc, OSError):
        return _DISK_ERRNOS.get(exc.errno, exc.strerror or str(exc))
    if type(exc).__name__ == "SafetensorError":  # safetensors reports I/O errors as its own type
        text = str(exc)
        for code, reason in _DISK_ERRNOS.items():
            if os.strerror(code).lower() in text.lower() or reason in text.lower():
                return reason
        return text.splitlines()[0] if text else "safetensors write error"
    return None


def save_checkpoint(
    run_dir: str,
    step: int,
    *,
    model,
    optimizer=None,
    loader_state: dict | None = None,
    tokenizer=None,
    ema=None,
    extra: dict[str, Any] | None = None,
    keep_last: int | None = None,
    before_commit=None,
) -> str:
    """Write the complete training state after ``step`` optimizer steps; return its directory.

    ``before_commit`` (tests only) is called with the temporary directory just before
    it is renamed into place, to simulate a kill in the middle of a write.

    Raises:
        CheckpointError: when the write fails (a full disk, a quota, lost permissions);
            the temporary directory is removed and every earlier checkpoint is untouched.
    """
    path = checkpoint_dir(run_dir, step)
    try:
        with atomic_dir(path) as tmp:
            _write_checkpoint_files(
                tmp,
                step,
                model=model,
                optimizer=optimizer,
                loader_state=loader_state,
                tokenizer=tokenizer,
                ema=ema,
                extra=extra,
                run_dir=run_dir,
            )
            if before_commit is not None:
                before_commit(tmp)
    except Exception as exc:
        reason = _write_failure(exc)
        if reason is None:
            raise
        previous = latest_checkpoint(run_dir)
        kept = (
            f"the previous checkpoint {os.path.basename(previous)} is intact"
            if previous
            else "no earlier checkpoint exists"
        )
        raise CheckpointError(
            f"cannot write checkpoint {os.path.basename(path)} in {os.path.dirname(path)} "
            f"({reason}); {kept}; free space and continue with dsv3 train --resume "
            f"{run_dir}"
        ) from None
    if keep_last:
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def _write_checkpoint_files(
    tmp: str, step: int, *, model, optimizer, loader_state, tokenizer, ema, extra, run_dir: str
) -> None:
    write_pretrained(model, tmp)
    if tokenizer is not None:
        tokenizer.save(os.path.join(tmp, "tokenizer.json"))
    template = os.path.join(run_dir, CHAT_TEMPLATE_FILE)
    if os.path.isfile(template):  # a fine-tuning run: its chat template goes with every checkpoint
        shutil.copyfile(template, os.path.join(tmp, CHAT_TEMPLATE_FILE))
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
    write_manifest(tmp, step)


def load_checkpoint_state(
    path: str, *, model=None, optimizer=None, ema=None, restore_rng: bool = True
) -> dict[str, Any]:
    """Restore what is given from checkpoint ``path``; return the JSON state (step, loader, extra)."""
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
