"""Supervised fine-tuning data: chat conversations -> chat template -> tokens + loss mask -> packed rows.

The pipeline, each step one function or class of this module::

    read_conversations   .jsonl records: {"messages": [{role, content}, ...]} (system, user,
                         assistant, tool; multi-turn) or {"prompt": ..., "completion": ...}
    ChatTemplate         the checkpoint's own Jinja chat template (``chat_template`` of its
                         tokenizer_config.json, or chat_template.jinja), rendered the way
                         transformers renders it
    tokenize_conversation
                         the rendered text through the checkpoint's tokenizer.json; the loss
                         mask marks the tokens of the assistant turns
    pack                 conversations into rows of seq_len positions (best-fit decreasing),
                         each with its segment ids and restarting RoPE positions
    PackedChatDataset    row i as an :class:`SFTBatch` row; the pretraining TrainLoader
                         (:mod:`dsv3.train.data`) orders, batches and resumes them
    build_sft_data       all of it, with a held-out split, for the training loop

Loss mask. Only the assistant turns are trained on: their content and their end-of-turn
token, never system or user text nor the role markers (``<｜Assistant｜>``). These are
exactly the tokens that transformers' ``apply_chat_template(..., return_assistant_tokens_mask=True)``
marks:

- a template with ``{% generation %} ... {% endgeneration %}`` markers: the characters
  rendered inside the markers; a token is in the mask when it overlaps them (transformers'
  rule, so the two masks agree token for token);
- a template without markers (DeepSeek-V3's own, Llama's, ChatML ...): the assistant spans
  are found by rendering prefixes. For assistant message i, ``P`` = the template on
  messages[:i] with ``add_generation_prompt=True`` (everything up to and including the
  role marker the model is prompted with) and ``R`` = the template on messages[:i+1]; the
  span is ``R[len(P):]`` with trailing whitespace dropped (the newline some templates put
  after the end-of-turn token is formatting, not generated). The template must render each
  turn as a continuation of the prompt (``R`` starts with ``P``) and the whole conversation
  as a continuation of ``R``; a template that does not (one that rewrites earlier turns)
  is refused with one line, never guessed at.

Positions and masks. A conversation of n tokens takes n - 1 positions (inputs t_1..t_{n-1},
targets t_2..t_n). Packed conversations are isolated as in the report (5.1, "sample
masking": "isolated and mutually invisible"): ``segment_ids`` drive a block-diagonal causal
attention mask (:func:`dsv3.model.mla.document_mask`), and RoPE positions restart at 0 for
every conversation, so a packed conversation gets the same logits as run alone. The tail of
a row is padding (its own segment, no targets). ``packing=False`` puts one conversation per
row instead (padding after it; plain causal attention, no masks needed).

Bad input never passes silently: a conversation without an assistant turn, or longer than
``seq_len`` + 1 tokens, is skipped and counted (``on_long="skip"``), cut to ``seq_len`` + 1
tokens (``"truncate"``, long ones only) or refused with one line (``"error"``); malformed
records and a missing template are always refused with one line.
"""

from __future__ import annotations

import bisect
import contextvars
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsv3.errors import ConfigError, DataError
from dsv3.model.loss import IGNORE_INDEX

ON_LONG = ("skip", "truncate", "error")
TEMPLATE_FILES = ("tokenizer_config.json", "chat_template.jinja", "chat_template.json")


# --------------------------------------------------------------------------- chat template


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")

# The span recorder of the active render (one per thread/context, like transformers' tracker).
_TRACKER: contextvars.ContextVar = contextvars.ContextVar("dsv3_generation_tracker", default=None)


