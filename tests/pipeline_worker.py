"""Worker processes and the single-process reference for tests/test_pipeline_runtime.py."""

from __future__ import annotations

import os
import traceback
from datetime import timedelta

import torch
from helpers import small_config

SEQ, MICRO = 16, 2
ALPHA, GAMMA = 0.01, 0.001  # the sequence-wise balance factor and the bias update speed of these runs


def build_model(layers: int = 4, seed: int = 0, **changes):
    from dsv3.model.transformer import DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    cfg = small_config(num_hidden_layers=layers, **changes)
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


EVAL_STEP = 99  # the held-out batches: batches(EVAL_STEP, n_micro)


def reference(steps: int, n_micro: int, layers: int = 4, **changes):
    """One process: per-step losses, final parameters, gradient norms and the validation loss of the trained
    model on ``batches(EVAL_STEP, n_micro)`` (token-weighted ``lm_loss`` in eval mode; the plain model, no
    pipeline code)."""
    model = build_model(layers, **changes)
    model.train()
    opt = optimizer(list(model.parameters()))
    losses, norms = [], []
    for step in range(steps):
        load, total = None, 0.0
        for ids, labels in batches(step, n_micro):
            out = model(ids, labels, seq_aux_alpha=ALPHA)
            (out.loss / n_micro).backward()
            total += float(out.loss.detach()) / n_micro
            if out.expert_load is not None:
                load = out.expert_load if load is None else load + out.expert_load
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if load is not None:
            model.update_router_bias(load, GAMMA)
        losses.append(total)
    model.eval()
    with torch.no_grad():
        scored = [
            (float(model(ids, labels).lm_loss), int((labels != -100).sum()))
            for ids, labels in batches(EVAL_STEP, n_micro)
        ]
    val = sum(loss * n for loss, n in scored) / sum(n for _, n in scored)
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}, norms, val


def swapped_recvs(schedule):
    """``schedule`` with the last device's second activation RECV moved before its first (out of order)."""
    from dataclasses import replace

    from dsv3.schedules import FORWARD, RECV

    dev = schedule.devices - 1
    ops = list(schedule.ops[dev])
    at = [i for i, op in enumerate(ops) if op.kind == RECV and op.direction == FORWARD][:2]
    ops.insert(at[0], ops.pop(at[1]))
    return replace(schedule, ops=schedule.ops[:dev] + (tuple(ops),) + schedule.ops[dev + 1 :])


def fb_as_f_then_b(schedule):
    """``schedule`` with every overlapped FB op replaced by its forward, then its full backward."""
    from dataclasses import replace

    from dsv3.schedules import FB

    ops = tuple(tuple(p for op in dev for p in (op.parts() if op.kind == FB else (op,))) for dev in schedule.ops)
    return replace(schedule, ops=ops)


def run_jobs(rank: int, world: int, port: int, jobs: list[dict], queue) -> None:
    """One pipeline process. Each job dict: schedule, pp, steps, n_micro, layers, and optionally ``variant``
    (``"fb_as_f_then_b"``; ``"swapped"`` expects the swapped op list to be rejected before the step).
    Puts (rank, results, error) on ``queue``; a result is (losses, owned params, per-step op traces, norms,
    extras) or the rejection message; extras: the validation loss of ``batches(EVAL_STEP, n_micro)`` through
    :meth:`PipelineRuntime.evaluate` and the bytes of every parameter the device's model holds."""
    try:
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
        import torch.distributed as dist

        from dsv3.errors import ConfigError
        from dsv3.parallel.pipeline.executor import PipelineRuntime
        from dsv3.parallel.pipeline.train import set_loss_weights, write_step_trace

        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
        )
        results = []
        for job in jobs:
            model = build_model(job["layers"], **job.get("model", {}))
            model.train()
            rt = PipelineRuntime(model, job["schedule"], job["pp"], seq_len=SEQ)
            set_loss_weights(rt, 0.3, ALPHA)
            variant = job.get("variant")
            custom = None
            if variant == "fb_as_f_then_b":
                custom = fb_as_f_then_b(rt.schedule_for(job["n_micro"]))
            if variant == "swapped":
                try:
                    rt.step(batches(0, job["n_micro"]), schedule=swapped_recvs(rt.schedule_for(job["n_micro"])))
                    results.append("not rejected")
                except ConfigError as e:
                    results.append(str(e))
                continue
            opt = optimizer(rt.owned_parameters())
            losses, traces, norms = [], [], []
            for step in range(job["steps"]):
                # the runtime with a plain AdamW over the held parameters (no data parallelism)
                res = rt.step(batches(step, job["n_micro"]), schedule=custom)
                norms.append(float(rt.clip_grad_norm(1.0)))
                opt.step()
                opt.zero_grad(set_to_none=True)
                model.update_router_bias(res.load, GAMMA)
                losses.append(res.loss)
                traces.append([e.op for e in res.trace])
            if job.get("trace_path"):
                write_step_trace(job["trace_path"], rt, res)
            params = dict(model.named_parameters())
            total, count = rt.evaluate(batches(EVAL_STEP, job["n_micro"])).tolist()
            extras = dict(val=total / count, nbytes=sum(p.numel() * p.element_size() for p in model.parameters()))
            results.append((losses, {n: params[n].detach().numpy().copy() for n in rt.owned}, traces, norms, extras))
        queue.put((rank, results, None))
        dist.destroy_process_group()
    except BaseException:  # report, do not hang the parent
        queue.put((rank, None, traceback.format_exc()))


