"""Chat data: Hugging Face chat templates, conversations, and the assistant-token loss mask.

``ChatTemplate`` renders a checkpoint's own Jinja template the way transformers does
(sandboxed, ``trim_blocks``, ``{% generation %}`` blocks, ``raise_exception``, ``tojson``,
``strftime_now``); ``load_chat_template`` finds it (tokenizer_config.json, chat_template.jinja)
and ``save_template`` writes a run's copy. ``read_conversations`` reads .jsonl records
(``messages``, or ``prompt``/``completion``), checked line by line. ``tokenize_conversation``
encodes the rendered text and marks the assistant tokens (content and end-of-turn token):
by ``{% generation %}`` markers or, without them, by rendering prefixes; a template that
rewrites earlier turns is refused, never guessed at (docs/sft.md, "Loss mask").
"""

from __future__ import annotations

import contextvars
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from dsv3.data.packing import Conversation
from dsv3.errors import DataError
from dsv3.utils.io import atomic_write_text

TEMPLATE_FILES = ("tokenizer_config.json", "chat_template.jinja", "chat_template.json")
RUN_TEMPLATE_FILE = "tokenizer_config.json"  # the run directory's copy of the template and its special tokens


# --------------------------------------------------------------------------- chat template


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")

# The span recorder of the active render (one per thread/context, like transformers' tracker).
_TRACKER: contextvars.ContextVar = contextvars.ContextVar("dsv3_generation_tracker", default=None)


class _GenerationBlock(jinja2.ext.Extension):
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


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _compile(source: str):
    """Compile a chat template in transformers' environment: sandboxed, ``trim_blocks``,
    ``lstrip_blocks``, loop controls, ``{% generation %}`` blocks, ``raise_exception``,
    ``strftime_now`` and a ``tojson`` that does not escape HTML."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
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
        end-of-turn token), by generation markers or, without them, by rendering prefixes (see docs/sft.md,
        "Loss mask"). Raises ``jinja2.TemplateError`` when the template refuses the
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


def save_template(template: ChatTemplate, directory: str | os.PathLike) -> None:
    """Write ``template`` as ``directory/tokenizer_config.json`` (chat_template + special tokens)."""
    atomic_write_text(
        os.path.join(directory, RUN_TEMPLATE_FILE),
        json.dumps({"chat_template": template.source, **template.special_tokens}, indent=2, ensure_ascii=False) + "\n",
    )


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


def undefined_message(exc: Exception, template: "ChatTemplate", where: str) -> str:
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