def _compile(source: str):
    """Compile a chat template in transformers' environment: sandboxed, ``trim_blocks``,
    ``lstrip_blocks``, loop controls, ``{% generation %}`` blocks, ``raise_exception``,
    ``strftime_now`` and a ``tojson`` that does not escape HTML."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}``: records the character span of its output."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            text = caller()
            tracker = _TRACKER.get()
            if tracker is not None:
                chunks, spans = tracker
                start = sum(len(c) for c in chunks)
                spans.append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


@dataclass
class ChatTemplate:
    """A Hugging Face chat template with the special tokens it may use.

    Attributes:
        source: the Jinja text.
        special_tokens: ``bos_token``, ``eos_token``, ... as strings (what transformers passes
            to the template from ``tokenizer.special_tokens_map``).
        origin: where it was read from (for messages).
    """

    source: str
    special_tokens: dict[str, str] = field(default_factory=dict)
    origin: str = "the chat template"

    def __post_init__(self) -> None:
        import jinja2

        try:
            self._template = _compile(self.source)
        except jinja2.TemplateSyntaxError as exc:
            raise DataError(
                f"the chat template of {self.origin} is not valid Jinja ({exc.message} on line "
                f"{exc.lineno}); fix it or pass another with --chat-template."
            ) from None

    @property
    def has_generation_markers(self) -> bool:
        """Whether the template marks assistant output with ``{% generation %}`` blocks."""
        import re

        return re.search(r"\{%-?\s*generation\s*-?%\}", self.source) is not None

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    def render(self, messages: list[dict], *, add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
        """The template applied to ``messages``: ``(text, spans)``, spans being the character ranges
        ``[start, end)`` rendered inside ``{% generation %}`` blocks (empty without markers)."""
        chunks: list[str] = []
        spans: list[tuple[int, int]] = []
        token = _TRACKER.set((chunks, spans))
        try:
            for chunk in self._template.generate(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            ):
                chunks.append(chunk)
        finally:
            _TRACKER.reset(token)
        return "".join(chunks), spans

    def assistant_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of its assistant turns (content and
        end-of-turn token), by generation markers or, without them, by rendering prefixes (see the
        module docstring). Raises ``jinja2.TemplateError`` when the template refuses the
        conversation and :class:`ValueError` when it is not prefix-stable."""
        text, spans = self.render(messages)
        if self.has_generation_markers:
            return text, spans
        spans = []
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            prompt, _ = self.render(messages[:i], add_generation_prompt=True)
            turn, _ = self.render(messages[: i + 1])
            if not turn.startswith(prompt) or not text.startswith(turn):
                raise ValueError(
                    "it does not render an assistant turn as a continuation of the generation prompt "
                    "(it rewrites earlier turns)"
                )
            end = len(turn.rstrip())
            if end > len(prompt):
                spans.append((len(prompt), end))
        return text, spans


