"""Do BF16 AdamW moments change the loss curve? Compare against the run-to-run noise.

Trains the ``tiny`` preset on the Python standard library four times: FP32 moments with seed 0,
BF16 moments with seed 0 (same initialisation and data order), and FP32 moments with seeds 1 and 2
(the noise reference: other initialisations and data orders). Every run is evaluated on the same
held-out validation sequences (``--eval-batches`` micro-batches, every ``--eval-every`` steps and at
the end). Reports:

* the final validation loss of each run, the BF16-vs-FP32 relative difference (same seed) and the
  seed-to-seed spread of the FP32 runs (largest relative difference between two of them): BF16
  moments are "within noise" when their difference is at most that spread;
* the final training loss (mean of the last 20 steps), and the largest per-step gap between the two
  seed-0 training curves after warm-up;

and writes a PNG of the curves. Exit code 0 when BF16 is within noise, 1 otherwise.

    python bench/bf16_moments.py [--steps 300] [--eval-every 100] [--eval-batches 32] [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile

TAIL = 20
RUNS = {  # label: (optimizer moments, seed)
    "fp32 moments, seed 0": ("fp32", 0),
    "bf16 moments, seed 0": ("bf16", 0),
    "fp32 moments, seed 1": ("fp32", 1),
    "fp32 moments, seed 2": ("fp32", 2),
}


def run(label: str, args, out: str, moments: str, seed: int) -> tuple[list[float], list[tuple[int, float]]]:
    """Train one run; return its per-step training losses and its (step, validation loss) points."""
    from dsv3.train.config import TrainConfig
    from dsv3.train.loop import train
    from dsv3.train.metrics import read_metrics

    run_dir = os.path.join(out, label.replace(" moments, seed ", "-seed"))
    config = TrainConfig.from_dict(
        dict(
            model="tiny",
            steps=args.steps,
            run_dir=run_dir,
            eval_every=args.eval_every,
            eval_batches=args.eval_batches,
            save_every=10**9,
            sample_tokens=0,
            progress=False,
            tensorboard=False,
            optim_states=moments,
            seed=seed,
        )
    )
    train(config, log=lambda s: None)
    records = read_metrics(run_dir)
    losses = [r["loss"] for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    print(f"{label}: final val loss {val[-1][1]:.4f}, final train loss {sum(losses[-TAIL:]) / TAIL:.4f}", flush=True)
    return losses, val


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-batches", type=int, default=32)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="dsv3-bf16-moments-")
    results = {label: run(label, args, out, *spec) for label, spec in RUNS.items()}
    val = {k: v[1][-1][1] for k, v in results.items()}
    train_tail = {k: sum(v[0][-TAIL:]) / TAIL for k, v in results.items()}
    fp32, bf16 = val["fp32 moments, seed 0"], val["bf16 moments, seed 0"]
    fp32_runs = [v for k, v in val.items() if k.startswith("fp32")]
    noise = max(abs(x - y) / min(x, y) for x, y in itertools.combinations(fp32_runs, 2))
    warm = min(50, args.steps // 2)
    a, b = results["fp32 moments, seed 0"][0], results["bf16 moments, seed 0"][0]
    gap = max(abs(x - y) for x, y in zip(a[warm:], b[warm:]))
    result = {
        "final_val_loss": val,
        "final_train_loss_last20": train_tail,
        "bf16_vs_fp32_val_rel": abs(bf16 - fp32) / fp32,
        "seed_spread_val_rel": noise,
        "within_noise": abs(bf16 - fp32) / fp32 <= noise,
        "max_step_gap_after_warmup": gap,
    }
    print(json.dumps(result, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (label, (losses, points)) in enumerate(results.items()):
        color = f"C{i}"
        ax.plot(range(1, len(losses) + 1), losses, color=color, label=f"{label} (train)", linewidth=0.8, alpha=0.6)
        ax.plot(
            [s for s, _ in points],
            [v for _, v in points],
            "o-",
            color=color,
            label=f"{label} (validation)",
            linewidth=1.5,
            markersize=4,
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("tiny preset: AdamW moments in BF16 vs FP32 (and seed noise)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "bf16_moments.png"), dpi=120)
    print(f"picture: {os.path.join(out, 'bf16_moments.png')}")
    sys.exit(0 if result["within_noise"] else 1)


if __name__ == "__main__":
    main()
