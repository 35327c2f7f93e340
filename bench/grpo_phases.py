"""A GRPO step's two phases, rollout and training, timed and sized (docs/rl.md, "Memory and speed").

    python bench/grpo_phases.py [--lengths 16 64] [--steps 3]

Builds the ``small`` preset (7 layers, 32 routed experts, top-4; vocab cut to 4096 and context to 512) with
random weights and the toy's character tokenizer, so completions run to the limit L (the worst case), and
runs ``dsv3 train --task grpo`` (G = 8, 32 completions per step, micro-batch 8, beta 0.04, mu 1) for a few
steps per L. Reports the median rollout and training time per step and their tokens/s from metrics.jsonl,
and the sizes of what each phase holds besides the weights: the latent KV cache of the rollout
(B x (T0 + L) x layers x (d_c + d_R)), the logits of a training micro-batch (b x (T0 + L) x V, float32, and
their gradient), the gradients and AdamW moments, and the reference model's host copy (float32).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path


def _toy():
    spec = importlib.util.spec_from_file_location("grpo_toy", Path(__file__).with_name("grpo_toy.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def sizes(model, rows: int, micro: int, width: int) -> dict[str, float]:
    """MiB of the phase-specific buffers for ``rows`` completions of ``width`` positions."""
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    cache = model.new_cache(rows, width)
    cache_bytes = sum(t.numel() * t.element_size() for t in cache.c_kv + cache.k_pe)
    mib = 2**20
    return {
        "weights_mib": params * 4 / mib,
        "kv_cache_mib": cache_bytes / mib,
        "logits_mib": 2 * micro * width * cfg.vocab_size * 4 / mib,
        "grads_adam_mib": 3 * params * 4 / mib,
        "reference_host_mib": params * 4 / mib,
    }


def measure(length: int, steps: int, root: str) -> dict:
    from dsv3.config import load_preset
    from dsv3.model import DeepseekV3ForCausalLM
    from dsv3.train.config import TrainConfig
    from dsv3.train.grpo_run import train_grpo
    from dsv3.train.metrics import read_metrics

    toy = _toy()
    cfg = load_preset("small").replace(vocab_size=4096, max_position_embeddings=512, num_nextn_predict_layers=0)
    model = DeepseekV3ForCausalLM(cfg)
    model.reset_parameters(0)
    init = toy.save_checkpoint_dir(model, toy.char_tokenizer(), os.path.join(root, f"init{length}"))
    train, _ = toy.addition_split(0)
    prompts = toy.write_prompts(os.path.join(root, "p.jsonl"), train)
    run_dir = os.path.join(root, f"run{length}")
    opts = toy.grpo_options(
        init,
        prompts,
        run_dir,
        steps=steps,
        global_batch=32,
        micro_batch=8,
        group_size=8,
        max_completion_tokens=length,
        beta=0.04,
        lr=1e-6,
        min_lr=1e-6,
    )
    train_grpo(TrainConfig.from_dict(opts), log=lambda line: None)
    m = read_metrics(run_dir)[1:]  # the first step warms up
    roll, train_t = statistics.median(x["rollout_time"] for x in m), statistics.median(x["train_time"] for x in m)
    width = int(statistics.median(x["completion_length_max"] for x in m)) + 6
    return {
        "L": length,
        "rollout_s": round(roll, 3),
        "train_s": round(train_t, 3),
        "rollout_over_train": round(roll / train_t, 2),
        "rollout_tokens_per_s": round(statistics.median(x["rollout_tokens_per_s"] for x in m)),
        "train_tokens_per_s": round(statistics.median(x["train_tokens_per_s"] for x in m)),
        **{k: round(v, 1) for k, v in sizes(model, 32, 8, width).items()},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[16, 64])
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as root:
        for length in args.lengths:
            print(json.dumps(measure(length, args.steps, root)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
