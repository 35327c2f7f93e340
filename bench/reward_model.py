"""Reward-model benchmark: a tiny dsv3 reward model learns a rule from preference pairs; the sandbox's cost.

Rule task ("digits"): prompts "a+b=" (operands below 20); "chosen" is the sum in digits, "rejected" the same
with a letter inserted (it breaks the rule "the answer is digits only"). Harder task ("sum"): "chosen" is
the correct sum, "rejected" a wrong one (off by 1 to 3): the model must add to rank them.

For each task and seed: ``dsv3 train --task reward`` (the library call) on 960 pairs, 20 % held out,
held-out pairwise accuracy before (step 0, untrained head) and after, and wall time. Then the code
sandbox: median milliseconds per program (``print(1)``) under ``namespaces`` and ``rlimits`` against a plain
``python -c`` subprocess, interleaved.

    PYTHONPATH=src python bench/reward_model.py [--steps 60] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

from dsv3.config import ModelConfig
from dsv3.train.config import load_train_config
from dsv3.train.reward_model import train_reward_model

TINY = dict(
    model_type="deepseek_v3",
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=3,
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
    n_group=4,
    topk_group=2,
    topk_method="noaux_tc",
    scoring_func="sigmoid",
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    num_nextn_predict_layers=1,
    max_position_embeddings=256,
)


def preference_pairs(n: int, seed: int, task: str = "digits") -> list[dict[str, str]]:
    """``n`` pairs of the rule task (``digits``: a letter breaks the rule) or the ``sum`` task (a wrong sum)."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        a, b = rng.randrange(20), rng.randrange(20)
        answer = str(a + b)
        if task == "digits":
            cut = rng.randrange(len(answer) + 1)
            bad = answer[:cut] + rng.choice("xyzq") + answer[cut:]
        else:
            bad = str(a + b + rng.choice([-3, -2, -1, 1, 2, 3]))
        pairs.append({"prompt": f"{a}+{b}=", "chosen": answer, "rejected": bad})
    return pairs


def run_task(task: str, seed: int, steps: int, root: str) -> dict:
    data = os.path.join(root, f"{task}-{seed}.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in preference_pairs(960, seed, task))
    model = os.path.join(root, "config.json")
    ModelConfig.from_dict(TINY).save(model)
    run_dir = os.path.join(root, f"run-{task}-{seed}")
    config = load_train_config(
        None,
        dict(
            task="reward",
            data=data,
            model=model,
            seq_len=16,
            micro_batch=32,
            global_batch=32,
            steps=steps,
            lr=3e-3,
            min_lr=3e-4,
            warmup_steps=5,
            eval_every=max(1, steps // 4),
            val_fraction=0.2,
            progress=False,
            tensorboard=False,
            run_dir=run_dir,
            seed=seed,
        ),
    )
    result = train_reward_model(config, log=lambda line: None)
    records = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    curve = [(r["step"], round(r["val_accuracy"], 3)) for r in records if "val_accuracy" in r]
    return {
        "task": task,
        "seed": seed,
        "steps": steps,
        "first_step_train_accuracy": records[0]["accuracy"],
        "val_accuracy_curve": curve,
        "val_accuracy": result.val_accuracy,
        "wall_s": round(result.wall_time, 1),
    }


def sandbox_costs(repeats: int = 15) -> dict:
    """Median ms per program: plain subprocess vs the sandbox's two modes, interleaved."""
    from dsv3.train import sandbox

    times: dict[str, list[float]] = {"plain": [], "namespaces": [], "rlimits": []}
    for _ in range(repeats):
        for mode in times:
            t0 = time.perf_counter()
            if mode == "plain":
                subprocess.run([sys.executable, "-I", "-S", "-c", "print(1)"], check=True, capture_output=True)
            else:
                assert sandbox._launch(mode, "print(1)\n", 5.0, 256).ok
            times[mode].append((time.perf_counter() - t0) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {f"{k}_ms": round(v, 1) for k, v in med.items()} | {
        f"{k}_over_plain": round(med[k] / med["plain"], 2) for k in ("namespaces", "rlimits")
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--tasks", nargs="+", default=["digits", "sum"])
    args = ap.parse_args()
    print(json.dumps({"load_avg": os.getloadavg()}))
    with tempfile.TemporaryDirectory() as root:
        for task in args.tasks:
            for seed in args.seeds:
                print(json.dumps(run_task(task, seed, args.steps, root)), flush=True)
    print(json.dumps({"sandbox": sandbox_costs(), "load_avg": os.getloadavg()}))


if __name__ == "__main__":
    main()
