"""Sharded checkpoints with torch.distributed.checkpoint (DCP) under global names.

Every rank writes its part in parallel; a checkpoint is a directory ``dcp-{step:08d}`` written
as ``dcp-{step:08d}.tmp`` and renamed by rank 0 once every rank has finished and ``meta.json``
(step, data position, counters) is in place, so a checkpoint is complete or ignored.

Keys are global, so a checkpoint loads into any layout (``ep`` 4 -> 2 -> 1 process):

* ``model/{name}`` for dense parameters and buffers (router biases included), replicated
  tensors written once (DCP de-duplicates them);
* ``model/{module}.experts.{e}.{gate_up_proj|down_proj}`` per routed expert, ``e`` its global
  index, written by the rank that holds it;
* ``optim/{param key}/{master|exp_avg|exp_avg_sq}`` the ZeRO-1 state, written by each rank as
  its own row chunks with their global offsets (:class:`RowChunk`: DCP chunk metadata, nothing
  gathered; moments in their own dtype), so a reader with another dp/edp reads the rows of its
  chunks from whichever chunks overlap them; and ``optim/step``;
* ``ema/{param key}`` the FP32 shadows of the CPU EMA (:class:`dsv3.memory.ema.CPUEMA`, report
  3.2.3) under the same global keys as ``model/`` (routed experts per global index), written when
  the run keeps an EMA; its update count is in ``meta.json`` (``"ema": {"num_updates": n}``).

Loading gives DCP only what this rank holds (its parameters, its chunks, its shadows), as the
tensors themselves: DCP reads those keys (and rows) in place, so neither a save nor a load holds
a second copy of anything. ``dsv3 export`` and ``dsv3 generate`` load a sharded checkpoint into a
model built once at full size (:func:`export_checkpoint`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys

import torch

from dsv3.checkpoint.manifest import check_sharded, select_sharded, shard_entries, write_sharded_manifest
from dsv3.errors import CheckpointError
from dsv3.model.moe import Experts
from dsv3.parallel.zero import rows_shape

_NAME = re.compile(r"^dcp-(\d{8})$")
META = "meta.json"


class RowChunk(torch.Tensor):
    """Rows ``[r0, r0 + rows)`` of a global ``[R, W]`` tensor that only this rank holds, for DCP.

    DCP writes the local rows as one chunk with its global offset (chunk metadata, as a DTensor
    shard is written) and, on load, reads into them the overlapping parts of whatever chunks the
    checkpoint holds, so ZeRO-1 state is saved without gathering and reshards on load. Only the
    three ``_Checkpointable`` hooks of DCP are implemented: it is not a tensor to compute with.

    Args:
        local: the rows this rank holds, ``[rows, W]`` (saved from, or loaded into, in place).
        offsets: the global offset of ``local``, ``(r0, 0)``.
        shape: the global shape ``(R, W)``.
    """

    @staticmethod
    def __new__(cls, local: torch.Tensor, offsets, shape):
        out = torch.Tensor._make_wrapper_subclass(cls, torch.Size(shape), dtype=local.dtype, device=local.device)
        out.local, out.offsets = local, torch.Size(offsets)
        return out

    def __create_write_items__(self, fqn: str, obj) -> list:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
        from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

        chunk = ChunkStorageMetadata(offsets=self.offsets, sizes=self.local.size())
        return [
            WriteItem(
                index=MetadataIndex(fqn, self.offsets),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=chunk, properties=TensorProperties.create_from_tensor(self.local), size=self.size()
                ),
            )
        ]

    def __create_chunk_list__(self) -> list:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

        return [ChunkStorageMetadata(offsets=self.offsets, sizes=self.local.size())]

    def __get_tensor_shard__(self, index) -> torch.Tensor:
        return self.local

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.detach.default:
            return args[0]
        raise NotImplementedError(f"RowChunk is a checkpoint view, not a tensor to compute with ({func})")


def _expert_modules(model) -> dict[str, Experts]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Experts)}


def _param_keys(model) -> list[tuple[str, torch.Tensor, int | None]]:
    """(global key, tensor, row in the local expert block or None) for every model tensor."""
    experts = _expert_modules(model)
    out = []
    for name, t in model.state_dict(keep_vars=True).items():
        mod, _, leaf = name.rpartition(".")
        if mod in experts:
            m = experts[mod]
            for i in range(t.shape[0]):
                out.append((f"{mod}.{m.expert_offset + i}.{leaf}", t, i))
        else:
            out.append((name, t, None))
    return out


def _local_name(key: str, row: int | None) -> str:
    """The model's own name of global key ``key`` (``row``: its expert's row in the local block, or None)."""
    return key if row is None else key.rsplit(".", 2)[0] + "." + key.rsplit(".", 1)[1]


def _exact(t: torch.Tensor) -> torch.Tensor:
    """``t`` (or a :class:`RowChunk`'s rows) aliased as a tensor whose storage is exactly its bytes: no copy.

    DCP clones every tensor whose storage is larger than the tensor itself (an expert of a stacked
    block, a ZeRO-1 chunk of a parameter) and keeps each clone until the rank's file is written, which
    would hold a second copy of what the rank saves. A contiguous CPU view gets a storage of its own
    extent instead (through NumPy, which shares the memory)."""
    if isinstance(t, RowChunk):
        return RowChunk(_exact(t.local), t.offsets, t.shape)
    if t.device.type != "cpu" or not t.is_contiguous() or t.untyped_storage().nbytes() == t.nbytes or not t.numel():
        return t
    raw = torch.from_numpy(t.detach().reshape(-1).view(torch.uint8).numpy())
    return raw.view(t.dtype).view(t.shape)


_KINDS = ("master", "exp_avg", "exp_avg_sq")


def _row_pieces(s, start: int, end: int):
    """How rows ``[start, end)`` of parameter ``s``'s 2-D view split over its global keys.

    Yields ``(key, key_shape, offsets, lo, hi)``: rows ``[lo, hi)`` of the chunk are the part of
    key ``key`` (global shape ``key_shape``) at ``offsets``. Dense parameters are one key shaped
    like the parameter (1-d and 2-d; others their 2-d view); a routed-expert block
    ``[n_local, a, W]`` is one key ``[a, W]`` per global expert."""
    rows, width = rows_shape(s.param.shape)
    if not s.expert:
        if s.param.dim() == 1:
            yield s.name, (rows,), (start,), 0, end - start
        else:
            yield s.name, (rows, width), (start, 0), 0, end - start
        return
    mod, _, leaf = s.name.rpartition(".")
    per = rows // s.param.shape[0]  # rows of one expert
    for e in range(start // per, -(-end // per)):
        lo, hi = max(start, e * per), min(end, (e + 1) * per)
        yield f"{mod}.{s.expert_offset + e}.{leaf}", (per, width), (lo - e * per, 0), lo - start, hi - start


def _optimizer_chunks(optimizer, *, for_load: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """``optim/{key}/{kind}`` of this rank's own ZeRO-1 chunks, as :class:`RowChunk` with global offsets.

    Nothing is gathered: saving writes each rank's chunks (master, moments in their own dtype), and
    loading reads into them the overlapping rows of a checkpoint of any layout. Returns
    ``(state, moments)``; ``moments`` maps each master chunk to its ``{"exp_avg", "exp_avg_sq"}``
    (fresh tensors when loading, installed by :func:`_install_moments`)."""
    out, moments = {}, {}
    dtype = optimizer.inner.moments_dtype
    for s in optimizer.shards:
        if s.master is None:
            continue
        start, end = s.bounds[optimizer.ctx.edp_rank if s.expert else optimizer.ctx.dp_rank]
        st = optimizer.inner.state.get(s.master, {})
        tensors = {"master": s.master}
        for kind in _KINDS[1:]:
            have = None if for_load else st.get(kind)
            tensors[kind] = have if have is not None else torch.zeros(s.master.shape, dtype=dtype)
        moments[s.master] = {k: tensors[k] for k in _KINDS[1:]}
        for key, shape, offsets, lo, hi in _row_pieces(s, start, end):
            for kind, t in tensors.items():
                local = t[lo:hi] if len(shape) == 2 else t[lo:hi].reshape(-1)
                out[f"optim/{key}/{kind}"] = RowChunk(local, offsets, shape)
    step = max((int(st.get("step", 0)) for st in optimizer.inner.state.values()), default=0)
    out["optim/step"] = torch.tensor(step, dtype=torch.int64)
    return out, moments


def _install_moments(optimizer, moments: dict, step: int) -> None:
    """Make the loaded moment chunks the inner AdamW's state at ``step`` (none at step 0)."""
    optimizer.inner.state.clear()
    if step > 0:
        for master, m in moments.items():
            optimizer.inner.state[master] = {"step": step, **m}


def _attach_offsets(model, optimizer) -> None:
    experts = _expert_modules(model)
    for s in optimizer.shards:
        mod = s.name.rpartition(".")[0]
        if mod in experts:
            s.expert_offset = experts[mod].expert_offset


def model_state(model, held=None) -> dict[str, torch.Tensor]:
    """``model/...`` tensors under global names (views of the model's own tensors).

    ``held``: under pipeline parallelism the parameter names this rank holds fresh (its stages);
    other parameters (stale copies of other devices' stages) are left out, buffers are kept.
    """
    skip = set()
    if held is not None:
        skip = {n for n, _ in model.named_parameters() if n not in held}
    out = {}
    for k, t, i in _param_keys(model):
        if _local_name(k, i) in skip:
            continue
        out[f"model/{k}"] = t.detach() if i is None else t.detach()[i]
    return out


def save_sharded(
    run_dir: str, step: int, *, model, optimizer, ctx, extra: dict | None = None, keep_last: int | None = None, ema=None
) -> str:
    """Write ``run_dir/dcp-{step:08d}`` from every rank (collective); returns its path.

    ``ema``: the run's :class:`~dsv3.memory.ema.CPUEMA` (saved as ``ema/...`` when given)."""
    import torch.distributed.checkpoint as dcp

    _attach_offsets(model, optimizer)
    final = os.path.join(run_dir, f"dcp-{step:08d}")
    tmp = final + ".tmp"
    if ctx.is_main and os.path.isdir(tmp):
        shutil.rmtree(tmp)
    ctx.barrier()
    state = model_state(model, getattr(optimizer, "held", None))  # pp: only this device's stages
    state.update(_optimizer_chunks(optimizer, for_load=False)[0])  # each rank its own chunks: nothing gathered

    if ema is not None:  # the EMA under the same global keys (ema/...), its update count in meta.json
        state.update(ema_state(model, ema, getattr(optimizer, "held", None)))
        extra = {"ema": {"num_updates": ema.num_updates}, **(extra or {})}
    dcp.save({k: _exact(v) for k, v in state.items()}, checkpoint_id=tmp)
    shards = _gather_shard_entries(tmp, ctx)  # each rank hashes its own shards: rank 0 never reads them all back
    if ctx.is_main:
        if os.path.isfile(os.path.join(run_dir, "tokenizer.json")):  # self-contained, as one-process checkpoints
            shutil.copyfile(os.path.join(run_dir, "tokenizer.json"), os.path.join(tmp, "tokenizer.json"))
        with open(os.path.join(tmp, META), "w") as fh:
            json.dump(
                {"step": step, "layout": {"pp": getattr(ctx, "pp", 1), "dp": ctx.dp, "ep": ctx.ep}, **(extra or {})}, fh
            )
        write_sharded_manifest(tmp, step, shards)  # sizes + SHA-256 of every file, verified on resume/export
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep_last:
            for old in sorted(list_checkpoints(run_dir))[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    ctx.barrier()
    return final


def _gather_shard_entries(directory: str, ctx) -> dict:
    """The manifest entries of every rank's shard files (collective; also the barrier after the save)."""
    entries = shard_entries(directory, ctx.rank)
    if not ctx.distributed:
        return entries
    import torch.distributed as dist

    gathered: list = [None] * ctx.world_size
    dist.all_gather_object(gathered, entries)
    return {name: entry for part in gathered for name, entry in part.items()}


def list_checkpoints(run_dir: str) -> list[str]:
    """Complete sharded checkpoints of ``run_dir`` (oldest first)."""
    if not os.path.isdir(run_dir):
        return []
    names = sorted(n for n in os.listdir(run_dir) if _NAME.match(n) and os.path.isfile(os.path.join(run_dir, n, META)))
    return [os.path.join(run_dir, n) for n in names]


def latest_sharded(run_dir: str, log=None, ctx=None) -> str | None:
    """The newest intact sharded checkpoint of ``run_dir`` (:func:`dsv3.checkpoint.manifest.select_sharded`):
    a newer damaged one is reported with ``log`` and skipped; every one damaged is a CheckpointError.

    ``ctx``: a distributed :class:`~dsv3.parallel.world.ParallelContext` (collective): rank 0 alone verifies
    (reads and hashes the files) and broadcasts its choice, or its error, to the other ranks."""
    if ctx is None or not ctx.distributed:
        return select_sharded(run_dir, log)
    import torch.distributed as dist

    box: list = [None]
    if ctx.is_main:
        try:
            box[0] = ("path", select_sharded(run_dir, log))
        except CheckpointError as exc:
            box[0] = ("error", str(exc))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise CheckpointError(value)
    return value


def _ema_keys(model, names) -> list[tuple[str, str, int | None]]:
    """(global key, EMA parameter name, row in the local expert block or None) of every averaged parameter."""
    experts = _expert_modules(model)
    shapes = dict(model.named_parameters())
    out = []
    for name in names:
        mod, _, leaf = name.rpartition(".")
        if mod in experts and name in shapes:
            m = experts[mod]
            out += [(f"{mod}.{m.expert_offset + i}.{leaf}", name, i) for i in range(shapes[name].shape[0])]
        else:
            out.append((name, name, None))
    return out


def ema_state(model, ema, held=None) -> dict[str, torch.Tensor]:
    """``ema/...`` FP32 CPU shadows of ``ema`` (a :class:`~dsv3.memory.ema.CPUEMA` over ``model``'s parameters,
    possibly expert-sharded) under global names; views of the live shadows (waits for the worker first).

    ``held``: as in :func:`model_state`, the parameter names this rank holds fresh (pipeline parallelism);
    the EMA of the others is left out (their holders write it)."""
    shadow = ema.shadow()
    return {
        f"ema/{key}": (shadow[name] if i is None else shadow[name][i])
        for key, name, i in _ema_keys(model, ema.names)
        if held is None or name in held
    }


def read_meta(path: str) -> dict:
    """The ``meta.json`` of the sharded checkpoint ``path`` (a CheckpointError when it is not complete)."""
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{path} is not a complete dsv3 sharded checkpoint (no {META}); pick another")
    try:
        with open(meta_path) as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"sharded checkpoint {path} is damaged: {META} cannot be read ({exc}); pick another "
            f"checkpoint (or pass the run directory to use its newest intact one)"
        ) from None


@torch.no_grad()
def load_sharded(path: str, *, model, optimizer, ctx, ema=None) -> dict:
    """Load a checkpoint written in any layout into this rank's (expert-sharded) model and ZeRO-1 optimizer.

    DCP reads only the keys it is given, straight into the tensors that hold them: this rank's
    parameters (under pipeline parallelism those of its stages), the rows of its ZeRO-1 chunks
    (:func:`_optimizer_chunks`) and its EMA shadows; nothing whole is assembled.
    ``ema``: the run's :class:`~dsv3.memory.ema.CPUEMA`, restored from the checkpoint's ``ema/...``
    (a checkpoint written without an EMA leaves it as built: the loaded weights, restarted).
    Returns the ``meta.json`` dict (step, data position, counters).
    """
    check_sharded(path, hashes=False)  # one line naming a missing or truncated file (hashed by latest_sharded)
    meta = read_meta(path)
    _attach_offsets(model, optimizer)
    state = model_state(model, getattr(optimizer, "held", None))
    chunks, moments = _optimizer_chunks(optimizer, for_load=True)
    state.update(chunks)
    with_ema = ema is not None and "ema" in meta
    if with_ema:
        state.update(ema_state(model, ema))  # views of the live shadows, loaded in place
    _dcp_load(state, path)
    _install_moments(optimizer, moments, int(state["optim/step"]))
    if with_ema:
        ema.load_state_dict({"shadow": ema.shadow(), "num_updates": int(meta["ema"]["num_updates"])})
    elif ema is not None:  # written without an EMA: it restarts from the loaded weights
        ema.load_state_dict(
            {"shadow": {n: p.detach() for n, p in model.named_parameters() if n in set(ema.names)}, "num_updates": 0}
        )
    return meta


def _dcp_load(state: dict, path: str) -> None:
    """``dcp.load`` with torch's internal errors on a damaged checkpoint (one written before manifests) as one line."""
    import torch.distributed.checkpoint as dcp

    try:
        dcp.load(state, checkpoint_id=path)
    except (RuntimeError, AssertionError, OSError, ValueError, KeyError, EOFError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(f"sharded checkpoint {path} cannot be read ({first}); pick another checkpoint") from None


@torch.no_grad()
def load_model_sharded(path: str, model) -> None:
    """Load only the model tensors of a sharded checkpoint into ``model`` (any expert block), in place."""
    check_sharded(path)  # one line naming a missing, truncated or altered file
    _dcp_load(model_state(model), path)


def resolve_sharded(checkpoint: str) -> str:
    """A ``dcp-*`` directory, or a run directory's newest intact one (a CheckpointError when it has none);
    a newer damaged one is skipped and said on stderr."""
    if os.path.isdir(checkpoint) and not os.path.isfile(os.path.join(checkpoint, META)):
        latest = latest_sharded(checkpoint, log=lambda line: print(line, file=sys.stderr))
        if latest is None:
            raise CheckpointError(f"{checkpoint} holds no complete sharded checkpoint (dcp-*/{META}); pass one")
        return latest
    check_sharded(checkpoint)  # a checkpoint named directly: one line naming a missing, truncated or altered file
    read_meta(checkpoint)
    return checkpoint


@torch.no_grad()
def load_full_model(checkpoint: str, *, device: str | torch.device = "cpu", use_ema: bool = False):
    """The whole model of a sharded checkpoint (any layout) in one process, built once on the meta device,
    given storage, and loaded in place: one copy of the model, never two.

    ``checkpoint``: a ``dcp-*`` directory inside its run directory (whose ``model_config.json`` describes
    the model). ``use_ema``: the EMA shadows (``ema/...``) replace the trained parameters."""
    from dsv3.config import ModelConfig
    from dsv3.model.transformer import empty_model

    config_path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "model_config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"no model_config.json next to {checkpoint}; use a checkpoint inside its run directory")
    model = empty_model(ModelConfig.from_json_file(config_path), device=device)
    load_model_sharded(checkpoint, model)
    if use_ema:
        if "ema" not in read_meta(checkpoint):
            raise CheckpointError(f"checkpoint {checkpoint} holds no EMA weights (train with --ema-decay)")
        params = {n for n, _ in model.named_parameters()}
        ema = {
            f"ema/{k}": (t.detach() if i is None else t.detach()[i])
            for k, t, i in _param_keys(model)
            if _local_name(k, i) in params
        }
        _dcp_load(ema, checkpoint)  # the shadows straight into the parameters
    return model


def export_checkpoint(checkpoint: str, out_dir: str, *, dtype: torch.dtype | None = None, use_ema: bool = False) -> str:
    """Write the Hugging Face safetensors directory of a sharded checkpoint (``dsv3 export``).

    ``checkpoint``: a ``dcp-*`` directory inside a run directory (whose ``model_config.json``
    describes the model) or a run directory (its latest intact sharded checkpoint; a one-process run: its
    latest intact ``step-*`` checkpoint, :func:`dsv3.checkpoint.export.export_unsharded`). Runs in one process,
    holding one copy of the model (:func:`load_full_model`) and one output shard at a time.
    ``out_dir`` gets the weights, the run's tokenizer and chat template, a generation config and
    ``export.json`` (:mod:`dsv3.checkpoint.export`); it must be new, empty or an earlier export.
    ``use_ema``: the EMA weights (under pipeline parallelism every rank wrote those of its own stages).
    """
    from dsv3.checkpoint.export import check_export_dir, export_unsharded, write_export

    check_export_dir(out_dir, checkpoint)  # never into the run, a file or a foreign directory: refused before any work
    if os.path.isdir(checkpoint) and not _NAME.match(os.path.basename(os.path.normpath(checkpoint))):
        latest = latest_sharded(checkpoint, log=lambda line: print(line, file=sys.stderr))
        if latest is None:  # a one-process run (or one of its step-* checkpoints)
            if use_ema:
                raise CheckpointError(
                    f"{checkpoint} holds no sharded checkpoint; --use-ema exports the EMA of "
                    f"sharded (torchrun) checkpoints"
                )
            return export_unsharded(checkpoint, out_dir, dtype=dtype)
        checkpoint = latest
    model = load_full_model(resolve_sharded(checkpoint), use_ema=use_ema)
    return write_export(
        model, out_dir, run_dir=os.path.dirname(os.path.abspath(checkpoint)), source=checkpoint, dtype=dtype
    )
