"""Worker processes and the single-process reference for tests/test_pipeline_runtime.py."""

from __future__ import annotations

import os
import traceback
from datetime import timedelta

import torch

from helpers import small_config

SEQ, MICRO = 16, 2


def build_model(layers: int = 4, seed: int = 0, **changes):
    from dsv3.model.transformer import DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    cfg = small_config(num_hidden_layers=layers, seq_aux_alpha=0.01, **changes)
    return DeepseekV3ForCausalLM(cfg)


def batches(step: int, n_micro: int, vocab: int = 512) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for _ in range(n_micro):
        seq = torch.randint(0, vocab, (MICRO, SEQ + 1), generator=g)
        out.append((seq[:, :-1].contiguous(), seq[:, 1:].contiguous()))
    return out


def optimizer(params):
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))


def reference(steps: int, n_micro: int, layers: int = 4, **changes):
    """One process: per-step losses and final parameters (the plain model, no pipeline code)."""
    model = build_model(layers, **changes)
    model.train()
    opt = optimizer(list(model.parameters()))
    losses = []
    for step in range(steps):
        load, total = None, 0.0
        for ids, labels in batches(step, n_micro):
            out = model(ids, labels)
            (out.loss / n_micro).backward()
            total += float(out.loss) / n_micro
            if out.expert_load is not None:
                load = out.expert_load if load is None else load + out.expert_load
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if load is not None:
            model.update_router_bias(load)
        losses.append(total)
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def run_pipeline(rank: int, world: int, port: int, schedule: str, pp: int, steps: int, n_micro: int,
                 layers: int, queue, options: dict) -> None:
    """One pipeline process: trains ``steps`` steps and puts (rank, losses, owned params, op trace) on ``queue``."""
    try:
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
        import torch.distributed as dist

        from dsv3.parallel.pipeline.executor import PipelineRuntime

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        model = build_model(layers)
        model.train()
        rt = PipelineRuntime(model, schedule, pp, seq_len=SEQ, split_w=options.get("split_w", True))
        opt = optimizer(rt.owned_parameters())
        losses, traces = [], []
        custom = options.get("schedule")
        for step in range(steps):
            res = rt.step(batches(step, n_micro), schedule=custom)
            rt.clip_grad_norm(1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if res.load is not None:
                model.update_router_bias(res.load)
            losses.append(res.loss)
            traces.append([e.op for e in res.trace])
        params = dict(model.named_parameters())
        queue.put((rank, losses, {n: params[n].detach().numpy().copy() for n in rt.owned}, traces, None))
        dist.destroy_process_group()
    except BaseException:  # report, do not hang the parent
        queue.put((rank, None, None, None, traceback.format_exc()))
