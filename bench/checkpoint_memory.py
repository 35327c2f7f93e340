"""Peak memory of a sharded save and load against the training peak, per rank (issue 19).

Spawns ``--ranks`` gloo processes (dp = ranks, ``--ep``) on a mid-size model, trains two steps, then
measures each phase's peak resident set (VmHWM, reset before each phase through
``/proc/self/clear_refs``) in the same processes, one after the other, minus the resident set of the
idle runtime (after joining the world, before any model):

- ``train``: two training steps (forward, backward, ZeRO-1 step, all-gather);
- ``save``: :func:`dsv3.parallel.checkpoint.save_sharded` (each rank writes its own ZeRO-1 chunks);
- ``save (gather, reference)``: the former save, which all-reduced every optimizer tensor to its whole
  size (master, m, v) before writing, re-implemented here as the same-run reference;
- ``load``: :func:`dsv3.parallel.checkpoint.load_sharded` into the same model and optimizer (in place).

    python bench/checkpoint_memory.py [--hidden 512] [--layers 4] [--experts 32] [--ranks 2] [--ep 2]

Target: save and load peaks within 10% of the training peak.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile

import torch
import torch.multiprocessing as mp


def status_bytes(field: str = "VmHWM") -> int:
    """``field`` of /proc/self/status in bytes (VmHWM: the peak resident set; VmRSS: the current one)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    """Reset VmHWM to the current resident set (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def config(args):
    from dsv3.config import ModelConfig

    return ModelConfig.from_dict(
        dict(
            model_type="deepseek_v3",
            vocab_size=8192,
            hidden_size=args.hidden,
            intermediate_size=4 * args.hidden,
            moe_intermediate_size=args.hidden // 2,
            num_hidden_layers=args.layers,
            first_k_dense_replace=1,
            num_attention_heads=8,
            num_key_value_heads=8,
            q_lora_rank=args.hidden // 2,
            kv_lora_rank=args.hidden // 4,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
            n_shared_experts=1,
            n_routed_experts=args.experts,
            num_experts_per_tok=4,
            n_group=4,
            topk_group=2,
            topk_method="noaux_tc",
            scoring_func="sigmoid",
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            num_nextn_predict_layers=1,
            max_position_embeddings=256,
        )
    )


def gathered_optimizer(optimizer) -> dict[str, torch.Tensor]:
    """The former save's ``optim/...``: every ZeRO-1 tensor all-reduced to its whole size (the reference)."""
    import torch.distributed as dist

    from dsv3.parallel.zero import rows_shape

    ctx, out = optimizer.ctx, {}
    for s in optimizer.shards:
        n, me, group = (ctx.edp, ctx.edp_rank, ctx.edp_group) if s.expert else (ctx.dp, ctx.dp_rank, ctx.dp_group)
        st = optimizer.inner.state.get(s.master, {}) if s.master is not None else {}
        for kind in ("master", "exp_avg", "exp_avg_sq"):
            rows, width = rows_shape(s.param.shape)
            full = torch.zeros(rows, width)
            start, end = s.bounds[me]
            chunk = s.master if kind == "master" else st.get(kind)
            if chunk is not None and end > start:
                full[start:end] = chunk.float()
            if n > 1:
                dist.all_reduce(full, group=group)
            out[f"optim/{s.name}/{kind}"] = full
    return out


def worker(rank: int, world: int, port: int, args, directory: str, results) -> None:
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
        }
    )
    torch.set_num_threads(1)
    import torch.distributed.checkpoint as dcp

    from dsv3.model import DeepseekV3ForCausalLM
    from dsv3.parallel.checkpoint import load_sharded, model_state, save_sharded
    from dsv3.parallel.dispatch import shard_experts
    from dsv3.parallel.world import init_parallel
    from dsv3.parallel.zero import ZeroAdamW

    cfg = config(args)
    ctx = init_parallel(dp=world, ep=args.ep, n_routed_experts=cfg.n_routed_experts)
    idle = status_bytes("VmRSS")  # the runtime before any model: subtracted from every peak
    model = shard_experts(DeepseekV3ForCausalLM(cfg), ctx, dispatcher="alltoall")
    opt = ZeroAdamW(model, ctx, lr=1e-4)
    gen = torch.Generator().manual_seed(rank)

    def steps(n: int) -> None:
        for _ in range(n):
            ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), generator=gen)
            model(ids[:, :-1], ids[:, 1:]).loss.backward()
            opt.step(max_norm=1.0)
            opt.zero_grad()

    steps(1)  # the moments exist
    peaks, params = {}, sum(p.numel() * p.element_size() for p in model.parameters())
    for phase in ("train", "save", "save (gather, reference)", "load"):
        ctx.barrier()
        reset_peak()
        if phase == "train":
            steps(2)
        elif phase == "save":
            save_sharded(directory, 1, model=model, optimizer=opt, ctx=ctx, extra={"loader": None})
        elif phase == "load":
            load_sharded(os.path.join(directory, "dcp-00000001"), model=model, optimizer=opt, ctx=ctx)
        else:
            state = {**model_state(model), **gathered_optimizer(opt)}
            dcp.save(state, checkpoint_id=os.path.join(directory, "gathered"))
            del state
        ctx.barrier()
        peaks[phase] = status_bytes("VmHWM") - idle
    results.put((rank, {"peaks": peaks, "param_bytes": params, "idle": idle}))
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--ep", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn = mp.get_context("spawn")
    results = spawn.Queue()
    with tempfile.TemporaryDirectory() as directory:
        procs = [
            spawn.Process(target=worker, args=(r, args.ranks, port, args, directory, results))
            for r in range(args.ranks)
        ]
        for p in procs:
            p.start()
        out = dict(results.get(timeout=1200) for _ in procs)
        for p in procs:
            p.join(timeout=60)
    print("peak resident set above the idle runtime's, MiB (ratio to the training peak)")
    print(f"{'rank':>4} {'params MiB':>10} {'idle MiB':>8} " + " ".join(f"{k:>26}" for k in out[0]["peaks"]))
    for rank in sorted(out):
        peaks = out[rank]["peaks"]
        train = peaks["train"]
        cells = [f"{v / 2**20:9.0f} MiB ({v / train:4.2f}x)" for v in peaks.values()]
        print(
            f"{rank:>4} {out[rank]['param_bytes'] / 2**20:10.0f} {out[rank]['idle'] / 2**20:8.0f} "
            + " ".join(f"{c:>26}" for c in cells)
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "ranks": out}, fh, indent=1)


if __name__ == "__main__":
    main()
