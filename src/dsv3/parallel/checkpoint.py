"""Sharded checkpoints with torch.distributed.checkpoint (DCP) under global names.

Every rank writes its part in parallel; a checkpoint is a directory ``dcp-{step:08d}`` written
as ``dcp-{step:08d}.tmp`` and renamed by rank 0 once every rank has finished and ``meta.json``
(step, data position, counters) is in place, so a checkpoint is complete or ignored.

Keys are global, so a checkpoint loads into any layout (``ep`` 4 -> 2 -> 1 process):

* ``model/{name}`` for dense parameters and buffers (router biases included), replicated
  tensors written once (DCP de-duplicates them);
* ``model/{module}.experts.{e}.{gate_up_proj|down_proj}`` per routed expert, ``e`` its global
  index, written by the rank that holds it;
* ``optim/{param key}/{master|exp_avg|exp_avg_sq}`` the ZeRO-1 state gathered to whole tensors
  per key (so a reader with another dp/edp cuts its own chunks), and ``optim/step``;
* ``ema/{param key}`` the FP32 shadows of the CPU EMA (:class:`dsv3.memory.ema.CPUEMA`, report
  3.2.3) under the same global keys as ``model/`` (routed experts per global index), written when
  the run keeps an EMA; its update count is in ``meta.json`` (``"ema": {"num_updates": n}``).

(Gathering the optimizer state to whole tensors costs one parameter's worth of memory per key at
a time; the V3-scale path would save ``DTensor`` chunks instead.)
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


def _gather_rows(chunk: torch.Tensor | None, full_like: torch.Tensor, bounds, me: int, n: int, group) -> torch.Tensor:
    """Whole tensor from per-rank row chunks of its 2-D view ``rows_shape`` (``bounds`` per rank of ``group``)."""
    rows, width = rows_shape(full_like.shape)
    full = torch.zeros(rows, width, dtype=torch.float32)
    s, e = bounds[me]
    if chunk is not None and e > s:
        full[s:e] = chunk.reshape(e - s, width).float().cpu()
    if n > 1:
        import torch.distributed as dist

        dist.all_reduce(full, group=group)  # disjoint chunks: the sum is the concatenation
    return full.view(full_like.shape)


def _optimizer_tensors(optimizer, ctx, *, for_load: bool) -> dict[str, torch.Tensor]:
    """``optim/...`` whole tensors of every parameter (gathered for saving, or empty buffers for loading)."""
    out = {}
    for s in optimizer.shards:
        n, me = (ctx.edp, ctx.edp_rank) if s.expert else (ctx.dp, ctx.dp_rank)
        group = ctx.edp_group if s.expert else ctx.dp_group
        st = optimizer.inner.state.get(s.master, {}) if s.master is not None else {}
        keys = _shard_keys(s)
        for kind in ("master", "exp_avg", "exp_avg_sq"):
            if for_load:
                full = torch.zeros(s.param.shape, dtype=torch.float32)
            else:
                chunk = s.master if kind == "master" else st.get(kind)
                full = _gather_rows(chunk, s.param, s.bounds, me, n, group)
            for key, sub in keys(full):
                out[f"optim/{key}/{kind}"] = sub
    step = 0
    for st in optimizer.inner.state.values():
        step = max(step, int(st.get("step", 0)))
    out["optim/step"] = torch.tensor(step, dtype=torch.int64)
    return out


def _shard_keys(s):
    """How a parameter's whole tensor splits into global keys (per expert for routed experts)."""
    mod, _, leaf = s.name.rpartition(".")
    offset = getattr(s, "expert_offset", None)

    def split(full):
        if not s.expert:
            return [(s.name, full)]
        return [(f"{mod}.{offset + i}.{leaf}", full[i]) for i in range(full.shape[0])]

    return split


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
        local = k if i is None else k.rsplit(".", 2)[0] + "." + k.rsplit(".", 1)[1]
        if local in skip:
            continue
        out[f"model/{k}"] = t.detach() if i is None else t.detach()[i]
    return out


def save_sharded(run_dir: str, step: int, *, model, optimizer, ctx, extra: dict | None = None,
                 keep_last: int | None = None, ema=None) -> str:
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
    state.update(_optimizer_tensors(optimizer, ctx, for_load=False))

    if ema is not None:  # the EMA under the same global keys (ema/...), its update count in meta.json
        state.update(ema_state(model, ema, getattr(optimizer, "held", None)))
        extra = {"ema": {"num_updates": ema.num_updates}, **(extra or {})}
    dcp.save(state, checkpoint_id=tmp)
    shards = _gather_shard_entries(tmp, ctx)  # each rank hashes its own shards: rank 0 never reads them all back
    if ctx.is_main:
        with open(os.path.join(tmp, META), "w") as fh:
            json.dump({"step": step, "layout": {"pp": getattr(ctx, "pp", 1), "dp": ctx.dp, "ep": ctx.ep},
                       **(extra or {})}, fh)
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
    return {f"ema/{key}": (shadow[name] if i is None else shadow[name][i])
            for key, name, i in _ema_keys(model, ema.names) if held is None or name in held}


@torch.no_grad()
def load_ema_state(ema, model, tensors: dict[str, torch.Tensor], num_updates: int) -> None:
    """Restore ``ema`` from ``ema/{global key}`` tensors (:func:`ema_state`'s keys, any layout's checkpoint):
    each rank takes the experts it holds."""
    shadow = ema.shadow()
    out: dict[str, torch.Tensor] = {}
    for key, name, i in _ema_keys(model, ema.names):
        t = tensors[f"ema/{key}"]
        if i is None:
            out[name] = t
        else:
            out.setdefault(name, torch.empty_like(shadow[name]))[i].copy_(t)
    ema.load_state_dict({"shadow": out, "num_updates": num_updates})


