"""One :class:`Checkpointer` for every checkpoint format of a run.

Formats (each keeps its own module; this one decides which, and loads only what a rank holds):

- one process: ``RUN_DIR/checkpoints/step-N/``, a Hugging Face directory plus optimizer, RNG,
  EMA and training state with a manifest (:mod:`dsv3.checkpoint.state`);
- torchrun: ``RUN_DIR/dcp-N/``, a sharded DCP directory under global names
  (:mod:`dsv3.parallel.checkpoint`): each rank writes its own parameters and ZeRO-1 chunks;
- ``--init-from``: a Hugging Face checkpoint (safetensors, FP8 or not, or a run directory).

A run continues from the newest checkpoint of either format in any layout: one process <->
torchrun, any ep / dp / pp. Under torchrun a rank reads only what it holds: its parameters,
its expert rows (lazy safetensors slices), its ZeRO-1 chunks and EMA shadows.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dsv3.checkpoint.state import (
    STATE_FILE,
    from_pretrained,
    join_tensors,
    latest_checkpoint,
    load_checkpoint_state,
    resolve_checkpoint,
    save_checkpoint,
    select_resume_checkpoint,
    set_rng_state,
)
from dsv3.errors import CheckpointError
from dsv3.model.hf import checkpoint_files, expert_blocks, load_state_into
from dsv3.parallel import checkpoint as dcp_format

_STEP = re.compile(r"(\d+)$")


@dataclass
class Restored:
    """What a restore brings back besides the tensors: where the run continues."""

    checkpoint: str
    step: int
    loader: dict | None
    nonfinite: int = 0
    val_losses: list = field(default_factory=list)

    @classmethod
    def of(cls, checkpoint: str, step: int, loader: dict | None, extra: dict) -> Restored:
        """From a checkpoint's saved ``extra`` (its ``nonfinite`` count and ``val_losses``)."""
        return cls(checkpoint, step, loader, extra.get("nonfinite", 0), [tuple(v) for v in extra.get("val_losses", [])])


