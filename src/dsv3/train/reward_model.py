"""A reward model: the dsv3 model with a scalar head, trained on preference pairs with the Bradley-Terry loss.

``dsv3 train --task reward --data pairs.jsonl`` reads records ``{"prompt", "chosen", "rejected"}``, renders
each pair's two texts (with the chat template of ``--chat-template`` / ``--init-from`` when there is one,
else ``prompt + completion``), and minimises

    L = -log sigmoid(r(x, y_chosen) - r(x, y_rejected))          (Bradley-Terry; InstructGPT eq. 1)

where r(x, y) = w . RMSNorm(h_T), a score head w [1, d] on the last token's final-normed hidden state
(transformers' ``*ForSequenceClassification`` convention). Pairwise accuracy is logged for training and
held-out pairs. The run directory gets ``config.yaml``, ``metrics.jsonl`` and ``reward_model/`` (the trunk
as a Hugging Face checkpoint plus ``score.safetensors``, tokenizer, template), which
:func:`load_reward_model` (``--reward-model RUN_DIR``) reads. Texts longer than ``--seq-len`` keep their
last tokens. The MoE bias update is off (gamma 0) and the MTP modules are dropped: only r is trained.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dsv3.checkpoint.state import from_pretrained
from dsv3.data.chat import TEMPLATE_FILES, ChatTemplate, load_chat_template, save_template
from dsv3.data.tokenizer import load_tokenizer, train_bpe_from_texts
from dsv3.errors import CheckpointError, ConfigError, DataError
from dsv3.model.hf import write_pretrained
from dsv3.model.transformer import init_generator
from dsv3.optim.adamw import set_lr
from dsv3.parallel.parallelize import build_optimizer, parallelize
from dsv3.train.config import TrainConfig, save_effective_config
from dsv3.train.metrics import MetricsLogger
from dsv3.train.preflight import model_config_for, resolve_device
from dsv3.train.rundir import CONFIG_FILE, prepare_run_dir
from dsv3.train.schedule import LRSchedule
from dsv3.train.session import _join_world, build_meta
from dsv3.train.sft import run_template, sft_tokenizer_spec
from dsv3.utils.io import atomic_dir

__all__ = [
    "RewardModel",
    "bradley_terry_loss",
    "read_preference_pairs",
    "train_reward_model",
    "load_reward_model",
    "LoadedRewardModel",
    "RewardTrainResult",
    "MODEL_DIR",
]

MODEL_DIR = "reward_model"
PAIR_COLUMNS = ("prompt", "chosen", "rejected")


class RewardModel(nn.Module):
    """r(x, y): a :class:`~dsv3.model.DeepseekV3ForCausalLM` trunk and a score head ``score`` [1, d]."""

    def __init__(self, lm: nn.Module, seed: int = 0) -> None:
        super().__init__()
        self.lm = lm
        d = lm.config.hidden_size
        weight = torch.empty(1, d).normal_(0.0, lm.config.initializer_range, generator=init_generator(seed, "score"))
        self.score = nn.Linear(d, 1, bias=False)
        with torch.no_grad():
            self.score.weight.copy_(weight)
        self.score.to(next(lm.parameters()))

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Scores [B] (float32) of right-padded sequences ``input_ids`` [B, T] with ``lengths`` [B] real tokens."""
        out = self.lm(input_ids, return_logits=False)
        h = self.lm.model.norm(out.hidden_states)  # [B, T, d]
        last = h[torch.arange(h.shape[0], device=h.device), lengths - 1]  # [B, d]
        return self.score(last).squeeze(-1).float()


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean -log sigmoid(r_c - r_r), pairwise accuracy mean(r_c > r_r)) of [P] scores."""
    return -F.logsigmoid(r_chosen - r_rejected).mean(), (r_chosen > r_rejected).float().mean()


# ----------------------------------------------------------------------------- data
def read_preference_pairs(path: str) -> list[dict[str, str]]:
    """The pairs of a .jsonl file; a record without a string ``prompt``/``chosen``/``rejected`` is refused."""
    if not os.path.isfile(path):
        raise DataError(f"preference data {path} does not exist; pass --data pairs.jsonl with prompt/chosen/rejected")
    pairs = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{path} line {line_no} is not JSON; write one object per line") from None
            missing = [
                c for c in PAIR_COLUMNS if not isinstance(record.get(c) if isinstance(record, dict) else None, str)
            ]
            if missing:
                raise DataError(
                    f"{path} line {line_no} has no text column {missing[0]!r}; every record needs "
                    f'"prompt", "chosen" and "rejected" strings'
                )
            pairs.append({c: record[c] for c in PAIR_COLUMNS})
    if len(pairs) < 2:
        raise DataError(f"{path} holds {len(pairs)} preference pairs; a reward model needs at least 2")
    return pairs


def render(prompt: str, completion: str, template: ChatTemplate | None) -> str:
    """The text the reward model scores: a user and an assistant turn through ``template``, or the concatenation."""
    if template is None:
        return prompt + completion
    text, _ = template.render([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}])
    return text


def encode(tokenizer, texts: list[str], seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] and lengths [B]; texts over ``seq_len`` tokens keep their last seq_len."""
    ids = [(tokenizer.encode(t).ids or [0])[-seq_len:] for t in texts]
    width = max(len(x) for x in ids)
    batch = torch.zeros(len(ids), width, dtype=torch.long)
    for i, x in enumerate(ids):
        batch[i, : len(x)] = torch.tensor(x)
    return batch.to(device), torch.tensor([len(x) for x in ids], device=device)