def ema_from_unsharded(ema, model, state: dict) -> None:
    """Restore ``ema`` over an expert-sharded ``model`` from an unsharded EMA ``state_dict`` (a one-process
    checkpoint's: routed experts of all N_r experts in one tensor per layer)."""
    experts = _expert_modules(model)
    shadow = dict(state["shadow"])
    for name, p in model.named_parameters():
        mod = name.rpartition(".")[0]
        if mod in experts and name in shadow:
            off = experts[mod].expert_offset
            shadow[name] = shadow[name][off:off + p.shape[0]]
    ema.load_state_dict({"shadow": shadow, "num_updates": int(state.get("num_updates", 0))})


@torch.no_grad()
def load_sharded(path: str, *, model, optimizer, ctx, ema=None) -> dict:
    """Load a checkpoint written in any layout into this rank's (expert-sharded) model and ZeRO-1 optimizer.

    ``ema``: the run's :class:`~dsv3.memory.ema.CPUEMA`, restored from the checkpoint's ``ema/...``
    (a checkpoint written without an EMA leaves it as built: the loaded weights, restarted).
    Returns the ``meta.json`` dict (step, data position, counters).
    """
    check_sharded(path, hashes=False)  # one line naming a missing or truncated file (hashed by latest_sharded)
    meta_path = os.path.join(path, META)
    with open(meta_path) as fh:
        meta = json.load(fh)
    _attach_offsets(model, optimizer)
    state = {k: v.clone() for k, v in model_state(model).items()}
    state.update(_optimizer_tensors(optimizer, ctx, for_load=True))
    with_ema = ema is not None and "ema" in meta
    if with_ema:
        state.update({k: torch.empty_like(v) for k, v in ema_state(model, ema).items()})
    _dcp_load(state, path)
    for key, t, i in _param_keys(model):
        (t.data if i is None else t.data[i]).copy_(state[f"model/{key}"])
    step = int(state["optim/step"])
    for s in optimizer.shards:
        if s.master is None:
            continue
        me = optimizer.ctx.edp_rank if s.expert else optimizer.ctx.dp_rank
        start, end = s.bounds[me]
        parts = {}
        for kind in ("master", "exp_avg", "exp_avg_sq"):
            full = torch.stack([state[f"optim/{k}/{kind}"] for k, _ in _shard_keys(s)(s.param)]) if s.expert \
                else state[f"optim/{s.name}/{kind}"]
            parts[kind] = full.reshape(rows_shape(s.param.shape))[start:end]
        s.master.copy_(parts["master"])
        if step > 0:
            dtype = optimizer.inner.moments_dtype
            optimizer.inner.state[s.master] = {"step": step, "exp_avg": parts["exp_avg"].to(dtype).clone(),
                                               "exp_avg_sq": parts["exp_avg_sq"].to(dtype).clone()}
    if with_ema:
        load_ema_state(ema, model, state, int(meta["ema"]["num_updates"]))
    elif ema is not None:  # written without an EMA: it restarts from the loaded weights
        ema.load_state_dict({"shadow": {n: p.detach() for n, p in model.named_parameters() if n in set(ema.names)},
                             "num_updates": 0})
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
    """Load only the model tensors of a sharded checkpoint into ``model`` (any expert block)."""
    check_sharded(path)
    state = {k: v.clone() for k, v in model_state(model).items()}
    _dcp_load(state, path)
    for key, t, i in _param_keys(model):
        (t.data if i is None else t.data[i]).copy_(state[f"model/{key}"])


def export_checkpoint(checkpoint: str, out_dir: str, *, dtype: torch.dtype | None = None) -> str:
    """Write the Hugging Face safetensors directory of a sharded checkpoint (``dsv3 export``).

    ``checkpoint``: a ``dcp-*`` directory inside a run directory (whose ``model_config.json``
    describes the model) or a run directory (its latest intact sharded checkpoint; a one-process run: its
    latest intact ``step-*`` checkpoint, :func:`dsv3.checkpoint.export.export_unsharded`). Runs in one process.
    ``out_dir`` gets the weights, the run's tokenizer and chat template, a generation config and
    ``export.json`` (:mod:`dsv3.checkpoint.export`); it must be new, empty or an earlier export.
    """
    from dsv3.checkpoint.export import check_export_dir, export_unsharded, write_export
    from dsv3.config import ModelConfig
    from dsv3.model import DeepseekV3ForCausalLM

    check_export_dir(out_dir, checkpoint)  # never into the run, a file or a foreign directory: refused before any work
    if os.path.isdir(checkpoint) and not _NAME.match(os.path.basename(os.path.normpath(checkpoint))):
        latest = latest_sharded(checkpoint, log=lambda line: print(line, file=sys.stderr))
        if latest is None:  # a one-process run (or one of its step-* checkpoints)
            return export_unsharded(checkpoint, out_dir, dtype=dtype)
        checkpoint = latest
    config_path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "model_config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"no model_config.json next to {checkpoint}; export a checkpoint inside its run directory")
    config = ModelConfig.from_json_file(config_path)
    model = DeepseekV3ForCausalLM(config)  # every parameter and router bias is overwritten below
    load_model_sharded(checkpoint, model)
    return write_export(model, out_dir, run_dir=os.path.dirname(os.path.abspath(checkpoint)), source=checkpoint,
                        dtype=dtype)
