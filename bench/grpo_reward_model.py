"""GRPO with a trained reward model raises the rate of a rule the reward model learned (issue 23).

    PYTHONPATH=src python bench/grpo_reward_model.py [--seeds 0 1] [--steps 40] [--out runs/grpo-rm]

For each seed:

1. the toy policy of ``bench/grpo_toy.py``: a tiny DeepSeek-V3 MoE with a character tokenizer, a short SFT on
   ``a+b=c`` until greedy held-out accuracy is about one half;
2. a reward model (``dsv3 train --task reward``, the library call) on synthetic pairs for the same prompts,
   with the same tokenizer: "chosen" is a number whose last digit is even, "rejected" one whose last digit
   is odd; its held-out pairwise accuracy is reported;
3. GRPO from the SFT model with ``--reward-model`` only (no rule-based reward);
4. the rule's rate (the share of sampled completions ending in an even digit, :func:`even_rule`) on held-out
   prompts before and after, 8 samples per prompt at temperature 1.

The rule is deliberately one the SFT model keeps about half the time: its answers are sums, half of them even.

Prints one JSON line per seed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import grpo_toy  # noqa: E402  (bench/grpo_toy.py: the toy policy)

from dsv3.train.config import TrainConfig, load_train_config  # noqa: E402
from dsv3.train.grpo_run import train_grpo  # noqa: E402
from dsv3.train.reward_model import train_reward_model  # noqa: E402
from dsv3.train.rl_eval import evaluate_prompts  # noqa: E402

RULE = f"{os.path.abspath(__file__)}:even_rule"


def even_rule(prompts: list[str], completions: list[str], **_) -> list[float]:
    """1.0 where the completion's last character is an even digit (the rule the reward model is taught)."""
    return [float(bool(c) and c[-1] in "02468") for c in completions]


def rule_pairs(pairs, n: int, seed: int) -> list[dict[str, str]]:
    """Preference pairs on the toy's prompts: chosen ends in an even digit, rejected in an odd one."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.choice(pairs)
        tens = str(rng.randrange(4) or "")
        out.append(
            {"prompt": f"{a}+{b}=", "chosen": tens + rng.choice("02468"), "rejected": tens + rng.choice("13579")}
        )
    return out


def train_rule_reward_model(base: str, init: str, train_pairs, seed: int, log) -> tuple[str, float]:
    data = os.path.join(base, "pairs.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in rule_pairs(train_pairs, 960, seed))
    config = load_train_config(
        None,
        dict(
            task="reward",
            data=data,
            model=os.path.join(init, "config.json"),
            tokenizer=os.path.join(init, "tokenizer.json"),
            seq_len=16,
            micro_batch=32,
            global_batch=32,
            steps=60,
            lr=3e-3,
            min_lr=3e-4,
            warmup_steps=5,
            eval_every=30,
            val_fraction=0.2,
            progress=False,
            tensorboard=False,
            run_dir=os.path.join(base, "rm"),
            seed=seed,
        ),
    )
    result = train_reward_model(config, log=log)
    return result.run_dir, result.val_accuracy


def run_seed(seed: int, out: str, steps: int, log) -> dict:
    train_pairs, held_out = grpo_toy.addition_split(seed)
    base = os.path.join(out, f"seed{seed}")
    os.makedirs(base, exist_ok=True)
    model, tok, _, sft_acc = grpo_toy.short_sft(seed, train_pairs, held_out, log=log)
    init = grpo_toy.save_checkpoint_dir(model, tok, os.path.join(base, "sft"))
    rm_dir, rm_accuracy = train_rule_reward_model(base, init, train_pairs, seed, log)
    prompts = grpo_toy.write_prompts(os.path.join(base, "train.jsonl"), train_pairs)
    held = grpo_toy.write_prompts(os.path.join(base, "held_out.jsonl"), held_out)

    def measure(path: str) -> dict[str, float]:
        return {
            name: evaluate_prompts(path, held, [spec], samples=8, temperature=1.0, max_new_tokens=4).mean_reward
            for name, spec in (("rule", RULE), ("math", "math"))
        }

    before = measure(init)
    t0 = time.time()
    options = grpo_toy.grpo_options(
        init,
        prompts,
        os.path.join(base, "grpo"),
        steps=steps,
        seed=seed,
        reward=None,
        reward_model=rm_dir,
        lr=1e-3,
        min_lr=1e-3,
    )
    train_grpo(TrainConfig.from_dict(options), log=log)
    after = measure(os.path.join(base, "grpo"))
    return {
        "seed": seed,
        "sft_accuracy": sft_acc,
        "rm_held_out_accuracy": rm_accuracy,
        "grpo_steps": steps,
        "grpo_s": round(time.time() - t0, 1),
        "rule_rate_before": before["rule"],
        "rule_rate_after": after["rule"],
        "math_before": before["math"],
        "math_after": after["math"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out", default="runs/grpo-rm")
    args = p.parse_args(argv)
    print(json.dumps({"load_avg": os.getloadavg()}))
    for seed in args.seeds:
        record = run_seed(seed, args.out, args.steps, log=lambda line: print(line, file=sys.stderr))
        print(json.dumps(record), flush=True)
    print(json.dumps({"load_avg": os.getloadavg()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
