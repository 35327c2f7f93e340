"""Passkey retrieval at 2x and 4x the pre-training length, with and without a short YaRN extension.

1. Pre-train a tiny model (default RoPE, max_position_embeddings = L0) on passkey documents of
   L0/2..L0 tokens (:func:`dsv3.train.evaluation.passkey_sample` without the introduction:
   filler text, a five-digit key hidden at a random depth, the question and the key; next-token
   loss on every token). Retrieval (an induction circuit) appears after ~1000 steps.
2. From that checkpoint, three ways to reach 4 * L0:
   - none: the pre-trained model as is (RoPE extrapolation);
   - rope: a short fine-tune on documents of L0..4 L0 tokens with plain RoPE;
   - yarn: :func:`dsv3.model.rope.extend_context` (factor 4, seq_len 4 L0: the official
     rope_scaling form) and the same short fine-tune (same data, steps and learning rate).
   YaRN without any fine-tuning is reported too.
3. At L0, 2 L0 and 4 L0: passkey accuracy (:func:`dsv3.train.evaluation.passkey_accuracy`,
   greedy retrieval of the whole key, needle depths spread over 0..1) and the next-token loss
   on 8 fixed held-out passkey documents of that length (the filler is predictable, so the loss
   shows whether the model still reads its positions correctly past the trained length).

    PYTHONPATH=src python bench/passkey.py [--l0 96 --pretrain-steps 1800 --extend-steps 100]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dsv3.config import ModelConfig
from dsv3.data.tokenizer import train_bpe_tokenizer
from dsv3.model import DeepseekV3ForCausalLM
from dsv3.model.rope import extend_context
from dsv3.model.transformer import apply_rope_config
from dsv3.train.evaluation import (
    PASSKEY_FILLER,
    PASSKEY_NEEDLE,
    PASSKEY_QUESTION,
    evaluate_loss,
    passkey_accuracy,
    passkey_sample,
)


def model_config(vocab: int, l0: int) -> ModelConfig:
    return ModelConfig.from_dict(
        dict(
            vocab_size=vocab,
            hidden_size=96,
            intermediate_size=192,
            moe_intermediate_size=48,
            num_hidden_layers=2,
            first_k_dense_replace=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=48,
            kv_lora_rank=32,
            qk_nope_head_dim=24,
            qk_rope_head_dim=16,
            v_head_dim=24,
            n_shared_experts=1,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            num_nextn_predict_layers=0,
            rope_scaling=None,
            max_position_embeddings=l0,
            bos_token_id=0,
            eos_token_id=1,
        )
    )


def batch(tok, rng, size: int, lengths: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` passkey documents of random length in ``lengths`` (right-padded; padding has no target)."""
    docs = [
        passkey_sample(
            tok,
            int(rng.integers(lengths[0], lengths[1] + 1)),
            key=str(int(rng.integers(10000, 100000))),
            depth=float(rng.random()),
            intro="",
        ).ids
        for _ in range(size)
    ]
    width = max(len(d) for d in docs)
    ids = torch.full((size, width), 2, dtype=torch.long)
    labels = torch.full((size, width), -100, dtype=torch.long)
    for i, d in enumerate(docs):
        ids[i, : len(d)] = torch.tensor(d)
        labels[i, : len(d) - 1] = torch.tensor(d[1:])
    return ids[:, :-1], labels[:, :-1]


def train(model, tok, *, steps: int, size: int, lengths, lr: float, seed: int) -> float:
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 10)
    t0 = time.perf_counter()
    for step in range(steps):
        f = (
            (step + 1) / warmup
            if step < warmup
            else 0.1 + 0.45 * (1 + np.cos(np.pi * (step - warmup) / (steps - warmup)))
        )
        for g in opt.param_groups:
            g["lr"] = lr * f
        ids, labels = batch(tok, rng, size, lengths)
        model(ids, labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--l0", type=int, default=96, help="pre-training length")
    ap.add_argument("--pretrain-steps", type=int, default=1800)
    ap.add_argument("--extend-steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared 2-core machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    corpus = Path(tempfile.mkdtemp(prefix="bench-passkey-")) / "corpus.txt"
    corpus.write_text(
        "".join(
            PASSKEY_FILLER * 2
            + PASSKEY_NEEDLE.format(key=rng.integers(10000, 100000))
            + PASSKEY_QUESTION
            + f" {rng.integers(10000, 100000)}\n"
            for _ in range(500)
        )
    )
    tok = train_bpe_tokenizer([corpus], 320)
    l0 = args.l0
    lengths = (l0, 2 * l0, 4 * l0)
    cfg = model_config(320, l0)
    torch.manual_seed(args.seed)
    base = DeepseekV3ForCausalLM(cfg)
    wall = train(
        base, tok, steps=args.pretrain_steps, size=args.batch, lengths=(l0 // 2, l0), lr=args.lr, seed=args.seed
    )
    print(f"pre-trained at <= {l0} tokens: {args.pretrain_steps} steps of {args.batch} in {wall:.0f} s")

    held_out = {n: batch(tok, np.random.default_rng([args.seed, n]), 8, (n, n)) for n in lengths}

    def report(name, model):
        accs = [passkey_accuracy(model, tok, n, trials=args.trials, seed=args.seed + 1, intro="") for n in lengths]
        losses = [evaluate_loss(model, [held_out[n]]).loss for n in lengths]
        print(
            f"{name:34s} "
            + "  ".join(f"{n} ({n // l0}x): passkey {a:4.0%} loss {v:.3f}" for n, a, v in zip(lengths, accs, losses))
        )
        return accs

    report("none (pre-trained)", base)
    yarn_cfg = extend_context(cfg, 4, 4 * l0)
    print(f"yarn rope_scaling: {yarn_cfg.rope_scaling}, max_position_embeddings {yarn_cfg.max_position_embeddings}")
    report("yarn, no fine-tune", apply_rope_config(copy.deepcopy(base), yarn_cfg))
    small = max(1, args.batch // 4)  # 4x longer documents: same tokens per step
    for name, extend in (("rope, short fine-tune", False), ("yarn, short fine-tune", True)):
        model = copy.deepcopy(base)
        if extend:
            apply_rope_config(model, yarn_cfg)
        wall = train(
            model, tok, steps=args.extend_steps, size=small, lengths=(l0, 4 * l0), lr=args.lr / 3, seed=args.seed + 2
        )
        report(f"{name} ({args.extend_steps} st, {wall:.0f} s)", model)


if __name__ == "__main__":
    main()
