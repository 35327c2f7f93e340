"""Check the planner against what a built model and optimizer really allocate.

For a preset (``tiny``, ``small``) on one device (PP = TP = EP = DP = 1), this
builds :class:`dsv3.model.transformer.DeepseekV3ForCausalLM`, runs one training
step with the trainer's AdamW (:mod:`dsv3.train.optim`) and compares:

- weights: bytes of every parameter and buffer;
- gradients: bytes of every ``.grad`` after the backward;
- optimizer: bytes of the optimizer's state tensors after the step;
- activations: bytes autograd saves for backward during the forward, captured
  with ``torch.autograd.graph.saved_tensors_hooks`` and counted once per
  storage (keyed by ``untyped_storage().data_ptr()``, sized by the storage's
  ``nbytes``), leaving out the storages of parameters and buffers (weights,
  counted above);

with ``dsv3.plan.planner.make_plan`` for the same layout and formats. The
planner's weights, gradients and optimizer bytes must be equal; its activation
bytes within 10 %. Recompute policies other than ``none`` are measured when the
trainer has them (``dsv3.memory.recompute.apply_recompute``).

    python bench/plan_vs_measured.py                 # tiny and small, FP32 and BF16, each policy
    python bench/plan_vs_measured.py --preset tiny --seq-len 128 --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dsv3.config import load_preset  # noqa: E402
from dsv3.plan.layout import Layout  # noqa: E402
from dsv3.plan.planner import make_plan  # noqa: E402
from dsv3.plan.precision import Precision  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def planner_precision(dtype: str, moments: str) -> Precision:
    """The formats the trainer uses: parameters (router included) and gradients in the model dtype, no
    master copy (the parameters are updated in place), AdamW moments in ``moments``, activations in the
    model dtype; the router computes in FP32 whatever the model dtype."""
    return Precision(weights=dtype, grads=dtype, master="none", moments=moments, router=dtype, router_compute="fp32",
                     activations=dtype, stats="fp32", loss="fp32")


def recompute_available() -> bool:
    try:
        from dsv3.memory.recompute import apply_recompute  # noqa: F401
    except ImportError:
        return False
    return True


def measure(preset: str, seq_len: int, micro_batch: int = 1, dtype: str = "fp32", moments: str = "fp32",
            recompute: str = "none", seed: int = 0) -> dict:
    """Build the model, run one step, and return the measured and planned bytes."""
    from dsv3.model.transformer import DeepseekV3ForCausalLM
    from dsv3.train.optim import AdamW, optimizer_state_bytes

    torch.manual_seed(seed)
    cfg = load_preset(preset)
    model = DeepseekV3ForCausalLM(cfg).to(DTYPES[dtype])
    model.train()
    if recompute != "none":
        from dsv3.memory.recompute import apply_recompute

        apply_recompute(model, recompute)
    opt = AdamW(model.parameters(), moments_dtype=moments)
    ids = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len + 1))
    inputs, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    weight_ptrs = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in weight_ptrs and storage.nbytes() > 0:
            saved[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(inputs, labels=labels)
    activations = sum(saved.values())
    out.loss.backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    opt.step()
    measured = {
        "weights": sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())),
        "grads": grads,
        "optimizer": optimizer_state_bytes(opt),
        "activations": activations,
    }
    plan = make_plan(cfg, Layout(seq_len=seq_len, micro_batch=micro_batch, recompute=recompute, zero=0),
                     planner_precision(dtype, moments), model_name=preset)
    stage = plan.stages[0]
    planned = {
        "weights": stage.weights,
        "grads": stage.grads,
        "optimizer": stage.optimizer,
        "activations": stage.activations_per_microbatch,
    }
    return {
        "preset": preset, "seq_len": seq_len, "micro_batch": micro_batch, "dtype": dtype, "moments": moments,
        "recompute": recompute, "measured": measured, "planned": planned,
        "ratio": {k: planned[k] / measured[k] for k in measured},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", action="append", help="preset(s) to check (default tiny and small)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    policies = ["none", "selective", "full"] if recompute_available() else ["none"]
    rows = []
    for preset in args.preset or ["tiny", "small"]:
        for dtype, moments in (("fp32", "fp32"), ("bf16", "bf16")):
            for policy in policies:
                rows.append(measure(preset, args.seq_len, args.micro_batch, dtype, moments, policy))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'preset':8s} {'dtype':5s} {'recompute':10s} {'item':12s} {'measured':>14s} {'planned':>14s} {'ratio':>7s}")
        for r in rows:
            for k in ("weights", "grads", "optimizer", "activations"):
                print(f"{r['preset']:8s} {r['dtype']:5s} {r['recompute']:10s} {k:12s} {r['measured'][k]:14,d} "
                      f"{r['planned'][k]:14,.0f} {r['ratio'][k]:7.4f}")
        if len(policies) == 1:
            print("recompute selective/full: not measured (dsv3.memory.recompute is not in this tree yet)")
    ok = all(r["ratio"][k] == 1.0 for r in rows for k in ("weights", "grads", "optimizer")) and all(
        abs(r["ratio"]["activations"] - 1) <= 0.10 for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
