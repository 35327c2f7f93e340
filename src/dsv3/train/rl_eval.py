"""Reward evaluation of a checkpoint on prompts: mean reward and pass@k (``dsv3 eval RUN --prompts FILE --reward NAME``).

Each prompt gets ``k`` samples (seeded per (prompt, sample) as GRPO seeds its rollouts, so a
measurement repeats exactly); a sample passes when its total reward is positive. pass@k is the
unbiased estimator of Chen et al. (2021, "Evaluating Large Language Models Trained on Code"),
averaged over prompts: with n samples of which c pass,

    pass@k = 1 - C(n - c, k) / C(n, k)

(1 when n - c < k). With ``temperature 0`` the samples are greedy and pass@1 is the accuracy.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from dsv3.data.chat import load_chat_template
from dsv3.data.rl_prompts import read_prompts
from dsv3.data.tokenizer import eos_token_id, get_tokenizer
from dsv3.errors import DataError
from dsv3.infer.generate import load_for_generation
from dsv3.train.rewards import RewardSet
from dsv3.train.rollout import rollout, sample_seed


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one prompt with ``n`` samples of which ``c`` passed (``k <= n``)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@dataclass
class RewardEval:
    """What :func:`evaluate_prompts` measured: the mean total reward of all samples, pass@k per k, counts."""

    mean_reward: float
    pass_at: dict[int, float] = field(default_factory=dict)
    prompts: int = 0
    samples: int = 0

    def lines(self) -> list[str]:
        out = [f"mean reward: {self.mean_reward:.4f} ({self.prompts} prompts x {self.samples} samples)"]
        out += [f"pass@{k}: {v:.4f}" for k, v in sorted(self.pass_at.items())]
        return out


def _tokenizer_for(checkpoint: str, path: str):

    for d in (checkpoint, path, os.path.dirname(os.path.dirname(checkpoint))):
        spec = os.path.join(d, "tokenizer.json")
        if os.path.isfile(spec):
            return get_tokenizer(spec, vocab_size=1 << 30)
    raise DataError(f"no tokenizer.json next to {checkpoint}; the reward evaluation needs the checkpoint's tokenizer")


def evaluate_prompts(
    path: str,
    prompts: str,
    rewards: list[str],
    *,
    samples: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    seed: int = 0,
    batch_rows: int = 256,
    device: str = "cpu",
) -> RewardEval:
    """Sample ``samples`` completions per prompt of ``prompts`` from the checkpoint (or run) ``path``, score them
    with the reward specs ``rewards``, and return the mean reward and pass@k for k = 1, 2, 4, ... ``samples``."""
    if samples < 1:
        raise DataError(f"--samples must be at least 1, got {samples}")
    reward_set = RewardSet.from_specs(rewards)
    model, checkpoint = load_for_generation(path, device=device)
    tokenizer = _tokenizer_for(checkpoint, path)
    try:
        template = load_chat_template(tokenizer_dir=checkpoint)
    except DataError:
        template = None
    data = read_prompts(
        prompts,
        tokenizer=tokenizer,
        template=template,
        context=model.config.max_position_embeddings,
        max_completion_tokens=max_new_tokens,
    )
    reward_set.check_columns(list(data.columns), source=prompts)
    eos = eos_token_id(tokenizer)
    rows = [(i, k) for i in range(len(data)) for k in range(samples)]
    totals: list[float] = []
    for start in range(0, len(rows), batch_rows):
        chunk = rows[start : start + batch_rows]
        texts, ids, columns = data.select([i for i, _ in chunk])
        roll = rollout(
            model,
            ids,
            [sample_seed(seed, 0, i, k) for i, k in chunk],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            eos_id=eos,
        )
        result = reward_set(texts, [tokenizer.decode(c) for c in roll.completions], columns)
        totals += result.total.tolist()
    passed = [sum(totals[i * samples + k] > 0 for k in range(samples)) for i in range(len(data))]
    ks = sorted({min(2**j, samples) for j in range(samples.bit_length() + 1)})
    pass_at = {k: sum(pass_at_k(samples, c, k) for c in passed) / len(data) for k in ks}
    return RewardEval(mean_reward=sum(totals) / len(totals), pass_at=pass_at, prompts=len(data), samples=samples)
