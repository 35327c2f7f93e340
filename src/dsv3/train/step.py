"""One optimizer step over a list of micro-batches, the same for every layout: :func:`train_step`.

1. forward and backward of this rank's micro-batches (``loss / n_micro``; under ``--pp`` the
   pipeline schedule), with the step's lambda and alpha as arguments of the loss, summing the
   losses and the expert loads on the device -- no host synchronisation per micro-batch;
2. the sums and loads over dp, the ZeRO-1 gradient reduction and the global norm; one host
   sync reads the losses and the norm together;
3. a non-finite loss or norm skips the step (gradients dropped);
4. AdamW with clipping, the auxiliary-loss-free bias update (gamma) with the loads of all
   micro-batches, the EMA.

The loop (:func:`dsv3.train.loop.train`), ``dsv3 memory`` and GRPO (:func:`_update`) step a
:class:`~dsv3.train.session.Session` (or a session-shaped run) with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dsv3.data.loader import split_batch
from dsv3.parallel.pipeline.train import set_loss_weights, write_step_trace
from dsv3.parallel.zero import all_mean, sync_loads
from dsv3.train.prefetch import Batch
from dsv3.train.schedule import MoEStep

if TYPE_CHECKING:  # annotations only: the session module builds what this one steps
    from dsv3.train.session import Session


def _dp_slice(session: Session, batches: list[Batch]) -> list[Batch]:
    """This data-parallel rank's micro-batches: every dp-th of the global batch's (a disjoint part);
    ``batches`` as they are when the loader already handed out only this rank's (:meth:`TrainLoader.shard`)."""
    ctx = session.parallel
    if ctx.dp == 1 or getattr(session.loader, "dp", 1) > 1:
        return batches
    return batches[ctx.dp_rank :: ctx.dp]


@dataclass
class StepStats:
    """What one optimizer step reports.

    Attributes:
        loss: total loss (L_Main + lambda/D sum L_MTP + L_Bal), mean over micro-batches.
        lm_loss / mtp_loss / balance_loss: its parts.
        grad_norm: global gradient norm before clipping.
        skipped: the loss or the norm was not finite; no update was made.
        load: [n_moe_layers, N_r] tokens routed to each expert over all micro-batches (None: dense).
        tokens: input tokens of the step; loss_tokens: tokens that carried a label.
    """

    loss: float
    lm_loss: float
    mtp_loss: float
    balance_loss: float
    grad_norm: float
    skipped: bool
    load: torch.Tensor | None
    tokens: int
    loss_tokens: int


def train_step(session: Session, batches: list[Batch], *, gamma: float | None = None) -> StepStats:
    """One optimizer step of ``session`` over ``batches`` (its micro-batches, on the device).

    Backpropagates ``loss / n_micro`` per micro-batch (or, under pipeline parallelism, runs them
    through the schedule); the loss parts, label counts and expert loads are summed on the device
    and read once, with the gradient norm, after the last micro-batch. The step's lambda and alpha reach
    the loss as arguments (``session.moe.at(session.step)``); ``gamma`` is the bias update speed (default:
    the step's).
    """
    batches = _dp_slice(session, batches)
    hp = session.moe.at(session.step)
    gamma = hp.gamma if gamma is None else gamma
    if session.pipeline is not None:  # pipeline parallelism: the schedule runs the micro-batches
        sums, load, tokens = _pipeline_pass(session, batches, hp)
    else:
        sums, load, tokens = _micro_batch_pass(session, batches, hp)
    return _update(session, sums, load, tokens, gamma)


