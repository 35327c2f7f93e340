"""The model's Hugging Face weight format: safetensors in and out, names mapped one to one.

As the official repositories ship it: ``config.json``; ``model.safetensors`` or shards with
``model.safetensors.index.json``; per-expert tensors ``model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj``
(stacked here into ``experts.gate_up_proj`` [N_r, 2I, d] / ``down_proj`` [N_r, d, I]); MTP module k as
``model.layers.{L+k-1}.*`` with copies of the shared embedding and head; FP8 checkpoints (E4M3 weights and
``weight_scale_inv`` per 128x128 block) dequantised on load. Loading copies each tensor into a built model
as it is read (only the rows a rank holds); saving writes shard by shard into a temporary directory that
is renamed into place. Details: docs/model.md.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsv3.config import ModelConfig
from dsv3.errors import CheckpointError, ConfigError
from dsv3.model.moe import Experts
from dsv3.utils.io import atomic_dir
from dsv3.utils.size import parse_size

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


# ----------------------------------------------------------------------------- file access
def checkpoint_files(path: str) -> dict[str, str]:
    """Map each tensor name of the checkpoint directory ``path`` to the file holding it."""
    index = os.path.join(path, INDEX_NAME)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as fh:
                weight_map = json.load(fh)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index ({exc})") from None
        missing = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(path, f))})
        if missing:
            raise CheckpointError(f"shard {missing[0]} named in {INDEX_NAME} is missing from {path}")
        return {name: os.path.join(path, f) for name, f in weight_map.items()}
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if SINGLE_NAME in files:
        files = [SINGLE_NAME]  # a training checkpoint also holds optimizer/rng/ema .safetensors
    elif any(f.startswith("model") for f in files):
        files = [f for f in files if f.startswith("model")]
    if not files:
        raise CheckpointError(f"no .safetensors weights in {path} (pickle checkpoints are not read)")
    out: dict[str, str] = {}
    for f in files:
        full = os.path.join(path, f)
        try:
            with safe_open(full, framework="pt") as sf:
                for name in sf.keys():
                    out[name] = full
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{full} is not a readable safetensors file ({exc})") from None
    return out


class _Reader:
    """Lazily opened safetensors files; tensors are read one at a time (memory-mapped).

    ``bytes_read`` counts the bytes of the tensors (and slices) read so far, so a caller can
    check that a rank read only what it holds."""

    def __init__(self, files: dict[str, str]) -> None:
        self.files = files
        self._open: dict[str, object] = {}
        self.bytes_read = 0

    def _file(self, name: str):
        path = self.files[name]
        if path not in self._open:
            self._open[path] = safe_open(path, framework="pt")
        return self._open[path]

    def get(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """Tensor ``name``, or only its dim-0 ``rows`` (a lazy slice: the other rows are not read)."""
        f = self._file(name)
        t = f.get_tensor(name) if rows is None else f.get_slice(name)[rows]  # type: ignore[attr-defined]
        self.bytes_read += t.numel() * t.element_size()
        return t

    def shape(self, name: str) -> list[int]:
        return list(self._file(name).get_slice(name).get_shape())  # type: ignore[attr-defined]


def dequantize_fp8_block(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantise a block-quantised FP8 weight: ``w[i, j] = q[i, j] * scale_inv[i // bm, j // bn]``.

    Args:
        weight: [M, N] float8_e4m3fn.
        scale_inv: [ceil(M / bm), ceil(N / bn)] FP32 inverse scales.
    """
    m, n = weight.shape
    bm, bn = block
    if tuple(scale_inv.shape) != (math.ceil(m / bm), math.ceil(n / bn)):
        raise CheckpointError(
            f"weight_scale_inv of shape {tuple(scale_inv.shape)} does not match a {m}x{n} weight in {bm}x{bn} blocks"
        )
    scale = scale_inv.float().repeat_interleave(bm, 0)[:m].repeat_interleave(bn, 1)[:, :n]
    return (weight.float() * scale).to(dtype)


