"""Held-out evaluation: loss and perplexity on a data file, and a passkey-retrieval probe.

``dsv3 eval CKPT_OR_RUN --data FILE`` is :func:`evaluate_checkpoint`: plain text is cut into windows of
``seq_len`` + 1 tokens as in pre-training (:func:`dsv3.data.pretrain.build_data`); chat data (.jsonl with
``messages`` or ``prompt``/``completion``) is rendered with the checkpoint's chat template and scored on
the assistant tokens only, one conversation per row (:mod:`dsv3.data.sft`). The loss is the
token-weighted mean next-token cross-entropy over every scored token, the perplexity its exponential.

Passkey retrieval (Landmark Attention / YaRN, arXiv 2305.16300, 2309.00071): a five-digit key hidden at a
random depth of filler text of a chosen token length, then "What is the pass key? The pass key is". The
model retrieves it when, with teacher forcing on the key's tokens, the argmax at every key position is
the key's next token (then, and only then, greedy decoding writes the key).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from dsv3.data.chat import TEMPLATE_FILES, load_chat_template
from dsv3.data.loader import val_batches
from dsv3.data.pretrain import build_data
from dsv3.data.sft import build_sft_data
from dsv3.data.sources import CorpusSpec
from dsv3.data.tokenizer import get_tokenizer
from dsv3.errors import ConfigError, DataError
from dsv3.infer.generate import load_for_generation
from dsv3.model.loss import IGNORE_INDEX

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
PASSKEY_QUESTION = "What is the pass key? The pass key is"


@dataclass
class LossResult:
    """Token-weighted loss over a data set."""

    loss: float
    tokens: int
    sequences: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else float("inf")


@torch.no_grad()
def evaluate_loss(model, batches: Iterable, *, device: torch.device | str = "cpu") -> LossResult:
    """Mean next-token cross-entropy of the main head over every non-ignored label.

    Args:
        model: a :class:`~dsv3.model.DeepseekV3ForCausalLM`.
        batches: ``(input_ids, labels)`` pairs [B, T] or :class:`~dsv3.data.packing.SFTBatch` es
            (their document masks are applied).
    """
    was_training = model.training
    model.eval()
    total, count, rows = 0.0, 0, 0
    try:
        for batch in batches:
            if isinstance(batch, tuple):
                ids, labels, kwargs = batch[0].to(device), batch[1].to(device), {}
            else:
                batch = batch.to(device)
                ids, labels, kwargs = batch.input_ids, batch.labels, batch.model_kwargs()
            n = int((labels != IGNORE_INDEX).sum())
            if n == 0:
                continue
            out = model(ids, labels, **kwargs)
            total += float(out.lm_loss) * n
            count += n
            rows += ids.shape[0]
    finally:
        model.train(was_training)
    if count == 0:
        raise DataError("the evaluation data has no token to score; give more data or a smaller --seq-len.")
    return LossResult(total / count, count, rows)


# --------------------------------------------------------------------------- passkey


@dataclass
class PasskeySample:
    """One probe: ``ids`` = prompt then key tokens; the key occupies the last ``len(answer)`` tokens."""

    ids: list[int]
    answer: list[int]
    key: str
    depth: float


def passkey_sample(tokenizer, length: int, *, key: str, depth: float, intro: str = PASSKEY_INTRO) -> PasskeySample:
    """A passkey prompt of about ``length`` tokens (key included), the needle at fraction ``depth``
    of the filler (0 = first line, 1 = last); ``intro`` is the opening instruction."""
    enc = lambda text: tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    intro, filler, question = enc(intro) if intro else [], enc(PASSKEY_FILLER), enc(PASSKEY_QUESTION)
    needle, answer = enc(PASSKEY_NEEDLE.format(key=key)), enc(" " + key)
    fixed = len(intro) + len(needle) + len(question) + len(answer)
    repeats = max(1, (length - fixed) // len(filler))
    at = min(repeats, max(0, round(depth * repeats)))
    ids = intro + filler * at + needle + filler * (repeats - at) + question + answer
    return PasskeySample(ids, answer, key, depth)


def passkey_samples(
    tokenizer, length: int, trials: int, *, seed: int = 0, intro: str = PASSKEY_INTRO
) -> list[PasskeySample]:
    """``trials`` probes of ``length`` tokens: random five-digit keys, depths spread evenly over 0..1."""
    rng = np.random.default_rng([seed, length])
    depths = np.linspace(0, 1, trials) if trials > 1 else [0.5]
    return [
        passkey_sample(tokenizer, length, key=str(int(rng.integers(10000, 100000))), depth=float(d), intro=intro)
        for d in depths
    ]


@torch.no_grad()
def passkey_retrieved(model, samples: Sequence[PasskeySample], *, device: torch.device | str = "cpu") -> list[bool]:
    """For each probe, whether greedy decoding after the question writes the key (teacher-forced argmax)."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for s in samples:
            ids = torch.tensor([s.ids], device=device)
            logits = model(ids[:, :-1]).logits[0]
            k = len(s.answer)
            predicted = logits[-k:].argmax(-1).tolist()
            out.append(predicted == s.answer)
    finally:
        model.train(was_training)
    return out