class Checkpointer:
    """Save and restore a run in the format of its layout.

    Args:
        run_dir: the run directory.
        ctx: the :class:`~dsv3.parallel.world.ParallelContext` (None or ``single()``: one process).
        keep_last: keep only this many checkpoints (None: all).
        tokenizer: written into one-process checkpoints (they are self-contained).
        log: where to say that a damaged checkpoint was moved aside.
    """

    def __init__(
        self,
        run_dir: str,
        ctx=None,
        *,
        keep_last: int | None = None,
        tokenizer=None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.run_dir, self.ctx, self.keep_last, self.tokenizer, self.log = run_dir, ctx, keep_last, tokenizer, log
        # sharded (DCP) checkpoints under torchrun; one process continuing a torchrun run goes on writing them
        self.sharded = ctx is not None and ctx.world_size > 1

    # ------------------------------------------------------------------ save
    def save(
        self, step: int, model, optimizer, ema=None, loader_state: dict | None = None, extra: dict | None = None
    ) -> str:
        """Write the checkpoint after ``step`` optimizer steps (collective under torchrun); returns its path."""
        if self.sharded:
            return dcp_format.save_sharded(
                self.run_dir,
                step,
                model=model,
                optimizer=optimizer,
                ctx=self.ctx,
                extra={"loader": loader_state, **(extra or {})},
                keep_last=self.keep_last,
                ema=ema,
            )
        return save_checkpoint(
            self.run_dir,
            step,
            model=model,
            optimizer=optimizer,
            loader_state=loader_state,
            tokenizer=self.tokenizer,
            ema=ema,
            extra=extra,
            keep_last=self.keep_last,
        )

    # ------------------------------------------------------------------ restore
    def latest(self, *, select: bool = False, hashes: bool = True) -> str | None:
        """The newest checkpoint of the run, of either format (a ``step-N`` or a ``dcp-N`` directory).

        ``select``: the lock owner's choice, which moves damaged one-process checkpoints aside and says so
        (:func:`~dsv3.checkpoint.state.select_resume_checkpoint`); otherwise they are only skipped (checked
        by SHA-256, or by size when not ``hashes``)."""
        one = (
            select_resume_checkpoint(self.run_dir, self.log)
            if select
            else latest_checkpoint(self.run_dir, hashes=hashes)
        )
        sharded = dcp_format.latest_sharded(self.run_dir, log=self.log if select else None)  # damaged ones skipped
        found = [p for p in (one, sharded) if p is not None]
        return max(found, key=lambda p: int(_STEP.search(os.path.basename(p)).group(1)), default=None)

    def restore(self, model, optimizer, ema=None, *, checkpoint: str | None = None) -> Restored | None:
        """Load ``checkpoint`` (default: :meth:`latest`) into this rank's model, ZeRO-1 optimizer
        (:class:`~dsv3.parallel.zero.ZeroAdamW`, one process too) and EMA.

        Any format into any layout; under torchrun each rank reads only what it holds. Returns None
        when the run has no checkpoint yet."""
        path = checkpoint or self.latest()
        if path is None:
            return None
        if os.path.isfile(os.path.join(path, dcp_format.META)):
            return self._restore_sharded(path, model, optimizer, ema)
        if self.sharded:
            return _restore_one_process_into_shards(path, model, optimizer, ema)
        state = load_checkpoint_state(path, model=model, optimizer=optimizer, ema=ema)
        return Restored.of(path, state["step"], state.get("loader"), state.get("extra", {}))

    def _restore_sharded(self, path: str, model, optimizer, ema) -> Restored:
        meta = dcp_format.load_sharded(path, model=model, optimizer=optimizer, ctx=optimizer.ctx, ema=ema)
        self.sharded = True
        return Restored.of(path, meta["step"], meta.get("loader"), meta)

    # ------------------------------------------------------------------ init-from, export
    @staticmethod
    def init_from(path: str, model, *, partial: bool = True) -> int:
        """Load the weights of ``path`` (a Hugging Face directory, FP8 or not; or a run directory: its
        newest checkpoint) into ``model``.

        ``partial``: ``model`` may hold only a rank's part (expert block, stages); only the held tensors
        and expert rows are read, and each must be found. Without it every checkpoint tensor must have a
        place in ``model`` (one process). Returns the bytes read."""
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
            newest = Checkpointer(path).latest(hashes=False)
            if newest is None:
                resolve_checkpoint(path)  # says why in one line
            path = newest  # type: ignore[assignment]
        if os.path.isfile(os.path.join(path, dcp_format.META)):
            dcp_format.load_model_sharded(path, model)
            return 0
        return load_state_into(model, path, files=checkpoint_files(path), partial=partial)

    @staticmethod
    def export(checkpoint: str, out_dir: str, *, dtype: torch.dtype | None = None, use_ema: bool = False) -> str:
        """Write a sharded checkpoint (or a run directory's newest) as a Hugging Face directory (``dsv3 export``);
        ``use_ema``: its EMA weights."""
        return dcp_format.export_checkpoint(checkpoint, out_dir, dtype=dtype, use_ema=use_ema)

    @staticmethod
    def load_for_inference(path: str, *, device: str | torch.device = "cpu", use_ema: bool = False):
        """``(model, checkpoint)``: the whole model of ``path`` for generation or evaluation, in one process.

        ``path``: a Hugging Face directory, a one-process checkpoint, a ``dcp-*`` directory or a run
        directory (its newest checkpoint of either format). The model is built once and loaded in place
        (a sharded checkpoint never passes through a second copy); ``use_ema``: the EMA weights."""
        checkpoint = path
        if (
            os.path.isdir(path)
            and not os.path.isfile(os.path.join(path, "config.json"))
            and not os.path.isfile(os.path.join(path, dcp_format.META))
        ):
            checkpoint = Checkpointer(path).latest(hashes=False) or resolve_checkpoint(path)
        if os.path.isfile(os.path.join(checkpoint, dcp_format.META)):
            return dcp_format.load_full_model(checkpoint, device=device, use_ema=use_ema), checkpoint
        model = from_pretrained(checkpoint, device=device)
        if use_ema:
            _ema_into_parameters(checkpoint, model)
        return model, checkpoint


# ---------------------------------------------------------------------------- helpers
@torch.no_grad()
def _ema_into_parameters(checkpoint: str, model) -> None:
    """The EMA shadows of a one-process checkpoint in place of ``model``'s parameters."""
    ema_file = os.path.join(checkpoint, "ema.safetensors")
    if not os.path.isfile(ema_file):
        raise CheckpointError(f"checkpoint {checkpoint} holds no EMA weights (train with --ema-decay)")
    with open(os.path.join(checkpoint, STATE_FILE), encoding="utf-8") as fh:
        keys = join_tensors(json.load(fh)["ema"], _Keys())["shadow"]
    read = _rows_reader(ema_file)
    for name, p in model.named_parameters():
        if name in keys:
            p.copy_(read(keys[name], None))


class _Keys(dict):
    """A mapping that gives back each tensor's key: :func:`join_tensors` over it yields the structure only."""

    def __missing__(self, key: str) -> str:
        return key


def _rows_reader(path: str) -> Callable[[str, slice | None], torch.Tensor]:
    """``read(key, rows)``: dim-0 ``rows`` of tensor ``key`` of the safetensors file ``path`` (lazy slices)."""
    f = safe_open(path, framework="pt")

    def read(key: str, rows: slice | None) -> torch.Tensor:
        return f.get_tensor(key) if rows is None else f.get_slice(key)[rows]

    return read


@torch.no_grad()
def _restore_one_process_into_shards(path: str, model, optimizer, ema) -> Restored:
    """A one-process checkpoint into a rank's model and ZeRO-1 optimizer (a run continued under torchrun),
    reading only this rank's tensors, expert rows, optimizer chunks and EMA shadows."""
    try:
        with open(os.path.join(path, STATE_FILE), encoding="utf-8") as fh:
            state = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path} has no readable {STATE_FILE} ({exc})") from None
    load_state_into(model, path, partial=True)
    blocks = {k: off for k, (off, _) in expert_blocks(model).items()}
    if "optimizer" not in state:
        raise CheckpointError(f"checkpoint {path} holds no optimizer state")
    optim = join_tensors(state["optimizer"], _Keys())
    names = [n for g in optim["param_groups"] for n in g.get("param_names", [])]
    ids = [i for g in optim["param_groups"] for i in g["params"]]
    by_name = {n: optim["state"].get(i, {}) for n, i in zip(names, ids)}
    read = _rows_reader(os.path.join(path, "optimizer.safetensors"))
    step = max((int(st.get("step", 0)) for st in by_name.values()), default=0)
    optimizer.import_unsharded(
        lambda name, kind, rows: read(by_name[name][kind], rows) if kind in by_name.get(name, {}) else None,
        step,
        blocks,
    )
    if ema is not None:
        _ema_from_one_process(path, state, model, ema, blocks)
    set_rng_state(state["rng"], load_file(os.path.join(path, "rng.safetensors")))
    return Restored.of(path, state["step"], state.get("loader"), state.get("extra", {}))


def _ema_from_one_process(path: str, state: dict, model, ema, blocks: dict[str, int]) -> None:
    """This rank's EMA shadows (its expert rows) from a one-process checkpoint's ``ema.safetensors``."""
    if "ema" not in state:
        raise CheckpointError(f"checkpoint {path} holds no EMA weights; start the run without --ema-decay")
    keys = join_tensors(state["ema"], _Keys())
    read = _rows_reader(os.path.join(path, "ema.safetensors"))
    params = dict(model.named_parameters())
    shadow = {}
    for name in ema.names:
        key = keys["shadow"][name]
        off = blocks.get(name)
        shadow[name] = read(key, None if off is None else slice(off, off + params[name].shape[0]))
    ema.load_state_dict({"shadow": shadow, "num_updates": int(keys.get("num_updates", 0))})