def _micro_batch_pass(
    session: Session, batches: list[Batch], hp: MoEStep
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Forward and backward of this rank's micro-batches, one after the other, with the step's lambda and alpha
    ``hp``.

    Returns ``sums`` [5] float64 on the device (loss, lm, mtp, balance: means over the micro-batches;
    labelled tokens), the summed expert ``load`` [n_moe_layers, N_r] (None: dense) and the input tokens.
    """
    ctx, model, n_micro = session.parallel, session.model, len(batches)
    sums = torch.zeros(5, dtype=torch.float64, device=session.device)
    load = None
    split = [split_batch(b) for b in batches]
    weights = None
    if any(extra for _, _, extra in split):
        # SFT: micro-batches hold different numbers of assistant tokens; weight each by its share
        # of the step's loss tokens, so the step's loss is the mean over all of them (on the device).
        counts = torch.stack([(labels != -100).sum() for _, labels, _ in split]).double()
        weights = counts / counts.sum().clamp(min=1)
        if ctx.dp > 1:
            # shares of the whole global batch's tokens (gradients are averaged over dp)
            weights = counts / all_mean(counts.sum().reshape(1), ctx)[0].clamp(min=1e-9)
    for i, (ids, labels, extra) in enumerate(split):
        out = model(ids, labels, mtp_loss_weight=hp.mtp_loss_weight, seq_aux_alpha=hp.seq_aux_alpha, **extra)
        parts = torch.stack(
            [out.loss.detach(), out.lm_loss.detach(), out.mtp_loss.detach(), out.balance_loss.detach()]
        ).double()
        if weights is None:
            (out.loss / n_micro).backward()
            sums[:4] += parts / n_micro
        else:
            (out.loss * weights[i].to(out.loss.dtype)).backward()
            sums[:4] += parts * weights[i]
        sums[4] += (labels != -100).sum()
        if out.expert_load is not None:
            load = out.expert_load if load is None else load + out.expert_load
    return sums, load, sum(ids.numel() for ids, _, _ in split)


def _pipeline_pass(
    session: Session, batches: list[Batch], hp: MoEStep
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """:func:`_micro_batch_pass` under pipeline parallelism (see :mod:`dsv3.parallel.pipeline.train`):
    the runtime runs this pipeline's micro-batches through the schedule; losses and loads come back
    reduced over the pipeline and the gradients of shared parameters all-reduced."""
    rt = session.pipeline
    set_loss_weights(rt, hp.mtp_loss_weight, hp.seq_aux_alpha)
    res = rt.step(batches)
    if rt.trace_path:
        write_step_trace(rt.trace_path, rt, res)
    loss_tokens = sum(int((labels != -100).sum()) for _, labels in batches)
    sums = torch.tensor(
        [res.loss, res.lm_loss, res.mtp_loss, res.balance_loss, float(loss_tokens)], dtype=torch.float64
    )
    return sums, res.load, sum(ids.numel() for ids, _ in batches)


def _update(session: Session, sums: torch.Tensor, load: torch.Tensor | None, tokens: int, gamma: float) -> StepStats:
    """The rest of :func:`train_step` after the backward passes, the same for every layout: the sums and loads
    over dp and the ZeRO-1 gradient reduction and norm (the same on every rank; nothing to communicate with
    dp = 1); the one host sync; the NaN skip; AdamW with clipping, the bias update with the step's loads, and
    the EMA (under pipeline parallelism of the held stages only)."""
    ctx, optimizer, clip = session.parallel, session.optimizer, session.config.optimizer.grad_clip
    sums = all_mean(sums, ctx)  # global sums over the dp ranks
    sums[4] *= ctx.dp
    if load is not None:
        load = sync_loads(load, ctx)
    optimizer.reduce_gradients()
    grad_norm = optimizer.grad_norm()
    host = torch.cat([sums, grad_norm.detach().double().reshape(1).to(sums.device)]).tolist()  # the one sync
    loss, lm_loss, mtp_loss, balance_loss, loss_tokens, norm = host
    skipped = not (math.isfinite(loss) and math.isfinite(norm))
    if not skipped:
        optimizer.step(clip, reduce=False, norm=grad_norm)
        if load is not None:
            session.model.update_router_bias(load, gamma)
    optimizer.zero_grad(set_to_none=True)
    if not skipped and session.ema is not None:
        session.ema.update()
    return StepStats(
        loss=loss,
        lm_loss=lm_loss,
        mtp_loss=mtp_loss,
        balance_loss=balance_loss,
        grad_norm=norm,
        skipped=skipped,
        load=load,
        tokens=tokens * ctx.dp,
        loss_tokens=int(loss_tokens),
    )