def _read_template_file(path: Path) -> tuple[str | None, dict[str, str]]:
    """``(template, special tokens)`` from a tokenizer_config.json, chat_template.json or .jinja file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"the chat template file {path} cannot be read ({exc}); check the path.") from None
    if path.suffix != ".json":
        return text, {}
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); fix the file.") from None
    if not isinstance(config, dict):
        raise DataError(f"{path} must hold a JSON object; fix the file.")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    tokens = {k: t for k in _SPECIAL_KEYS if (t := _token_text(config.get(k))) is not None}
    return (template if isinstance(template, str) else None), tokens


def load_chat_template(
    template: str | os.PathLike | None = None, *, tokenizer_dir: str | os.PathLike | None = None
) -> ChatTemplate:
    """The chat template for fine-tuning, with its special tokens.

    Args:
        template: an override: a ``.jinja`` file, a tokenizer_config.json / chat_template.json,
            or a directory holding one of :data:`TEMPLATE_FILES`.
        tokenizer_dir: the checkpoint (or tokenizer) directory whose own template is used when
            ``template`` is None, and whose tokenizer_config.json supplies ``bos_token``/``eos_token``.
    """

    def from_dir(d: Path) -> tuple[str | None, dict[str, str], Path | None]:
        found, tokens, where = None, {}, None
        for name in TEMPLATE_FILES:
            p = d / name
            if p.is_file():
                t, toks = _read_template_file(p)
                tokens = {**toks, **tokens}
                if found is None and t is not None:
                    found, where = t, p
        return found, tokens, where

    tokens: dict[str, str] = {}
    base = Path(tokenizer_dir).expanduser() if tokenizer_dir is not None else None
    if base is not None and base.is_file():
        base = base.parent
    if base is not None and base.is_dir():
        _, tokens, _ = from_dir(base)
    source, where = None, None
    if template is not None:
        p = Path(template).expanduser()
        if p.is_dir():
            source, toks, where = from_dir(p)
            tokens = {**tokens, **toks}
        elif p.is_file():
            source, toks = _read_template_file(p)
            tokens = {**tokens, **toks}
            where = p
        else:
            raise DataError(
                f"the chat template {p} does not exist; pass a .jinja file or a tokenizer_config.json "
                "with --chat-template."
            )
        if source is None:
            raise DataError(f"{p} holds no chat_template; pass a .jinja file or a tokenizer_config.json that has one.")
    elif base is not None:
        source, _, where = from_dir(base)
        if source is None:
            raise DataError(
                f"{base} has no chat template (no chat_template in tokenizer_config.json, no "
                "chat_template.jinja); pass one with --chat-template."
            )
    else:
        raise DataError(
            "fine-tuning needs a chat template; pass --chat-template or --init-from a checkpoint that "
            "has one in its tokenizer_config.json."
        )
    return ChatTemplate(source, tokens, origin=str(where))


# --------------------------------------------------------------------------- conversations


_SPECIAL_TOKEN = re.compile(r"\b((?:bos|eos|pad|unk|sep|cls|mask)_token)\b")


def _missing_token_message(template: "ChatTemplate", token: str) -> str:
    return (
        f"the chat template {template.origin} uses {token}, which nothing defines: a bare .jinja file carries "
        f"no special tokens, and neither --chat-template nor the checkpoint has a tokenizer_config.json with "
        f"{token}; pass a tokenizer_config.json holding the template and its special tokens with "
        f"--chat-template (see docs/sft.md)"
    )


def check_special_tokens(template: "ChatTemplate") -> None:
    """Refuse a template that uses a special token (``bos_token``, ``eos_token``, ...) that it is not given: it
    would render as nothing (or fail with "'eos_token' is undefined") on every conversation."""
    for token in sorted(set(_SPECIAL_TOKEN.findall(template.source))):
        if token not in template.special_tokens:
            raise DataError(_missing_token_message(template, token))


def _undefined_message(exc: Exception, template: "ChatTemplate", where: str) -> str:
    """The real cause of an undefined name in a template: a special token that nothing defines, or a field the
    conversation lacks."""
    name = re.search(r"'(\w+)' is undefined", str(exc))
    token = name.group(1) if name else None
    if token is not None and token.endswith("_token") and token not in template.special_tokens:
        return _missing_token_message(template, token)
    return f"the chat template refuses {where} ({exc}); fix the conversation or the template."


#: The roles a chat message may have (those of the OpenAI/transformers chat format that the templates render).
CHAT_ROLES = ("system", "user", "assistant", "tool")


def _as_messages(record: Any, where: str) -> list[dict]:
    """The messages of one jsonl record (``messages``, or ``prompt``/``completion``), checked."""
    if not isinstance(record, dict):
        raise DataError(
            f'{where} is a JSON {type(record).__name__}, not an object with "messages" or '
            '"prompt"/"completion"; fix that line.'
        )
    if "messages" in record:
        messages = record["messages"]
    elif "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        completion = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
        if not isinstance(prompt, list) or not isinstance(completion, list):
            raise DataError(f'{where}: "prompt" and "completion" must be strings or lists of messages; fix that line.')
        messages = prompt + completion
    else:
        raise DataError(
            f'{where} has neither "messages" nor "prompt" and "completion"; '
            'give chat data as {"messages": [{"role": ..., "content": ...}]}.'
        )
    if not isinstance(messages, list):
        raise DataError(f'{where}: "messages" must be a list of {{"role", "content"}} objects; fix that line.')
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise DataError(f'{where}: message {j} is not an object with a string "role"; fix that line.')
        if m["role"] not in CHAT_ROLES:  # DeepSeek-V3's template silently drops a turn of another role
            raise DataError(
                f'{where}: message {j} has the unknown role {m["role"]!r} (field "role"); use one of '
                f"{', '.join(CHAT_ROLES)}."
            )
        content = m.get("content")
        if content is None and not m.get("tool_calls"):
            raise DataError(f'{where}: message {j} ({m["role"]}) has no "content"; fix that line.')
        if content is not None and not isinstance(content, str):
            raise DataError(
                f"{where}: the content of message {j} ({m['role']}) is a {type(content).__name__}, "
                "not a string; fix that line."
            )
        out.append({k: v for k, v in m.items() if v is not None})  # as transformers: None-valued keys dropped
    return out


def read_conversations(path: str | os.PathLike) -> Iterator[tuple[str, list[dict]]]:
    """``(where, messages)`` for each non-empty line of a chat .jsonl file (``where`` = "line N of FILE")."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"the chat data {p} does not exist; check the --data path.")
    try:
        with open(p, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                where = f"line {lineno} of {p}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where} is not valid JSON ({exc.msg}); fix or remove that line.") from None
                yield where, _as_messages(record, where)
    except UnicodeDecodeError:
        raise DataError(f"{p} is not UTF-8 text; convert it to UTF-8.") from None