def _template_for(config: TrainConfig) -> ChatTemplate | None:
    """The chat template when the run names or inherits one, else None (plain concatenation)."""
    dirs = [config.data.tokenizer, config.model.init_from]
    dirs = [d if os.path.isdir(d) else os.path.dirname(d) for d in dirs if d]
    if config.data.chat_template or any(os.path.isfile(os.path.join(d, n)) for d in dirs for n in TEMPLATE_FILES):
        return run_template(config, None)
    return None


def _tokenizer_for(config: TrainConfig, pairs: list[dict[str, str]], vocab_size: int):
    spec = sft_tokenizer_spec(config)
    if spec is not None:
        tokenizer = load_tokenizer(spec)
    else:  # no tokenizer given: a byte-level BPE learned on the pairs (toy runs, tests)
        tokenizer = train_bpe_from_texts((p[c] for p in pairs for c in PAIR_COLUMNS), vocab_size)
    if tokenizer.get_vocab_size() > vocab_size:
        raise DataError(
            f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model's vocab_size is "
            f"{vocab_size}; pass a matching --tokenizer or --model"
        )
    return tokenizer


@dataclass
class RewardTrainResult:
    """What a finished reward-model run reports (accuracies are pairwise: r_chosen > r_rejected)."""

    run_dir: str
    step: int
    train_accuracy: float
    val_accuracy: float | None
    val_loss: float | None
    wall_time: float