def passkey_accuracy(
    model,
    tokenizer,
    length: int,
    *,
    trials: int = 10,
    seed: int = 0,
    device: torch.device | str = "cpu",
    intro: str = PASSKEY_INTRO,
) -> float:
    """Share of ``trials`` passkey probes of ``length`` tokens the model retrieves."""
    hits = passkey_retrieved(model, passkey_samples(tokenizer, length, trials, seed=seed, intro=intro), device=device)
    return sum(hits) / len(hits)


# --------------------------------------------------------------------------- checkpoint evaluation


@dataclass
class EvalReport:
    checkpoint: str
    data: str | None = None
    kind: str | None = None  # "text" or "chat"
    seq_len: int | None = None
    loss: LossResult | None = None
    passkey: dict[int, float] = field(default_factory=dict)
    notes: dict[int, str] = field(default_factory=dict)  # token length -> "(beyond ...)" or ""

    def lines(self) -> list[str]:
        out = [f"checkpoint: {self.checkpoint}"]
        if self.loss is not None:
            what = "assistant tokens" if self.kind == "chat" else "tokens"
            out.append(
                f"{self.data}: loss {self.loss.loss:.4f}, perplexity {self.loss.perplexity:.2f} over "
                f"{self.loss.tokens} {what} ({self.loss.sequences} sequences of {self.seq_len})"
                f"{self.notes.get(self.seq_len, '')}"
            )
        for length, acc in self.passkey.items():
            out.append(f"passkey at {length} tokens: {acc:.0%} retrieved{self.notes.get(length, '')}")
        return out


#: Longest sequence ``dsv3 eval`` scores on a CPU: attention is quadratic, and 100k tokens would run for hours.
MAX_CPU_TOKENS = 8192


def context_note(length: int, mcfg, flag: str, device: str) -> str:
    """The note printed next to a number measured at ``length`` tokens beyond the model's trained context
    (``""`` within it); refuses (one line) a length past ``max_position_embeddings`` without RoPE scaling,
    as ``dsv3 train`` does, and one over :data:`MAX_CPU_TOKENS` on a CPU.

    The trained context is the YaRN ``original_max_position_embeddings`` when the model extends its context,
    else ``max_position_embeddings``.
    """
    if device.startswith("cpu") and length > MAX_CPU_TOKENS:
        raise ConfigError(
            f"{flag} {length} tokens is too long to score on a CPU (at most {MAX_CPU_TOKENS}: "
            f"attention grows with the square of the length); use a shorter length or --device cuda."
        )
    limit = mcfg.max_position_embeddings
    if mcfg.rope_type == "default":
        if length > limit:
            raise ConfigError(
                f"{flag} {length} is beyond the model's context of {limit} tokens and the model has no "
                f"RoPE scaling; use {limit} or less, or evaluate a run trained with --rope-scaling yarn."
            )
        return ""
    original = int((mcfg.rope_scaling or {}).get("original_max_position_embeddings") or limit)
    if length > limit:
        return f" (beyond max_position_embeddings {limit}: extrapolated)"
    if length > original:
        return f" (beyond the original context of {original} tokens: {mcfg.rope_type} extension)"
    return ""


