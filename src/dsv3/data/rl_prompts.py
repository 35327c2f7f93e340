"""GRPO prompt data: a .jsonl of prompts -> rendered text + token ids + the other columns.

Each line is an object with a ``prompt`` (text, used as is) or ``messages`` (a chat rendered
with the checkpoint's chat template and its generation prompt, :class:`~dsv3.data.chat.ChatTemplate`).
Every other key is a column handed to the reward functions (``answer``, ``tests``, ...), one
value per prompt; a line without a key another line has gets ``None`` there.

Which prompts a step uses is a pure function of (seed, step) (:func:`step_prompts`): the
prompts are walked in a seeded permutation per pass, so a resumed run continues with exactly
the prompts the uninterrupted run would have used, and no loader state is needed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from dsv3.errors import ConfigError, DataError
from dsv3.utils.io import json_lines


@dataclass
class PromptSet:
    """The prompts of a GRPO run.

    Attributes:
        texts: the prompt text of each record (a chat rendered with its generation prompt).
        ids: their token ids.
        columns: the other keys, ``{name: [value per prompt]}``.
    """

    texts: list[str]
    ids: list[list[int]]
    columns: dict[str, list[Any]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, index: list[int]) -> tuple[list[str], list[list[int]], dict[str, list[Any]]]:
        """``(texts, ids, columns)`` of the prompts ``index`` (in that order)."""
        return (
            [self.texts[i] for i in index],
            [self.ids[i] for i in index],
            {k: [v[i] for i in index] for k, v in self.columns.items()},
        )


def _records(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise DataError(f"prompt file {path} does not exist; pass --data prompts.jsonl")
    out = []
    with open(path, encoding="utf-8") as fh:
        for n, record in json_lines(fh, lambda n, msg: f"{path} line {n} is not valid JSON ({msg}); fix that line"):
            if not isinstance(record, dict) or not ({"prompt", "messages"} & record.keys()):
                raise DataError(f'{path} line {n} needs a "prompt" text or a "messages" list')
            out.append(record)
    if not out:
        raise DataError(f"prompt file {path} holds no prompts")
    return out


def _render(record: dict, template, where: str) -> str:
    if "prompt" in record:
        if not isinstance(record["prompt"], str) or not record["prompt"]:
            raise DataError(f'{where}: "prompt" must be a non-empty string')
        return record["prompt"]
    messages = record["messages"]
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise DataError(f'{where}: "messages" must be a list of {{role, content}} objects')
    if template is None:
        raise DataError(
            f'{where} holds "messages" but no chat template was found; pass --chat-template or '
            "--init-from a checkpoint with one"
        )
    text, _ = template.render(messages, add_generation_prompt=True)
    return text


def read_prompts(path: str, *, tokenizer, template=None, context: int, max_completion_tokens: int) -> PromptSet:
    """Read, render and tokenise the prompts of ``path``.

    Raises:
        DataError: a malformed line, or a prompt whose tokens plus ``max_completion_tokens`` do not fit
            the model's ``context`` positions (named by its line number).
    """
    records = _records(path)
    texts, ids = [], []
    for n, record in enumerate(records, 1):
        text = _render(record, template, f"{path} line {n}")
        tokens = tokenizer.encode(text).ids
        if not tokens:
            raise DataError(f"{path} line {n}: the prompt gives no tokens")
        if len(tokens) + max_completion_tokens > context:
            raise DataError(
                f"{path} line {n}: a prompt of {len(tokens)} tokens plus {max_completion_tokens} "
                f"completion tokens exceeds the model's context of {context} positions; shorten it "
                f"or lower --max-completion-tokens"
            )
        texts.append(text)
        ids.append(tokens)
    names = sorted({k for r in records for k in r} - {"prompt", "messages"})
    columns = {k: [r.get(k) for r in records] for k in names}
    return PromptSet(texts, ids, columns)


def step_prompts(n_prompts: int, step: int, per_step: int, seed: int) -> list[int]:
    """The prompt indices of optimizer step ``step`` (0-based): positions ``step * per_step ..`` of the
    endless sequence of seeded permutations of ``range(n_prompts)`` (one permutation per pass)."""
    if per_step < 1:
        raise ConfigError(f"a GRPO step needs at least one prompt, got {per_step}")
    out = []
    for pos in range(step * per_step, (step + 1) * per_step):
        epoch, i = divmod(pos, n_prompts)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        out.append(int(torch.randperm(n_prompts, generator=g)[i]))
    return out