@dataclass
class Conversation:
    """One tokenised conversation.

    Attributes:
        ids: [n] int64 token ids of the rendered conversation.
        mask: [n] bool, True for tokens of assistant turns (content and end-of-turn token).
    """

    ids: np.ndarray
    mask: np.ndarray

    @property
    def positions(self) -> int:
        """Positions it takes in a row: n - 1 (inputs t_1..t_{n-1}, targets t_2..t_n)."""
        return len(self.ids) - 1

    @property
    def loss_tokens(self) -> int:
        """Targets that count in the loss: assistant tokens after the first token."""
        return int(self.mask[1:].sum())


def token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """[n] bool: token k is marked when its character range ``offsets[k]`` overlaps one of ``spans``
    (both sorted), transformers' rule for ``assistant_masks``."""
    mask = np.zeros(len(offsets), dtype=bool)
    s = 0
    for k, (start, end) in enumerate(offsets):
        while s < len(spans) and start >= spans[s][1]:
            s += 1
        if s == len(spans):
            break
        if end > spans[s][0]:
            mask[k] = True
    return mask


def tokenize_conversation(messages: list[dict], template: ChatTemplate, tokenizer) -> Conversation:
    """Render ``messages`` with ``template``, encode with ``tokenizer`` (no extra special tokens:
    the template writes its own, as transformers does) and mark the assistant tokens."""
    text, spans = template.assistant_spans(messages)
    enc = tokenizer.encode(text, add_special_tokens=False)
    return Conversation(np.asarray(enc.ids, dtype=np.int64), token_mask(enc.offsets, spans))


# --------------------------------------------------------------------------- packing


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing: rows of item indices whose lengths sum to at most ``capacity``.

    Items are placed longest first into the fullest row that still has room (ties: the
    earlier item and row first), so the result is deterministic. Every length must be
    between 1 and ``capacity``.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i in order:
        n = lengths[i]
        if not 0 < n <= capacity:
            raise ValueError(f"item length {n} does not fit a row of {capacity}")
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            rows.append([i])
            bisect.insort(free, (capacity - n, len(rows) - 1))
        else:
            room, r = free.pop(k)
            rows[r].append(i)
            bisect.insort(free, (room - n, r))
    return rows


@dataclass
class SFTBatch:
    """A batch of SFT rows.

    Attributes:
        input_ids: [B, T] token ids.
        labels: [B, T] next-token targets, ``-100`` outside assistant turns and on padding.
        segment_ids: [B, T] conversation index within its row (0 for the padding tail), or None
            without packing.
        position_ids: [B, T] RoPE positions restarting at each conversation, or None without packing.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    segment_ids: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "SFTBatch":
        move = (lambda t: t.to(device)) if device is not None else (lambda t: t)
        return SFTBatch(
            move(self.input_ids),
            move(self.labels),
            None if self.segment_ids is None else move(self.segment_ids),
            None if self.position_ids is None else move(self.position_ids),
        )

    def model_kwargs(self) -> dict[str, torch.Tensor | None]:
        """The keyword arguments of the model's forward for document masking."""
        return {"segment_ids": self.segment_ids, "position_ids": self.position_ids}

    @property
    def loss_tokens(self) -> torch.Tensor:
        """Number of targets that count in the loss (a 0-d tensor on the batch's device)."""
        return (self.labels != IGNORE_INDEX).sum()


