"""Fine-tuning runs: where a run's tokenizer and chat template come from, and its chat data.

The data itself (templates, masks, packing) lives in :mod:`dsv3.data.chat`, :mod:`dsv3.data.sft`
and :mod:`dsv3.data.packing`; these functions read a :class:`~dsv3.train.config.TrainConfig`
(``data.task: sft``) and its run directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from dsv3.data.chat import RUN_TEMPLATE_FILE, TEMPLATE_FILES, ChatTemplate, load_chat_template
from dsv3.data.sft import SFTData, build_sft_data
from dsv3.errors import DataError


def sft_tokenizer_spec(config) -> str | None:
    """Where a fine-tuning run's tokenizer comes from: ``--tokenizer``, else the ``--init-from``
    checkpoint's own tokenizer.json (None when neither is given)."""
    if config.data.tokenizer is not None:
        return config.data.tokenizer
    init = config.model.init_from
    if init is not None and os.path.isfile(os.path.join(init, "tokenizer.json")):
        return os.path.join(init, "tokenizer.json")
    return None


def run_template(config, run_dir: str | None) -> ChatTemplate:
    """The chat template of a fine-tuning run: the run directory's copy (resume), else
    ``--chat-template``, else the template next to ``--tokenizer``, else the ``--init-from`` checkpoint's."""
    if run_dir and os.path.isfile(os.path.join(run_dir, RUN_TEMPLATE_FILE)):
        return load_chat_template(os.path.join(run_dir, RUN_TEMPLATE_FILE))
    dirs = []
    if config.data.tokenizer is not None:
        tok = Path(config.data.tokenizer).expanduser()
        dirs.append(tok if tok.is_dir() else tok.parent)
    if config.model.init_from is not None:
        dirs.append(Path(config.model.init_from).expanduser())
    with_template = [d for d in dirs if any((d / name).is_file() for name in TEMPLATE_FILES)]
    base = with_template[0] if with_template else (dirs[0] if dirs else None)
    return load_chat_template(config.data.chat_template, tokenizer_dir=base)


def build_sft_training_data(config, tokenizer, mcfg, run_dir: str | None = None) -> SFTData:
    """The run's chat data (``data.task: sft``): template, masks, packing, split; checked to give a micro-batch."""
    if tokenizer is None:
        raise DataError(
            "fine-tuning needs the checkpoint's tokenizer; pass --tokenizer or --init-from a "
            "checkpoint directory with a tokenizer.json."
        )
    if config.data.path is None:
        raise DataError(
            'fine-tuning needs chat data; pass --data FILE.jsonl with "messages" or "prompt"/"completion" records.'
        )
    d = config.data
    data = build_sft_data(
        d.path,
        tokenizer=tokenizer,
        template=run_template(config, run_dir),
        seq_len=d.seq_len,
        vocab_size=mcfg.vocab_size,
        on_long=d.on_long,
        packing=d.packing,
        val_fraction=d.val_fraction,
        split_seed=config.run.seed,
    )
    if len(data.train) < d.micro_batch:
        raise DataError(
            f"the chat data gives {len(data.train)} training rows of {d.seq_len} positions, fewer than "
            f"one micro-batch ({d.micro_batch}); use more data, a smaller --micro-batch or --seq-len."
        )
    return data