def is_chat_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a .jsonl whose first record has ``messages`` or ``prompt``/``completion``."""
    p = os.fspath(path)
    if not (p.endswith(".jsonl") or p.endswith(".ndjson")) or not os.path.isfile(p):
        return False
    with open(p, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(record, dict) and (
                    "messages" in record or ("prompt" in record and "completion" in record)
                )
    return False


def parse_lengths(text: str) -> list[int]:
    """``"512,1k,2048"`` -> [512, 1024, 2048]."""
    out = []
    for part in str(text).split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            value = int(float(part[:-1]) * 1024) if part.endswith("k") else int(part)
        except ValueError:
            raise ConfigError(f"--passkey takes token lengths like 512,1k,2048, got {part!r}.") from None
        if value < 32:
            raise ConfigError(f"a passkey length must be at least 32 tokens, got {value}.")
        out.append(value)
    if not out:
        raise ConfigError("--passkey needs at least one token length, e.g. --passkey 512,1024.")
    return out


def _template_dir(tok_path: str, checkpoint: str) -> str:
    """Where a checkpoint's chat template lives: next to its tokenizer, in the checkpoint, or in its run directory."""
    for d in (os.path.dirname(os.path.abspath(tok_path)), checkpoint, os.path.dirname(os.path.abspath(checkpoint))):
        if any(os.path.isfile(os.path.join(d, name)) for name in TEMPLATE_FILES):
            return d
    return checkpoint


def evaluate_checkpoint(
    path: str,
    *,
    data: str | None = None,
    seq_len: int | None = None,
    passkey: Sequence[int] = (),
    passkey_trials: int = 10,
    tokenizer: str | None = None,
    chat_template: str | None = None,
    batch_size: int = 4,
    max_batches: int | None = None,
    use_ema: bool = False,
    device: str = "cpu",
    seed: int = 0,
) -> EvalReport:
    """Load a run's latest checkpoint (or a checkpoint / Hugging Face directory) and evaluate it.

    Args:
        path: run directory, checkpoint directory or Hugging Face model directory.
        data: held-out data (plain text or chat .jsonl, see the module docstring).
        seq_len: tokens per scored sequence; default min(max_position_embeddings, 1024).
        passkey: token lengths at which to run the passkey probe.
        passkey_trials: probes per length.
        tokenizer: a tokenizer.json; default the checkpoint's.
        chat_template: template override for chat data; default the checkpoint's.
    """
    if data is None and not passkey:
        raise ConfigError("nothing to evaluate; pass --data FILE and/or --passkey LENGTHS.")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}.")
    if passkey and passkey_trials < 1:
        raise ConfigError(f"--passkey-trials must be positive, got {passkey_trials}.")
    if seq_len is not None and seq_len < 1:
        raise ConfigError(f"--seq-len must be positive, got {seq_len}.")
    model, checkpoint = load_for_generation(path, use_ema=use_ema, device=device)
    mcfg = model.config
    seq_len = min(mcfg.max_position_embeddings, 1024) if seq_len is None else seq_len
    report = EvalReport(checkpoint=checkpoint, data=data, seq_len=seq_len)
    if data is not None:
        report.notes[seq_len] = context_note(seq_len, mcfg, "--seq-len", str(device))
    for length in passkey:
        report.notes[length] = context_note(length, mcfg, "--passkey", str(device))
    tok_path = tokenizer or os.path.join(checkpoint, "tokenizer.json")
    if not os.path.isfile(tok_path):
        raise ConfigError(f"no tokenizer.json in {checkpoint}; pass --tokenizer.")
    tok = get_tokenizer(tok_path, vocab_size=mcfg.vocab_size)
    if data is not None:
        if is_chat_file(data):
            template = load_chat_template(chat_template, tokenizer_dir=_template_dir(tok_path, checkpoint))
            chat = build_sft_data(
                data,
                tokenizer=tok,
                template=template,
                seq_len=seq_len,
                vocab_size=mcfg.vocab_size,
                on_long="truncate",
                packing=False,
            )

            batches, report.kind = val_batches(chat.train, batch_size, max_batches), "chat"
        else:
            text = build_data(
                CorpusSpec(data), tokenizer=tok, seq_len=seq_len, vocab_size=mcfg.vocab_size, val_fraction=0.0
            )
            batches, report.kind = val_batches(text.train, batch_size, max_batches), "text"
        report.loss = evaluate_loss(model, batches, device=device)
    for length in passkey:
        report.passkey[length] = passkey_accuracy(model, tok, length, trials=passkey_trials, seed=seed, device=device)
    return report
