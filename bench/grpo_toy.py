"""GRPO on a task a CPU can learn: small-integer addition (docs/rl.md walks through it).

    python bench/grpo_toy.py [--seeds 0 1] [--steps 60] [--out runs/grpo-toy]

For each seed:

1. a character tokenizer (digits, ``+``, ``=``, EOS) and a tiny DeepSeek-V3 MoE (2 layers, 8 routed
   experts, top-2, sigmoid gating with the aux-loss-free bias);
2. prompts ``a+b=`` with operands below 20, split into training and held-out prompts;
3. a short SFT on ``a+b=c<eos>`` lines (loss on the answer) until greedy held-out accuracy reaches
   about one half, saved as a Hugging Face checkpoint with its tokenizer.json;
4. ``dsv3 train --task grpo`` (the library call :func:`dsv3.train.grpo_run.train_grpo`) with the built-in
   ``math`` reward (the completion's last number equals the ``answer`` column);
5. the held-out accuracy (greedy) and pass@k before and after (:func:`dsv3.train.rl_eval.evaluate_prompts`),
   and the sampled-reward curve of the run (its metrics.jsonl).

Prints one JSON line per seed; ``--plot FILE`` draws the curves.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch

from dsv3.config import ModelConfig

EOS = "<|eos|>"


def char_tokenizer():
    """A character-level ``tokenizers.Tokenizer``: EOS = 0, digits 1..10, ``+`` 11, ``=`` 12."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {EOS: 0, **{str(d): d + 1 for d in range(10)}, "+": 11, "=": 12}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([EOS])
    return tok


def toy_config(**changes) -> ModelConfig:
    """A tiny DeepSeek-V3 MoE for 16 tokens and 32 positions."""
    base = dict(
        model_type="deepseek_v3",
        vocab_size=16,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_shared_experts=1,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        num_nextn_predict_layers=0,
        rope_theta=10000.0,
        max_position_embeddings=32,
        rms_norm_eps=1e-6,
    )
    base.update(changes)
    return ModelConfig.from_dict(base)


