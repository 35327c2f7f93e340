"""Per-rank peak memory of training steps against ``dsv3 plan``, for one process and the parallel layouts.

Each layout runs in freshly spawned gloo processes on 127.0.0.1 (``tests/dist_helpers.py``), one per rank,
each as ``torchrun ... dsv3 train`` sets it up: :func:`dsv3.train.session.build_session` (meta-device build,
``parallelize``, materialisation of the held tensors only), then ``--steps`` optimizer steps. Per rank:

- ``idle``: the resident set of the runtime alone (libraries imported, process group joined, the run's
  tokenizer and packed data built and handed to the session), measured in the same process just before
  the set-up; the peak counter is then reset (``/proc/self/clear_refs``);
- ``peak``: the high-water mark of the resident set over the set-up and the steps, minus ``idle``
  (on a GPU: ``torch.cuda.max_memory_allocated``);
- ``weights`` / ``grads`` / ``optimizer``: the bytes of the rank's parameters and buffers, of one
  gradient per parameter, and of its ZeRO-1 state (``ZeroAdamW.state_bytes()``);
- ``plan``: ``dsv3 plan --json`` for the same model and layout, the rank's pipeline device
  (``weights``, ``grads``, ``optimizer_by_dp_rank[dp_rank]``, ``total`` with its fragmentation allowance).

The default model (``--hidden 1024``: 240M parameters, 1.1 GiB of FP32 weights) has 5 layers (one dense)
of 32 routed experts and one MTP module. Layouts: ``one`` (one process, 8 micro-batches: the global batch of
``pp2-dp2-ep2``, the reference of the ratio), ``one-mb1`` (one process, 1 micro-batch), ``dp4-ep4``,
``pp2-dp2-ep2`` (1F1B), ``dualpipev`` (pp4 on 2 devices x dp2 x ep2).

Run ``one`` first (the default order): it builds the run's token cache, which a distributed layout would
otherwise build in every rank before the idle reading (a larger idle heap, reused later, understates the peak).

    python bench/scale_memory.py [--layouts one,one-mb1,dp4-ep4,pp2-dp2-ep2,dualpipev] [--steps 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

LAYOUTS = {
    "one": dict(world=1, micro_batches=8),  # the global batch of pp2-dp2-ep2: the same training run in one process
    "one-mb1": dict(world=1, micro_batches=1),  # one sequence per step: no gradient accumulation
    "dp4-ep4": dict(world=4, dp=4, ep=4),
    "pp2-dp2-ep2": dict(world=4, pp=2, dp=2, ep=2, pipeline="1f1b"),
    "dualpipev": dict(world=4, pp=4, dp=2, ep=2, pipeline="dualpipev"),
}
SEQ_LEN, MICRO_BATCH = 64, 1
PRECISION = "weights=fp32,grads=fp32,moments=fp32,activations=fp32,router=fp32,master=none"


def model_config(hidden: int):
    """The bench's model: DeepSeek-V3-shaped, 5 layers (the first dense), 32 routed experts, MTP."""
    from dsv3.config import ModelConfig

    return ModelConfig.from_dict(
        dict(
            model_type="deepseek_v3",
            vocab_size=8192,
            hidden_size=hidden,
            intermediate_size=hidden * 11 // 4,
            moe_intermediate_size=hidden // 2,
            num_hidden_layers=5,
            first_k_dense_replace=1,
            num_attention_heads=8,
            num_key_value_heads=8,
            q_lora_rank=hidden // 4,
            kv_lora_rank=128,
            qk_nope_head_dim=64,
            qk_rope_head_dim=32,
            v_head_dim=64,
            n_shared_experts=1,
            n_routed_experts=32,
            num_experts_per_tok=4,
            n_group=4,
            topk_group=2,
            topk_method="noaux_tc",
            scoring_func="sigmoid",
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            num_nextn_predict_layers=1,
            max_position_embeddings=512,
            rms_norm_eps=1e-6,
        )
    )


def global_batch(layout: dict) -> int:
    """Sequences per step: 4 micro-batches per pipeline (2 x pp under DualPipeV), one per dp rank without one
    (one process: ``micro_batches``)."""
    if "micro_batches" in layout:
        return MICRO_BATCH * layout["micro_batches"]
    per = 2 * layout["pp"] if layout.get("pipeline") == "dualpipev" else (4 if layout.get("pp", 1) > 1 else 1)
    return MICRO_BATCH * layout.get("dp", 1) * per


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))


def _warm_runtime(config) -> None:
    """The idle runtime: the modules a session imports, and its tokenizer and packed data, built here once and
    handed to the session (so that neither counts as the model's memory). ``torch._dynamo`` is imported here
    because the meta-device build imports it lazily (``nn.init`` on meta runs ``torch._refs``, which are
    dynamo-disabled): 0.07 GiB of library code (sympy included) per process, not model memory."""
    import torch._dynamo  # noqa: F401

    import dsv3.memory.ema  # noqa: F401
    import dsv3.parallel.parallelize  # noqa: F401
    import dsv3.parallel.pipeline.train  # noqa: F401
    import dsv3.train.session as session
    from dsv3.train.preflight import model_config_for

    mcfg = model_config_for(config)
    tokenizer = session.build_tokenizer(config, mcfg.vocab_size, "")
    data = session.build_training_data(config, tokenizer, mcfg, "")
    session.build_tokenizer = lambda *args, **kwargs: tokenizer
    session.build_training_data = lambda *args, **kwargs: data