class PackedChatDataset:
    """Rows of ``seq_len`` positions built from tokenised conversations.

    Args:
        conversations: the tokenised conversations (each at most ``seq_len`` + 1 tokens).
        seq_len: T.
        pad_id: the token id of padding positions (never a target).
        packing: several conversations per row (document-masked) or one per row.
    """

    def __init__(self, conversations: Sequence[Conversation], seq_len: int, *, pad_id: int, packing: bool = True):
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.packing = packing
        self.conversations = list(conversations)
        lengths = [c.positions for c in self.conversations]
        self.rows = pack(lengths, seq_len) if packing else [[i] for i in range(len(lengths))]
        self.num_tokens = sum(c.loss_tokens for c in self.conversations)  # loss tokens per epoch
        self.used_positions = sum(lengths)

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Row i: ``(input_ids, labels, segment_ids, position_ids)``, each [T] int64."""
        T = self.seq_len
        ids = np.full(T, self.pad_id, dtype=np.int64)
        labels = np.full(T, IGNORE_INDEX, dtype=np.int64)
        segments = np.zeros(T, dtype=np.int64)
        positions = np.zeros(T, dtype=np.int64)
        at = 0
        for s, c in enumerate(self.rows[i], start=1):
            conv = self.conversations[c]
            n = conv.positions
            ids[at : at + n] = conv.ids[:-1]
            labels[at : at + n] = np.where(conv.mask[1:], conv.ids[1:], IGNORE_INDEX)
            segments[at : at + n] = s
            positions[at : at + n] = np.arange(n)
            at += n
        positions[at:] = np.arange(T - at)
        return ids, labels, segments, positions

    def batch(self, indices: Sequence[int]) -> SFTBatch:
        """Rows ``indices`` as an :class:`SFTBatch` ([B, T] each)."""
        rows = [self.row(int(i)) for i in indices]
        if not rows:
            empty = torch.zeros(0, self.seq_len, dtype=torch.long)
            return SFTBatch(empty, empty.clone())
        ids, labels, segments, positions = (torch.from_numpy(np.stack(col)) for col in zip(*rows))
        if not self.packing:
            return SFTBatch(ids, labels)
        return SFTBatch(ids, labels, segments, positions)


# --------------------------------------------------------------------------- all together


@dataclass
class SFTStats:
    """What happened to the conversations of the file."""

    read: int = 0
    kept: int = 0
    no_assistant: int = 0
    too_long: int = 0
    truncated: int = 0

    def describe(self) -> str:
        parts = [f"{self.kept} of {self.read} conversations"]
        if self.no_assistant:
            parts.append(f"{self.no_assistant} skipped without an assistant turn")
        if self.too_long:
            parts.append(f"{self.too_long} skipped as longer than seq_len")
        if self.truncated:
            parts.append(f"{self.truncated} truncated to seq_len")
        return ", ".join(parts)


@dataclass
class SFTData:
    """Everything the training loop needs from chat data (the interface of
    :class:`dsv3.train.data.TrainingData`; batches are :class:`SFTBatch`).

    Attributes:
        path: the .jsonl file.
        template: the chat template used.
        train, val: the packed rows (val None without validation).
        eos_id: the end-of-turn token id (None when the template names none).
        data_id: fingerprint of the tokens, masks and packing, saved with the loader position.
        stats: counts of kept, skipped and truncated conversations.
    """

    path: Path
    template: ChatTemplate
    train: PackedChatDataset
    val: PackedChatDataset | None
    eos_id: int | None
    data_id: str
    stats: SFTStats
    seq_len: int = field(init=False)

    def __post_init__(self) -> None:
        self.seq_len = self.train.seq_len

    @property
    def packing(self) -> bool:
        return self.train.packing

    def loader(self, seed: int):
        """A :class:`~dsv3.train.data.TrainLoader` over the training rows (a permutation per epoch)."""
        from dsv3.train.data import TrainLoader

        return TrainLoader(self.train, seed=seed, data_id=self.data_id)

    def val_batches(self, batch_size: int, max_batches: int | None = None) -> Iterator[SFTBatch]:
        """Held-out rows in a fixed order (see :func:`dsv3.train.data.val_batches`)."""
        from dsv3.train.data import val_batches

        return val_batches(self.val, batch_size, max_batches) if self.val is not None else iter(())

    def steps_for_epochs(self, epochs: float, global_batch: int) -> int:
        """Optimizer steps that visit the training rows ``epochs`` times at ``global_batch`` rows a step."""
        if not epochs > 0:
            raise ConfigError(f"epochs must be positive, got {epochs}; change --epochs.")
        return max(1, math.ceil(epochs * len(self.train) / global_batch))

    def summary(self) -> str:
        """One line for the log."""
        t = self.train
        fill = t.used_positions / max(1, len(t) * t.seq_len)
        val = f", val {len(self.val)} rows" if self.val is not None else ", no validation"
        how = f"packed {fill:.0%} full" if t.packing else "one per row, padded"
        return (
            f"sft data: {self.path}: {self.stats.describe()}; train {len(t)} rows of {t.seq_len} ({how}), "
            f"{t.num_tokens} loss tokens an epoch{val}"
        )


def _fingerprint(conversations: Sequence[Conversation], train_idx, val_idx, seq_len: int, packing: bool) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([seq_len, packing, list(map(int, train_idx)), list(map(int, val_idx))]).encode())
    for c in conversations:
        h.update(c.ids.tobytes())
        h.update(np.packbits(c.mask).tobytes())
    return h.hexdigest()[:16]


def build_sft_data(
    data: str | os.PathLike,
    *,
    tokenizer,
    template: ChatTemplate,
    seq_len: int,
    vocab_size: int,
    on_long: str = "skip",
    packing: bool = True,
    val_fraction: float = 0.0,
    split_seed: int = 0,
    log=None,
) -> SFTData:
    """Read, render, tokenise, check, split and pack chat data.

    Args:
        data: a .jsonl file of conversations.
        tokenizer: the checkpoint's ``tokenizers.Tokenizer``.
        template: the chat template (:func:`load_chat_template`).
        seq_len: T, positions per row; a conversation may have at most T + 1 tokens.
        vocab_size: the model's V; a token id >= V is an error.
        on_long: ``"skip"`` (count), ``"truncate"`` or ``"error"`` for conversations longer than
            T + 1 tokens; with ``"error"`` a conversation without an assistant turn is refused
            too, otherwise it is skipped and counted.
        packing: pack several conversations per row (document-masked) or one per row.
        val_fraction: share of the conversations held out for validation (0: none).
        split_seed: seed of the held-out choice.
        log: where a line about skipped conversations goes (default: nowhere; counts are in
            :meth:`SFTData.summary`).
    """
    import jinja2

    if on_long not in ON_LONG:
        raise ConfigError(f"on_long must be one of {', '.join(ON_LONG)}, got {on_long!r}; change --on-long.")
    if seq_len < 1:
        raise ConfigError(f"seq_len must be at least 1, got {seq_len}; change --seq-len.")
    check_special_tokens(template)
    if not 0.0 <= val_fraction <= 0.5:
        raise ConfigError(f"the validation fraction must be between 0 and 0.5, got {val_fraction}; change it.")
    stats = SFTStats()
    conversations: list[Conversation] = []
    for where, messages in read_conversations(data):
        stats.read += 1
        if not any(m["role"] == "assistant" for m in messages):
            if on_long == "error":
                raise DataError(
                    f"{where} has no assistant turn, so nothing to learn; remove it or pass "
                    "--on-long skip to skip such conversations."
                )
            stats.no_assistant += 1
            continue
        try:
            conv = tokenize_conversation(messages, template, tokenizer)
        except jinja2.UndefinedError as exc:
            raise DataError(_undefined_message(exc, template, where)) from None
        except jinja2.TemplateError as exc:
            raise DataError(
                f"the chat template refuses {where} ({exc}); fix the conversation or the template."
            ) from None
        except ValueError as exc:
            raise DataError(
                f"the chat template of {template.origin} cannot mark assistant turns: {exc}; add "
                "{% generation %} markers to it and pass it with --chat-template."
            ) from None
        if conv.ids.size and int(conv.ids.max()) >= vocab_size:
            raise DataError(
                f"the tokenizer produces token id {int(conv.ids.max())} on {where}, outside the model's "
                f"vocabulary of {vocab_size}; use the checkpoint's own tokenizer."
            )
        if conv.loss_tokens == 0:
            if on_long == "error":
                raise DataError(f"{where} has no assistant tokens after rendering; remove it or pass --on-long skip.")
            stats.no_assistant += 1
            continue
        if conv.positions > seq_len:
            if on_long == "error":
                raise DataError(
                    f'{where} (field "messages") has {len(conv.ids)} tokens, more than seq_len + 1 = '
                    f"{seq_len + 1}; raise --seq-len or pass --on-long skip or truncate."
                )
            if on_long == "truncate":
                conv = Conversation(conv.ids[: seq_len + 1], conv.mask[: seq_len + 1])
                if conv.loss_tokens == 0:
                    stats.too_long += 1
                    continue
                stats.truncated += 1
            else:
                stats.too_long += 1
                continue
        if conv.positions < 1:
            stats.no_assistant += 1
            continue
        conversations.append(conv)
    stats.kept = len(conversations)
    if (stats.no_assistant or stats.too_long) and log is not None:
        log(f"sft data: {stats.describe()}")
    if not conversations:
        raise DataError(
            f"no usable conversation in {data} ({stats.describe()}); check the data, --seq-len and --on-long."
        )
    n_val = 0
    if val_fraction > 0 and len(conversations) >= 2:
        n_val = min(len(conversations) - 1, max(1, round(val_fraction * len(conversations))))
    perm = np.random.default_rng(split_seed).permutation(len(conversations))
    val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    eos_id = tokenizer.token_to_id(template.eos_token) if template.eos_token else None
    pad_id = eos_id if eos_id is not None else 0
    train = PackedChatDataset([conversations[i] for i in train_idx], seq_len, pad_id=pad_id, packing=packing)
    val = (
        PackedChatDataset([conversations[i] for i in val_idx], seq_len, pad_id=pad_id, packing=packing)
        if n_val
        else None
    )
    return SFTData(
        Path(data),
        template,
        train,
        val,
        eos_id,
        _fingerprint(conversations, train_idx, val_idx, seq_len, packing),
        stats,
    )


# --------------------------------------------------------------------------- training-run hooks

RUN_TEMPLATE_FILE = "tokenizer_config.json"  # the run directory's copy of the template and its special tokens


def save_template(template: ChatTemplate, directory: str | os.PathLike) -> None:
    """Write ``template`` as ``directory/tokenizer_config.json`` (chat_template + special tokens)."""
    from dsv3.utils.io import atomic_write_text

    atomic_write_text(
        os.path.join(directory, RUN_TEMPLATE_FILE),
        json.dumps({"chat_template": template.source, **template.special_tokens}, indent=2, ensure_ascii=False) + "\n",
    )


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


def split_batch(batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """``(input_ids, labels, model keyword arguments)`` of a pre-training ``(ids, labels)`` pair or an
    :class:`SFTBatch`."""
    if isinstance(batch, SFTBatch):
        return batch.input_ids, batch.labels, batch.model_kwargs()
    ids, labels = batch
    return ids, labels, {}


def batch_to(batch, device, non_blocking: bool = False, pin: bool = False):
    """A batch (pair or :class:`SFTBatch`) pinned and/or moved to ``device``."""

    def move(t):
        if t is None:
            return None
        if pin:
            t = t.pin_memory()
        return t.to(device, non_blocking=non_blocking) if device is not None else t

    if isinstance(batch, SFTBatch):
        return SFTBatch(move(batch.input_ids), move(batch.labels), move(batch.segment_ids), move(batch.position_ids))
    return tuple(move(t) for t in batch)