def addition_split(
    seed: int, held_out: int = 100, limit: int = 20
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """All pairs (a, b) with a, b < ``limit``, shuffled by ``seed``: (training pairs, ``held_out`` pairs)."""
    pairs = [(a, b) for a in range(limit) for b in range(limit)]
    random.Random(seed).shuffle(pairs)
    return pairs[held_out:], pairs[:held_out]


def write_prompts(path: str, pairs) -> str:
    """A GRPO prompt file: ``{"prompt": "a+b=", "answer": "c"}`` per line."""
    with open(path, "w", encoding="utf-8") as fh:
        for a, b in pairs:
            fh.write(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n")
    return path


def _sft_batch(tok, pairs, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``a+b=c<eos>`` inputs and labels (the answer and its EOS only)."""
    rows = []
    for a, b in pairs:
        prompt, answer = tok.encode(f"{a}+{b}=").ids, tok.encode(str(a + b)).ids + [eos_id]
        rows.append((prompt + answer, len(prompt)))
    width = max(len(r) for r, _ in rows) - 1
    ids = torch.full((len(rows), width), eos_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (seq, n_prompt) in enumerate(rows):
        ids[i, : len(seq) - 1] = torch.tensor(seq[:-1])
        labels[i, n_prompt - 1 : len(seq) - 1] = torch.tensor(seq[n_prompt:])
    return ids, labels


def greedy_accuracy(model, tok, pairs, eos_id: int) -> float:
    """Fraction of ``pairs`` whose greedy completion is exactly the sum."""
    from dsv3.infer.generate import generate_batch

    prompts = [tok.encode(f"{a}+{b}=").ids for a, b in pairs]
    out = generate_batch(model, prompts, max_new_tokens=4, temperature=0.0, eos_id=eos_id)
    return sum(tok.decode(o) == str(a + b) for o, (a, b) in zip(out, pairs)) / len(pairs)


def short_sft(
    seed: int,
    train_pairs,
    held_out,
    *,
    target: float = 0.45,
    max_steps: int = 1500,
    batch: int = 64,
    lr: float = 3e-3,
    check_every: int = 10,
    log=print,
):
    """Train a fresh toy model on ``a+b=c`` until greedy held-out accuracy reaches ``target`` (or ``max_steps``);
    returns ``(model, tokenizer, steps, accuracy)``."""
    from dsv3.model import DeepseekV3ForCausalLM
    from dsv3.train.optim import build_optimizer

    torch.manual_seed(seed)
    tok = char_tokenizer()
    model = DeepseekV3ForCausalLM(toy_config())
    model.reset_parameters(seed)
    opt = build_optimizer(model, lr=lr, betas=(0.9, 0.95), weight_decay=0.0, eps=1e-8)
    rng, acc, step = random.Random(seed), 0.0, 0
    while step < max_steps:
        ids, labels = _sft_batch(tok, rng.choices(train_pairs, k=batch), 0)
        model.train()
        out = model(ids, labels, seq_aux_alpha=0.0)  # no sequence-wise balance loss in this toy
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_router_bias(out.expert_load, 1e-3)
        step += 1
        if step % check_every == 0:
            acc = greedy_accuracy(model, tok, held_out, 0)
            log(f"  sft step {step}: loss {float(out.loss.detach()):.3f}, held-out accuracy {acc:.2f}")
            if acc >= target:
                break
    return model, tok, step, acc


def save_checkpoint_dir(model, tok, directory: str) -> str:
    """The model as a Hugging Face checkpoint directory with its tokenizer.json (what --init-from reads)."""
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    tok.save(os.path.join(directory, "tokenizer.json"))
    return directory


def grpo_options(init: str, prompts: str, run_dir: str, **changes) -> dict:
    """The toy run's ``dsv3 train --task grpo`` options (flat names, as on the command line)."""
    opts = dict(
        task="grpo",
        init_from=init,
        data=prompts,
        reward="math",
        run_dir=run_dir,
        group_size=8,
        global_batch=128,
        micro_batch=128,
        max_completion_tokens=4,
        temperature=1.0,
        beta=0.04,
        lr=1.5e-4,
        min_lr=1.5e-4,
        warmup_steps=0,
        steps=800,
        save_every=1000,
        keep_last=1,
        progress=False,
        tensorboard=False,
        seed=0,
        grad_clip=1.0,
        weight_decay=0.0,
    )
    opts.update(changes)
    return opts


def run_seed(seed: int, out: str, steps: int, log=print) -> dict:
    """SFT, GRPO and the before/after measurement of one seed; returns the result record."""
    from dsv3.train.config import TrainConfig
    from dsv3.train.grpo_run import train_grpo
    from dsv3.train.metrics import read_metrics
    from dsv3.train.rl_eval import evaluate_prompts

    train_pairs, held_out = addition_split(seed)
    base = os.path.join(out, f"seed{seed}")
    os.makedirs(base, exist_ok=True)
    t0 = time.time()
    model, tok, sft_steps, _ = short_sft(seed, train_pairs, held_out, log=log)
    init = save_checkpoint_dir(model, tok, os.path.join(base, "sft"))
    sft_time = time.time() - t0
    prompts = write_prompts(os.path.join(base, "train.jsonl"), train_pairs)
    held = write_prompts(os.path.join(base, "held_out.jsonl"), held_out)
    before = evaluate_prompts(init, held, ["math"], samples=8, temperature=1.0, max_new_tokens=4)
    before_greedy = evaluate_prompts(init, held, ["math"], samples=1, temperature=0.0, max_new_tokens=4)
    t1 = time.time()
    config = TrainConfig.from_dict(grpo_options(init, prompts, os.path.join(base, "grpo"), steps=steps, seed=seed))
    train_grpo(config, log=log)
    grpo_time = time.time() - t1
    after = evaluate_prompts(os.path.join(base, "grpo"), held, ["math"], samples=8, temperature=1.0, max_new_tokens=4)
    after_greedy = evaluate_prompts(
        os.path.join(base, "grpo"), held, ["math"], samples=1, temperature=0.0, max_new_tokens=4
    )
    curve = [(m["step"], m["reward"]) for m in read_metrics(os.path.join(base, "grpo")) if "reward" in m]
    return {
        "seed": seed,
        "sft_steps": sft_steps,
        "sft_s": round(sft_time, 1),
        "grpo_s": round(grpo_time, 1),
        "accuracy_before": before_greedy.mean_reward,
        "accuracy_after": after_greedy.mean_reward,
        "sampled_before": before.mean_reward,
        "sampled_after": after.mean_reward,
        "pass@8_before": before.pass_at[8],
        "pass@8_after": after.pass_at[8],
        "reward_curve": curve,
    }


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for r in results:
        steps, rewards = zip(*r["reward_curve"])
        (line,) = ax.plot(steps, rewards, alpha=0.3, linewidth=0.8)
        window = 25
        smooth = [
            sum(rewards[max(0, i - window + 1) : i + 1]) / len(rewards[max(0, i - window + 1) : i + 1])
            for i in range(len(rewards))
        ]
        ax.plot(
            steps,
            smooth,
            color=line.get_color(),
            label=f"seed {r['seed']}: held-out greedy accuracy {r['accuracy_before']:.2f} -> {r['accuracy_after']:.2f}",
        )
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("sampled reward (mean of 128)")
    ax.set_title("GRPO on a+b= (operands < 20): tiny DeepSeek-V3 MoE, 2 CPU cores", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--out", default="runs/grpo-toy")
    p.add_argument("--plot", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    results = []
    for seed in args.seeds:
        r = run_seed(seed, args.out, args.steps, log=lambda line: print(line, file=sys.stderr))
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "reward_curve"}), flush=True)
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(results, fh)
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