# ----------------------------------------------------------------------------- name mapping
def hf_to_dsv3_name(name: str, config: ModelConfig) -> str | None:
    """Map a checkpoint tensor name to this package's state-dict name (``None``: not stored here)."""
    m = _LAYER_RE.match(name)
    if m and int(m.group(1)) >= config.num_hidden_layers:
        depth = int(m.group(1)) - config.num_hidden_layers  # 0-based MTP index
        rest = m.group(2)
        if depth >= config.num_nextn_predict_layers:
            return None  # MTP modules beyond the configured depth
        if rest in ("embed_tokens.weight", "shared_head.head.weight"):
            return None  # copies of the shared embedding / output head
        return f"mtp.{depth}.{rest}"
    return name


def _dsv3_to_hf_prefix(name: str, config: ModelConfig) -> str:
    if name.startswith("mtp."):
        depth, rest = name[4:].split(".", 1)
        return f"model.layers.{config.num_hidden_layers + int(depth)}.{rest}"
    return name


# ----------------------------------------------------------------------------- loading
def expert_blocks(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """``{state-dict name of a stacked expert tensor: (expert_offset, n_local)}`` of every Experts module."""
    return {
        f"{mod}.{leaf}": (m.expert_offset, m.gate_up_proj.shape[0])
        for mod, m in model.named_modules()
        if isinstance(m, Experts)
        for leaf in ("gate_up_proj", "down_proj")
    }


def _target(name: str, value_name: str, state: dict, blocks: dict, partial: bool):
    """Where checkpoint tensor ``name`` goes: ``(key, index, rows)``; ``None``: not held here (skip);
    ``"unexpected"``: no place in a model of this config.

    ``index`` selects the part of ``state[key]`` (one expert, its gate or up half); ``rows`` is the
    dim-0 slice of a stacked expert tensor to read (this rank's experts only)."""
    m = _EXPERT_RE.match(value_name)
    if m:
        prefix, expert, proj = m.group(1), int(m.group(2)), m.group(3)
        key = f"{prefix}.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}"
        if key not in state:
            return None if partial else "unexpected"
        offset, n_local = blocks[key]
        if not offset <= expert < offset + n_local:
            if partial:
                return None  # another rank's expert: not read
            raise CheckpointError(
                f"checkpoint has expert {expert} in {prefix} but the config has n_routed_experts={n_local}"
            )
        local = expert - offset
        if proj == "down_proj":
            return key, local, None
        inter = state[key].shape[1] // 2
        return key, (local, slice(0, inter) if proj == "gate_proj" else slice(inter, 2 * inter)), None
    if value_name not in state:
        if value_name.endswith("rotary_emb.inv_freq") or partial:
            return None  # a buffer rebuilt from the config, or a layer of another pipeline stage
        return "unexpected"
    if value_name in blocks:  # a stacked [N_r, ...] expert tensor (transformers 5): this rank's rows
        offset, n_local = blocks[value_name]
        return value_name, None, slice(offset, offset + n_local)
    return value_name, None, None


def _read(reader: _Reader, name: str, rows: slice | None, block: tuple[int, int]) -> torch.Tensor:
    """Tensor ``name`` (its ``rows``), FP8 weights dequantised block by block with their inverse scales."""
    scale_name = name[: -len("weight")] + "weight_scale_inv"
    if not (name.endswith(".weight") and scale_name in reader.files):
        return reader.get(name, rows)
    weight, scale = reader.get(name, rows), reader.get(scale_name, rows)
    if weight.dim() == 3:  # stacked experts: one [M, N] matrix each
        return torch.stack([dequantize_fp8_block(w, si, block) for w, si in zip(weight, scale)])
    return dequantize_fp8_block(weight, scale, block)


def load_state_into(
    model: torch.nn.Module,
    path: str,
    *,
    strict: bool = True,
    files: dict[str, str] | None = None,
    partial: bool = False,
) -> int:
    """Copy the tensors of the Hugging Face checkpoint directory ``path`` into ``model`` in place.

    ``files`` (tensor name -> file) may be passed when already listed. ``partial``: ``model`` holds
    only part of the checkpoint (a rank's: routed experts ``[n_local, ...]`` from ``expert_offset``,
    the layers of its pipeline stages); only the tensors and expert rows it holds are read, the rest
    is skipped unread, and ``strict`` checks that every tensor it holds was found. Returns the bytes
    read from the files.
    """
    config: ModelConfig = model.config  # type: ignore[assignment]
    reader = _Reader(files if files is not None else checkpoint_files(path))
    state = dict(model.state_dict(keep_vars=True))
    blocks = expert_blocks(model)
    block = tuple((config.quantization_config or {}).get("weight_block_size", (128, 128)))
    loaded: set[str] = set()
    expert_fill: dict[str, int] = {}
    unexpected: list[str] = []
    for name in reader.files:
        value_name = None if name.endswith("weight_scale_inv") else hf_to_dsv3_name(name, config)
        if value_name is None:
            continue
        where = _target(name, value_name, state, blocks, partial)
        if where is None or where == "unexpected":
            if where:
                unexpected.append(name)
            continue
        key, index, rows = where
        target = state[key] if index is None else state[key][index]
        value = _read(reader, name, rows, block)  # type: ignore[arg-type]
        if tuple(target.shape) != tuple(value.shape):
            raise CheckpointError(
                f"checkpoint tensor {name} has shape {tuple(value.shape)} but the config expects "
                f"{tuple(target.shape)}; check that config.json matches the weights"
            )
        with torch.no_grad():
            target.copy_(value.to(target.dtype))
        if index is None:
            loaded.add(key)
        else:
            expert_fill[key] = expert_fill.get(key, 0) + 1
    if strict:
        _check_complete(path, config, state, loaded, expert_fill, unexpected)
    return reader.bytes_read


def _check_complete(
    path: str, config: ModelConfig, state: dict, loaded: set[str], expert_fill: dict[str, int], unexpected: list[str]
) -> None:
    """Raise a CheckpointError when a tensor of the model was not in the checkpoint, or the reverse."""
    for key, count in expert_fill.items():
        per_expert = 1 if key.endswith("down_proj") else 2
        if count != per_expert * state[key].shape[0]:
            raise CheckpointError(
                f"checkpoint has {count} of the {per_expert * state[key].shape[0]} expert "
                f"tensors of {key}; the checkpoint is incomplete"
            )
        loaded.add(key)
    if unexpected:
        raise CheckpointError(
            f"checkpoint tensor {unexpected[0]} (and {len(unexpected) - 1} more) has no place "
            f"in a model of this config; check config.json"
        )
    expected = set(state)
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing = sorted(expected - loaded)
    if missing:
        raise CheckpointError(
            f"checkpoint {path} lacks tensor {_dsv3_to_hf_prefix(missing[0], config)} (and {len(missing) - 1} more)"
        )


def read_pretrained(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, str]]:
    """The config of the Hugging Face directory ``path`` (without MTP modules when the checkpoint has no
    weights for them, with a warning) and its tensor files."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    try:
        config = ModelConfig.from_json_file(path)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    files = checkpoint_files(path)
    depth = config.num_nextn_predict_layers
    if depth and not any(hf_to_dsv3_name(n, config) and hf_to_dsv3_name(n, config).startswith("mtp.") for n in files):
        # e.g. saved by transformers, which drops the MTP modules: load the main model only
        warnings.warn(
            f"checkpoint {path} has no weights for its {depth} MTP module(s); loading without MTP", stacklevel=2
        )
        config.num_nextn_predict_layers = 0
    return config, files


# ----------------------------------------------------------------------------- saving
def hf_state_items(
    model: torch.nn.Module, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]]:
    """Yield ``(checkpoint name, shape, dtype, make)`` in the official layout.

    ``make()`` materialises one tensor (a contiguous copy or cast when needed), so a
    writer can plan shards from the shapes and hold one shard at a time.
    """
    config: ModelConfig = model.config  # type: ignore[assignment]
    state = model.state_dict()

    def item(name: str, source: torch.Tensor, index=None, copy: bool = False):
        keep = not source.is_floating_point() or name.endswith("e_score_correction_bias") or dtype is None
        out_dtype = source.dtype if keep else dtype
        shape = tuple(source[index].shape) if index is not None else tuple(source.shape)

        def make() -> torch.Tensor:
            t = source.detach()
            t = t[index] if index is not None else t
            t = t.to(out_dtype).contiguous()
            return t.clone() if copy else t

        return name, shape, out_dtype, make

    for name, tensor in state.items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        hf = _dsv3_to_hf_prefix(name, config)
        if name.endswith("experts.gate_up_proj"):
            base = hf[: -len("gate_up_proj")]
            inter = tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                yield item(f"{base}{e}.gate_proj.weight", tensor, (e, slice(0, inter)))
                yield item(f"{base}{e}.up_proj.weight", tensor, (e, slice(inter, 2 * inter)))
        elif name.endswith("experts.down_proj"):
            base = hf[: -len("down_proj")]
            for e in range(tensor.shape[0]):
                yield item(f"{base}{e}.down_proj.weight", tensor, e)
        else:
            yield item(hf, tensor)
    head = state["model.embed_tokens.weight"] if config.tie_word_embeddings else state["lm_head.weight"]
    for k in range(len(getattr(model, "mtp", []))):  # copies of the shared tensors, as the official layout
        prefix = f"model.layers.{config.num_hidden_layers + k}."
        yield item(prefix + "embed_tokens.weight", state["model.embed_tokens.weight"], copy=True)
        yield item(prefix + "shared_head.head.weight", head, copy=True)


def save_pretrained(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: str | int = "5GB",
) -> None:
    """Write ``model`` as a Hugging Face checkpoint directory (config.json + safetensors).

    The directory is assembled under a temporary name and renamed into place, so an
    interrupted save leaves any previous checkpoint at ``path`` intact.
    """
    with atomic_dir(path) as tmp:
        write_pretrained(model, tmp, dtype=dtype, max_shard_size=max_shard_size)


def write_pretrained(
    model: torch.nn.Module, directory: str, *, dtype: torch.dtype | None = None, max_shard_size: str | int = "5GB"
) -> None:
    """Write config.json and the safetensors shards into the existing ``directory``, one shard in memory at a time."""
    config: ModelConfig = model.config  # type: ignore[assignment]
    limit = parse_size(max_shard_size, "max_shard_size", unit_required=False)
    out_config = ModelConfig.from_dict(config.to_dict())
    out_config.quantization_config = None  # weights are written dequantised
    shards: list[list] = [[]]
    sizes = [0]
    for item in hf_state_items(model, dtype):
        _, shape, out_dtype, _ = item
        nbytes = math.prod(shape) * torch.empty((), dtype=out_dtype).element_size()
        if shards[-1] and sizes[-1] + nbytes > limit:
            shards.append([])
            sizes.append(0)
        shards[-1].append(item)
        sizes[-1] += nbytes
    out_config.save(os.path.join(directory, "config.json"))
    metadata = {"format": "pt"}
    names = (
        [SINGLE_NAME]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file({name: make() for name, _, _, make in shard}, os.path.join(directory, fname), metadata=metadata)
        weight_map.update({name: fname for name, _, _, _ in shard})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(directory, INDEX_NAME), "w", encoding="utf-8") as fh:
            json.dump(index, fh, indent=2)
