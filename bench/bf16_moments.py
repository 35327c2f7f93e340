"""Do BF16 AdamW moments change the loss curve? Compare against the run-to-run noise.

Trains the ``tiny`` preset three times on the Python standard library: FP32 moments with seed 0,
BF16 moments with seed 0 (same initialisation and data order), and FP32 moments with seed 1 (the
noise reference: a different initialisation and data order). Reports the final training loss of
each (mean of the last 20 steps), the BF16-vs-FP32 difference, the seed-to-seed difference, the
largest per-step gap between the two seed-0 curves after warm-up, and writes a PNG of the curves.

    python bench/bf16_moments.py [--steps 300] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

TAIL = 20


def run(label: str, args, out: str, **changes) -> list[float]:
    from dsv3.train.config import TrainConfig
    from dsv3.train.loop import train
    from dsv3.train.metrics import read_metrics

    config = TrainConfig(model="tiny", steps=args.steps, run_dir=os.path.join(out, label), eval_every=10**9,
                         save_every=10**9, sample_tokens=0, progress=False, tensorboard=False, **changes)
    train(config, log=lambda s: None)
    losses = [r["loss"] for r in read_metrics(config.run_dir) if "loss" in r]
    print(f"{label}: final loss {sum(losses[-TAIL:]) / TAIL:.4f}", flush=True)
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="dsv3-bf16-moments-")
    curves = {
        "fp32 moments, seed 0": run("fp32-seed0", args, out, optim_states="fp32", seed=0),
        "bf16 moments, seed 0": run("bf16-seed0", args, out, optim_states="bf16", seed=0),
        "fp32 moments, seed 1": run("fp32-seed1", args, out, optim_states="fp32", seed=1),
    }
    final = {k: sum(v[-TAIL:]) / TAIL for k, v in curves.items()}
    a, b, c = final.values()
    warm = min(50, args.steps // 2)
    gap = max(abs(x - y) for x, y in zip(list(curves.values())[0][warm:], list(curves.values())[1][warm:]))
    result = {"final_loss": final, "bf16_vs_fp32_rel": abs(b - a) / a, "seed_noise_rel": abs(c - a) / a,
              "max_step_gap_after_warmup": gap}
    print(json.dumps(result, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=label, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("tiny preset: AdamW moments in BF16 vs FP32 (and seed noise)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "bf16_moments.png"), dpi=120)
    print(f"picture: {os.path.join(out, 'bf16_moments.png')}")


if __name__ == "__main__":
    main()
