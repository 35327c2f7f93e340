"""What an exported (or saved) checkpoint carries besides its weights, so the next command needs nothing else.

An export directory (``dsv3 export RUN OUT_DIR``) holds:

- ``config.json`` + ``model*.safetensors``: the Hugging Face weights (:func:`dsv3.model.hf.write_pretrained`);
- ``tokenizer.json`` and, for a fine-tuning run, ``tokenizer_config.json`` (its chat template and special tokens),
  copied from the run directory;
- ``generation_config.json``: the end-of-sequence (and beginning) token ids and dsv3's sampling defaults;
- ``export.json``, written last: the source checkpoint, and the size and SHA-256 of every other file.

``export.json`` is also how a later export knows the directory is its own output: it replaces a directory
that holds only the files its manifest lists, and refuses any other non-empty one (:mod:`dsv3.utils.outputs`).
The directory is assembled under a temporary name and renamed into place, so an interrupted export (Ctrl-C, a
kill, a full disk) leaves the previous export, or nothing, at ``OUT_DIR``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil

from dsv3.checkpoint.state import CHAT_TEMPLATE_FILE, file_sha256, from_pretrained, resolve_checkpoint
from dsv3.data.tokenizer import eos_token_id, load_tokenizer
from dsv3.errors import DataError, OutputError
from dsv3.model import hf  # hf.write_pretrained is looked up at the call (a test interrupts it there)
from dsv3.utils.io import atomic_dir
from dsv3.utils.outputs import check_output_dir, is_run_dir

EXPORT_MANIFEST = "export.json"
GENERATION_CONFIG = "generation_config.json"
#: Sampling defaults written to generation_config.json (those of ``dsv3 generate``).
SAMPLING = {"do_sample": True, "temperature": 0.8, "top_p": 0.95}


def is_export_dir(path: str) -> bool:
    """Whether ``path`` holds an earlier export and nothing else (every entry listed in its ``export.json``)."""
    try:
        with open(os.path.join(path, EXPORT_MANIFEST), encoding="utf-8") as fh:
            files = json.load(fh)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return isinstance(files, dict) and all(n == EXPORT_MANIFEST or n in files for n in os.listdir(path))


def check_export_dir(out_dir: str, checkpoint: str | None = None) -> None:
    """Refuse (one line) an ``OUT_DIR`` that is a file, under a file, a run directory or a foreign non-empty one;
    with ``checkpoint`` missing and ``OUT_DIR`` a run, say that the two arguments look swapped."""
    if checkpoint is not None and not os.path.exists(checkpoint) and is_run_dir(out_dir):
        raise OutputError(
            f"{checkpoint} does not exist and OUT_DIR {out_dir} is a training run directory: the "
            f"arguments are CHECKPOINT OUT_DIR (dsv3 export {out_dir} {checkpoint}?)"
        )
    check_output_dir(out_dir, "OUT_DIR", is_own_dir=is_export_dir, what="the exported checkpoint")


def copy_companions(run_dir: str, directory: str) -> list[str]:
    """Copy the run's tokenizer.json and chat template (tokenizer_config.json) into ``directory``; the names copied."""
    copied = []
    for name in ("tokenizer.json", CHAT_TEMPLATE_FILE):
        source = os.path.join(run_dir, name)
        if os.path.isfile(source):
            shutil.copyfile(source, os.path.join(directory, name))
            copied.append(name)
    return copied


def generation_config(directory: str, config) -> dict:
    """The generation_config.json of a checkpoint: token ids from its tokenizer (when present) and ``config``."""
    out = {"bos_token_id": getattr(config, "bos_token_id", None), "eos_token_id": getattr(config, "eos_token_id", None)}
    tokenizer_file = os.path.join(directory, "tokenizer.json")
    if os.path.isfile(tokenizer_file):
        with contextlib.suppress(DataError):  # no end-of-sequence token it knows: the config's id stays
            out["eos_token_id"] = eos_token_id(load_tokenizer(tokenizer_file))
    return {**{k: v for k, v in out.items() if v is not None}, **SAMPLING}


def export_unsharded(path: str, out_dir: str, *, dtype=None) -> str:
    """``dsv3 export`` of a one-process run (its newest intact ``step-*`` checkpoint) or of one such checkpoint:
    the same self-contained directory, its tokenizer and chat template taken from the checkpoint itself."""
    checkpoint = resolve_checkpoint(path)
    return write_export(from_pretrained(checkpoint), out_dir, run_dir=checkpoint, source=checkpoint, dtype=dtype)


def write_export(model, out_dir: str, *, run_dir: str, source: str, dtype=None) -> str:
    """Write the self-contained Hugging Face directory of ``model`` at ``out_dir`` (atomically); returns it.

    Args:
        model: the loaded :class:`~dsv3.model.DeepseekV3ForCausalLM`.
        out_dir: the directory to write (checked with :func:`check_export_dir` by the caller first).
        run_dir: the directory whose tokenizer and chat template go with the weights (the run's, or a
            one-process checkpoint's own).
        source: the checkpoint exported, recorded in ``export.json``.
        dtype: the weights' dtype (default: as trained).
    """
    with atomic_dir(out_dir) as tmp:
        hf.write_pretrained(model, tmp, dtype=dtype)
        copy_companions(run_dir, tmp)
        with open(os.path.join(tmp, GENERATION_CONFIG), "w", encoding="utf-8") as fh:
            json.dump(generation_config(tmp, model.config), fh, indent=1)
        files = {
            n: {"bytes": os.path.getsize(os.path.join(tmp, n)), "sha256": file_sha256(os.path.join(tmp, n))}
            for n in sorted(os.listdir(tmp))
        }
        with open(os.path.join(tmp, EXPORT_MANIFEST), "w", encoding="utf-8") as fh:
            json.dump({"dsv3_export": 1, "source": os.path.abspath(source), "files": files}, fh, indent=1)
    return out_dir