def session_losses(opts: dict, steps: int):
    """Train ``steps`` steps through dsv3.train.session (``train_step``) in the layout that ``opts`` and the
    environment (torchrun's RANK/WORLD_SIZE, as tests/dist_helpers.py sets it) describe.

    Returns per-step losses, grad norms and this rank's parameters after the last step (under pp: those of
    its stages, the only ones it holds), its router biases, ``{experts module: first global expert}`` of its
    expert blocks, its EMA shadows (``{}`` without ``ema_decay``) and the validation loss after the last step
    (:func:`dsv3.train.loop.validate`: under pp the pipelined pass; with ``use_ema`` of the EMA weights)."""
    from dsv3.model.moe import Experts
    from dsv3.train.config import TrainConfig
    from dsv3.train.loop import validate
    from dsv3.train.session import build_session
    from dsv3.train.step import train_step

    session = build_session(TrainConfig.from_dict(opts), write=False, prefetch=False)
    losses, norms = [], []
    try:
        for _ in range(steps):
            _, gamma = session.begin_step()
            batch, _ = session.next_batches()
            stats = train_step(session, batch, gamma=gamma)
            losses.append(stats.loss)
            norms.append(stats.grad_norm)
            session.step += 1
        params = {n: p.detach().numpy().copy() for n, p in session.model.named_parameters()}
        buffers = {n: b.detach().numpy().copy() for n, b in session.model.named_buffers() if "bias" in n}
        offsets = {n: m.expert_offset for n, m in session.model.named_modules() if isinstance(m, Experts)}
        ema = {n: t.numpy().copy() for n, t in session.ema.shadow().items()} if session.ema is not None else {}
        val = validate(session) if steps else None
    finally:
        session.close()
    return losses, norms, params, buffers, offsets, ema, val


def session_rank(rank: int, opts: dict, steps: int):
    """tests/dist_helpers.run_ranks worker: :func:`session_losses` on one rank."""
    return session_losses(opts, steps)


def sessions_rank(rank: int, runs: list[dict], steps: int):
    """tests/dist_helpers.run_ranks worker: :func:`session_losses` of each options dict in turn, in one world
    (one spawn and one process group for several layouts of the same world size)."""
    return [session_losses(opts, steps) for opts in runs]


def save_rank(rank: int, opts: dict, run_dir: str):
    """tests/dist_helpers.run_ranks worker: one pipelined step, then a DCP checkpoint written by every rank.
    Returns (the parameter names its model holds, their values, its EMA shadows or ``{}``)."""
    from dsv3.parallel.checkpoint import save_sharded
    from dsv3.train.config import TrainConfig
    from dsv3.train.session import build_session
    from dsv3.train.step import train_step

    session = build_session(TrainConfig.from_dict(opts), write=False, prefetch=False)
    try:
        _, gamma = session.begin_step()
        batch, _ = session.next_batches()
        train_step(session, batch, gamma=gamma)
        session.step += 1
        params = {n: p.detach().numpy().copy() for n, p in session.model.named_parameters()}
        held = set(session.pipeline.owned)
        save_sharded(
            run_dir, 1, model=session.model, optimizer=session.optimizer, ctx=session.parallel, ema=session.ema
        )
        ema = {n: t.numpy().copy() for n, t in session.ema.shadow().items()} if session.ema is not None else {}
    finally:
        session.close()
    return sorted(held), params, ema