@dataclass
class _Scorer:
    """The model with the tokenizer and template that turn (prompt, completion) pairs into its inputs."""

    model: RewardModel
    tokenizer: Any
    template: ChatTemplate | None
    seq_len: int
    device: torch.device

    def scores(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        texts = [render(p, c, self.template) for p, c in zip(prompts, completions)]
        return self.model(*encode(self.tokenizer, texts, self.seq_len, self.device))

    def pair_scores(self, pairs: list[dict[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_chosen [P], r_rejected [P]) from one forward over the 2P texts."""
        prompts = [p["prompt"] for p in pairs] * 2
        r = self.scores(prompts, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs])
        return r[: len(pairs)], r[len(pairs) :]

    @torch.no_grad()
    def evaluate(self, pairs: list[dict[str, str]], micro_batch: int) -> tuple[float, float]:
        """(mean Bradley-Terry loss, pairwise accuracy) over ``pairs``."""
        was_training = self.model.training
        self.model.eval()
        rc, rr = zip(*(self.pair_scores(pairs[i : i + micro_batch]) for i in range(0, len(pairs), micro_batch)))
        self.model.train(was_training)
        loss, acc = bradley_terry_loss(torch.cat(rc), torch.cat(rr))
        return loss.item(), acc.item()


def _split(pairs: list[dict[str, str]], fraction: float, seed: int) -> tuple[list, list]:
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_val = min(len(pairs) - 1, max(1, round(fraction * len(pairs)))) if fraction > 0 else 0
    return [pairs[i] for i in order[n_val:]], [pairs[i] for i in order[:n_val]]


def _build(config: TrainConfig) -> tuple[str, _Scorer, Any, list, list]:
    """The set-up phases of a training session for one process: the configuration and the pairs (checked first),
    the world (:func:`_join_world`: ``ParallelContext.single``), the trunk built on meta without MTP and
    :func:`parallelize`d (materialised, read from ``--init-from``), the score head, and ZeroAdamW over both.
    Returns (run directory, scorer, optimizer, training pairs, held-out pairs)."""
    if config.data.path is None:
        raise DataError("--task reward needs preference pairs; pass --data pairs.jsonl with prompt/chosen/rejected")
    par = config.parallel
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or par.pp > 1 or (par.dp or 1) > 1 or (par.ep or 1) > 1:
        raise ConfigError("--task reward trains in one process; drop torchrun and --pp/--dp/--ep")
    run_dir = prepare_run_dir(config, None)
    device = resolve_device(config)
    mcfg = model_config_for(config)
    pairs = read_preference_pairs(config.data.path)
    train_pairs, val_pairs = _split(pairs, config.data.val_fraction, config.run.seed)
    tokenizer = _tokenizer_for(config, pairs, mcfg.vocab_size)
    template = _template_for(config)
    ctx, run_dir = _join_world(config, mcfg, None, run_dir, device)
    mcfg = mcfg.replace(num_nextn_predict_layers=0)  # saved without MTP, loaded without a warning
    lm, init_from = build_meta(config, mcfg, mtp=False)
    parallelize(lm, ctx, config, mcfg=mcfg, init_from=init_from, partial=True, optimize=False)
    model = RewardModel(lm, seed=config.run.seed)
    optimizer = build_optimizer(model, ctx, config)  # ZeRO-1 AdamW (dp = 1) over the trunk and the score head
    scorer = _Scorer(model, tokenizer, template, config.data.seq_len, device)
    return run_dir, scorer, optimizer, train_pairs, val_pairs


def train_reward_model(config: TrainConfig, *, log: Callable[[str], None] = print) -> RewardTrainResult:
    """Train a reward model on ``config.data.path``'s pairs; ``global_batch`` / ``micro_batch`` count pairs."""
    started = time.time()
    run_dir, scorer, optimizer, train_pairs, val_pairs = _build(config)
    d, opt = config.data, config.optimizer
    model = scorer.model
    schedule = LRSchedule.from_options(config.schedule, opt.lr)
    os.makedirs(run_dir, exist_ok=True)
    save_effective_config(config, os.path.join(run_dir, CONFIG_FILE))
    log(
        f"run {run_dir}: reward model on {len(train_pairs)} preference pairs ({len(val_pairs)} held out), "
        f"{sum(p.numel() for p in model.parameters()):,} parameters on {scorer.device}"
    )
    rng, order = random.Random(config.run.seed), []
    metrics = MetricsLogger(run_dir, tensorboard=config.logging.tensorboard)
    val = (None, None)
    try:
        for step in range(config.schedule.steps):
            t0 = time.perf_counter()
            while len(order) < d.global_batch:  # epochs of shuffled pairs
                order += rng.sample(range(len(train_pairs)), len(train_pairs))
            batch, order = [train_pairs[i] for i in order[: d.global_batch]], order[d.global_batch :]
            lr = schedule.lr_at(step)
            set_lr(optimizer, lr)
            loss_sum, acc_sum = 0.0, 0.0
            for i in range(0, len(batch), d.micro_batch):
                micro = batch[i : i + d.micro_batch]
                loss, acc = bradley_terry_loss(*scorer.pair_scores(micro))
                (loss * len(micro) / len(batch)).backward()
                loss_sum, acc_sum = loss_sum + loss.item() * len(micro), acc_sum + acc.item() * len(micro)
            grad_norm = optimizer.step(opt.grad_clip or None)  # the norm before clipping; not finite: no update
            optimizer.zero_grad(set_to_none=True)
            record = {
                "step": step + 1,
                "lr": lr,
                "loss": loss_sum / len(batch),
                "accuracy": acc_sum / len(batch),
                "grad_norm": float(grad_norm),
                "step_time": time.perf_counter() - t0,
            }
            last = step + 1 == config.schedule.steps
            if val_pairs and ((step + 1) % config.logging.eval_every == 0 or last):
                val = scorer.evaluate(val_pairs, d.micro_batch)
                record.update(val_loss=val[0], val_accuracy=val[1])
                log(
                    f"step {step + 1}: loss {record['loss']:.4f}, pairwise accuracy {record['accuracy']:.3f}, "
                    f"held-out accuracy {val[1]:.3f}"
                )
            metrics.log(record)
    finally:
        metrics.close()
    save_reward_model(
        scorer, os.path.join(run_dir, MODEL_DIR), {"steps": config.schedule.steps, "val_accuracy": val[1]}
    )
    log(f"saved the reward model to {os.path.join(run_dir, MODEL_DIR)}; use it with --reward-model {run_dir}")
    return RewardTrainResult(run_dir, config.schedule.steps, record["accuracy"], val[1], val[0], time.time() - started)


def save_reward_model(scorer: _Scorer, directory: str, info: dict[str, Any]) -> None:
    """Write the trunk (Hugging Face format), the score head, the tokenizer, the template and the metadata."""
    with atomic_dir(directory) as tmp:
        write_pretrained(scorer.model.lm, tmp)
        save_file(
            {"score.weight": scorer.model.score.weight.detach().float().cpu().contiguous()},
            os.path.join(tmp, "score.safetensors"),
        )
        scorer.tokenizer.save(os.path.join(tmp, "tokenizer.json"))
        if scorer.template is not None:
            save_template(scorer.template, tmp)
        with open(os.path.join(tmp, "reward_model.json"), "w", encoding="utf-8") as f:
            json.dump({"seq_len": scorer.seq_len, "template": scorer.template is not None, **info}, f, indent=2)


class LoadedRewardModel:
    """A trained reward model ready to score completions (frozen, eval mode)."""

    def __init__(self, scorer: _Scorer, batch_size: int = 16) -> None:
        self.scorer, self.batch_size = scorer, batch_size

    @torch.no_grad()
    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        """r(x, y) of each (prompt, completion), in batches of ``batch_size``."""
        out: list[float] = []
        for i in range(0, len(completions), self.batch_size):
            out += self.scorer.scores(prompts[i : i + self.batch_size], completions[i : i + self.batch_size]).tolist()
        return out

    def reward_fn(self) -> Callable[..., list[float]]:
        """The model as a reward function ``f(prompts, completions, **columns)`` for :class:`RewardSet`."""

        def reward_model(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
            return self.score(prompts, completions)

        return reward_model


def load_reward_model(run_dir: str, *, device: str | torch.device = "cpu") -> LoadedRewardModel:
    """The reward model of a ``dsv3 train --task reward`` run directory (or of its ``reward_model/``)."""
    directory = (
        run_dir if os.path.isfile(os.path.join(run_dir, "reward_model.json")) else os.path.join(run_dir, MODEL_DIR)
    )
    if not os.path.isfile(os.path.join(directory, "reward_model.json")):
        raise CheckpointError(
            f"{run_dir} holds no reward model (no {MODEL_DIR}/reward_model.json); train one with "
            f"dsv3 train --task reward --data pairs.jsonl"
        )
    with open(os.path.join(directory, "reward_model.json"), encoding="utf-8") as f:
        info = json.load(f)
    device = torch.device(device)
    lm = from_pretrained(directory, device=device)
    model = RewardModel(lm)
    model.score.load_state_dict(
        {"weight": load_file(os.path.join(directory, "score.safetensors"))["score.weight"].to(model.score.weight)}
    )
    model.eval().requires_grad_(False)
    template = load_chat_template(directory) if info.get("template") else None
    tokenizer = load_tokenizer(os.path.join(directory, "tokenizer.json"))
    return LoadedRewardModel(_Scorer(model, tokenizer, template, int(info["seq_len"]), device))