def rank_run(rank: int, config_dir: str, layout: dict, steps: int) -> dict:
    """One spawned rank: join the world, measure the idle runtime, set up, step, report."""
    import torch

    from dsv3.parallel.world import init_parallel
    from dsv3.train.config import TrainConfig
    from dsv3.train.session import build_session
    from dsv3.train.step import train_step

    p = {k: layout[k] for k in ("pp", "dp", "ep", "pipeline") if k in layout}
    opts = dict(
        model=config_dir,
        seq_len=SEQ_LEN,
        micro_batch=MICRO_BATCH,
        global_batch=global_batch(layout),
        steps=steps,
        device="cpu",
        **p,
    )
    config = TrainConfig.from_dict(opts)
    ctx = None
    if layout["world"] > 1:
        ctx = init_parallel(p.get("pp", 1), p.get("dp"), p.get("ep", 1), schedule=p.get("pipeline"), device="cpu")
    _warm_runtime(config)
    if ctx is not None:
        ctx.barrier()
    idle = _rss()
    with open("/proc/self/clear_refs", "w") as fh:  # the peak counter starts at the idle runtime
        fh.write("5")
    s = build_session(config, parallel=ctx, write=False)
    try:
        for _ in range(steps):
            s.begin_step()
            batches, _ = s.next_batches()
            train_step(s, batches)
            s.step += 1
        peak = _hwm()
        params = [t for t in s.model.parameters()]
        return {
            "rank": s.parallel.rank,
            "pp_rank": s.parallel.pp_rank,
            "dp_rank": s.parallel.dp_rank,
            "idle": idle,
            "peak": peak - idle,
            "weights": sum(t.numel() * t.element_size() for t in params + list(s.model.buffers())),
            "grads": sum(t.numel() * t.element_size() for t in params if t.requires_grad),
            "optimizer": s.optimizer.state_bytes(),
            "cuda_peak": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        }
    finally:
        s.close()


def plan_of(config_dir: str, layout: dict) -> dict:
    """``dsv3 plan --json`` for the layout (the same model, batch and formats)."""
    from dsv3.cli import main

    args = [
        "plan",
        "--config",
        config_dir,
        "--seq-len",
        str(SEQ_LEN),
        "--micro-batch",
        str(MICRO_BATCH),
        "--global-batch",
        str(global_batch(layout)),
        "--precision",
        PRECISION,
        "--json",
    ]
    for k in ("pp", "dp", "ep"):
        if k in layout:
            args += [f"--{k}", str(layout[k])]
    if "pipeline" in layout:
        args += ["--schedule", layout["pipeline"]]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(args)
    return json.loads(out.getvalue())


def run_layout(name: str, config_dir: str, steps: int, timeout: float) -> list[dict]:
    """Every rank's row of one layout: measured and planned bytes."""
    from dist_helpers import run_ranks

    layout = LAYOUTS[name]
    ranks = run_ranks(
        rank_run,
        layout["world"],
        config_dir,
        layout,
        steps,
        timeout=timeout,
        env={"LOCAL_WORLD_SIZE": str(layout["world"])},
    )
    doc = plan_of(config_dir, layout)
    rows = []
    for r in ranks:
        dev = doc["devices"][r["pp_rank"]]["memory_bytes"]
        opt = (dev.get("optimizer_by_dp_rank") or [dev["optimizer"]] * layout.get("dp", 1))[r["dp_rank"]]
        plan = {
            "weights": dev["weights"],
            "grads": dev["grads"],
            "optimizer": opt,
            "total": dev["total"],
            "total_without_fragmentation": dev["total"] - dev["fragmentation"],
        }
        rows.append({"layout": name, **r, "plan": plan, "peak_over_plan": r["peak"] / plan["total"]})
    return rows


def markdown(rows: list[dict]) -> str:
    gib = 2.0**30
    lines = [
        "| layout | rank | weights = plan | grads = plan | optimizer = plan | idle RSS GiB | peak - idle GiB "
        "| plan total GiB (no frag.) | peak / plan | peak / one-process peak (one-mb1) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    one = next((r["peak"] for r in rows if r["layout"] == "one"), None)
    mb1 = next((r["peak"] for r in rows if r["layout"] == "one-mb1"), None)
    for r in rows:
        eq = {
            k: "yes" if r[k] == r["plan"][k] else f"{r[k]} vs {r['plan'][k]}" for k in ("weights", "grads", "optimizer")
        }
        rel = (f"{r['peak'] / one:.3f}" if one else "-") + (f" ({r['peak'] / mb1:.3f})" if mb1 else "")
        lines.append(
            f"| {r['layout']} | {r['rank']} | {eq['weights']} | {eq['grads']} | {eq['optimizer']} "
            f"| {r['idle'] / gib:.2f} | {r['peak'] / gib:.3f} | {r['plan']['total'] / gib:.3f} "
            f"({r['plan']['total_without_fragmentation'] / gib:.3f}) | {r['peak_over_plan']:.3f} | {rel} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated: " + ", ".join(LAYOUTS))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size (1024: 1.1 GiB of FP32 weights)")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    config_dir = tempfile.mkdtemp(prefix="dsv3-scale-")
    model_config(args.hidden).save(os.path.join(config_dir, "config.json"))
    rows = []
    for name in args.layouts.split(","):
        rows += run_layout(name, config_dir, args.steps, args.timeout)
        print(markdown(rows), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
