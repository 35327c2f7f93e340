"""``dsv3 train --task grpo``: GRPO (DeepSeekMath 4.1; DeepSeek-V3 5.2) on dsv3's own model and runtime.

One optimizer step (:func:`grpo_step`): P = global_batch / G prompts, a pure function of (seed, step); G
seeded completions each (:func:`dsv3.train.rollout.rollout`, experts recorded); rewards
(:class:`dsv3.train.rewards.RewardSet`) gathered over dp and turned into group-relative advantages; old and
reference log-probs (no gradient; when mu > 1, when beta > 0); then mu policy updates of
:func:`dsv3.train.rl.grpo_loss`, weighted so the step's loss is the global batch's whatever dp and
micro_batch are, each followed by the trainer's update (:func:`dsv3.train.step._update`).
``routing_agreement`` compares the first training forward's routing with the rollout's; ``--routing-replay``
makes every training forward use the rollout's experts. Details: docs/rl.md ("Module notes").
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

from dsv3.data.rl_prompts import PromptSet, step_prompts
from dsv3.train.config import TrainConfig
from dsv3.train.optim import set_lr
from dsv3.train.rl import group_advantages, grpo_loss, grpo_stats, token_entropy, token_logps
from dsv3.train.rollout import Rollout, RoutingRecorder, rollout, sample_seed
from dsv3.train.session import moe_schedule
from dsv3.train.step import _update


@dataclass
class GRPORun:
    """Everything a GRPO run steps with (built by :func:`build_grpo`). The attribute names are those of
    :class:`dsv3.train.session.Session` that the trainer's update reads, so that it serves both."""

    config: TrainConfig
    mcfg: Any
    run_dir: str
    device: torch.device
    tokenizer: Any
    prompts: PromptSet
    rewards: Any
    model: torch.nn.Module
    optimizer: Any
    schedule: Any
    params: list[torch.nn.Parameter]
    eos_id: int
    reference: Any = None  # CPUEMA holding the initial weights (beta > 0)
    parallel: Any = None
    recorder: RoutingRecorder | None = None
    step: int = 0
    nonfinite: int = 0
    checkpoint: str | None = None
    lock: Any = None
    checkpointer: Any = None  # the run's Checkpointer (dsv3.parallel.checkpointer): every save and restore
    pipeline: Any = None  # never: --pp is refused
    ema: Any = None

    @property
    def distributed(self) -> bool:
        return self.parallel is not None and self.parallel.distributed

    def close(self) -> None:
        if self.reference is not None:
            self.reference.close()
        if self.lock is not None:
            self.lock.release()


# ----------------------------------------------------------------------------- distributed helpers
def _dp_cat(t: torch.Tensor, ctx) -> torch.Tensor:
    """``t`` of every dp rank concatenated along dim 0, in dp-rank order (``t`` itself in one process)."""
    if ctx is None or not ctx.distributed or ctx.dp == 1:
        return t

    parts = [torch.empty_like(t) for _ in range(ctx.dp)]
    dist.all_gather(parts, t.contiguous(), group=ctx.dp_group)
    return torch.cat(parts)


def _dp_sum(t: torch.Tensor, ctx) -> torch.Tensor:
    if ctx is None or not ctx.distributed or ctx.dp == 1:
        return t

    t = t.clone()
    dist.all_reduce(t, group=ctx.dp_group)
    return t


def _ep_all_done(ctx) -> Callable[[torch.Tensor], bool] | None:
    """Under ep: "stop" only when every rank of this ep group has finished all of its rows."""
    if ctx is None or not ctx.distributed or ctx.ep == 1:
        return None

    def all_done(done: torch.Tensor) -> bool:
        flag = torch.tensor([1.0 if bool(done.all()) else 0.0], device=done.device)  # NCCL: on the device
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=ctx.ep_group)
        return bool(flag.item() == 1.0)

    return all_done


# ----------------------------------------------------------------------------- one step: sample and score
@dataclass
class Scored:
    """This rank's rollout with its rewards and advantages, and the global counts the loss normalises by."""

    roll: Rollout
    advantages: torch.Tensor  # [B_local]
    rewards: torch.Tensor  # [B_global]
    per_function: dict[str, torch.Tensor]  # [B_global], NaN where a function said None
    lengths: torch.Tensor  # [B_global] completion lengths
    cut: torch.Tensor  # [B_global]
    rows_global: int
    tokens_global: float
    rollout_time: float
    metrics: dict[str, float] = field(default_factory=dict)


def _local_prompts(run: GRPORun) -> tuple[list[int], list[int]]:
    """(dataset indices, positions in the step's global prompt list) of this dp rank's prompts."""
    c, ctx = run.config, run.parallel
    per_step = c.data.global_batch // c.rl.group_size
    index = step_prompts(len(run.prompts), run.step, per_step, c.run.seed)
    dp, rank = (ctx.dp, ctx.dp_rank) if run.distributed else (1, 0)
    per_rank = per_step // dp
    positions = list(range(rank * per_rank, (rank + 1) * per_rank))
    return [index[p] for p in positions], positions


def sample_and_score(run: GRPORun) -> Scored:
    """Steps 1-3 of :func:`grpo_step`: this rank's prompts, their G completions, rewards and advantages."""
    c, ctx, G = run.config, run.parallel, run.config.rl.group_size
    index, positions = _local_prompts(run)
    texts, ids, columns = run.prompts.select(index)
    rows = [i for i in range(len(index)) for _ in range(G)]  # a group's G rows are contiguous
    seeds = [sample_seed(c.run.seed, run.step, positions[i], k) for i in range(len(index)) for k in range(G)]
    t0 = time.perf_counter()
    roll = rollout(
        run.model,
        [ids[i] for i in rows],
        seeds,
        max_new_tokens=c.rl.max_completion_tokens,
        temperature=c.rl.temperature,
        top_p=c.rl.top_p,
        eos_id=run.eos_id,
        recorder=run.recorder,
        all_done=_ep_all_done(ctx),
    )
    rollout_time = time.perf_counter() - t0
    completions = [run.tokenizer.decode(t) for t in roll.completions]
    result = run.rewards([texts[i] for i in rows], completions, {k: [v[i] for i in rows] for k, v in columns.items()})
    rewards = _dp_cat(result.total.float().to(run.device), ctx)
    advantages = group_advantages(rewards, G, scale=c.rl.scale_rewards)
    me = ctx.dp_rank if run.distributed else 0
    local = advantages[me * len(rows) : (me + 1) * len(rows)]
    per_function = {
        name: _dp_cat(torch.tensor([float("nan") if v is None else float(v) for v in values], device=run.device), ctx)
        for name, values in result.per_function.items()
    }
    tokens = _dp_sum(roll.mask().sum().double().to(run.device), ctx)
    return Scored(
        roll=roll,
        advantages=local,
        rewards=rewards,
        per_function=per_function,
        lengths=_dp_cat(roll.completion_len.float().to(run.device), ctx),
        cut=_dp_cat(roll.cut.float().to(run.device), ctx),
        rows_global=c.data.global_batch,
        tokens_global=float(tokens),
        rollout_time=rollout_time,
    )


# ----------------------------------------------------------------------------- one step: the policy update
def _micro_slices(n_rows: int, micro: int) -> list[slice]:
    return [slice(i, min(i + micro, n_rows)) for i in range(0, n_rows, micro)]


def _forward_logps(
    run: GRPORun, s: Scored, rows: slice, *, count: bool = False, entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [b, W - T0] of the sampled tokens of ``rows`` under logits / temperature (and, with ``entropy``,
    the masked entropy sum), with the routing compared (``count``) and/or replayed per the config. Only the
    positions from T0 - 1 on (those that predict a completion token) go through the output head, so the
    [b, W - T0, V] float32 logits are the largest transient, not [b, W - 1, V]."""
    ids, targets, seg = s.roll.inputs()
    ids, targets = ids[rows], targets[rows]
    seg = seg[rows] if seg is not None else None
    routing = run.recorder is not None and s.roll.routing is not None
    replay = run.config.rl.routing_replay
    if routing and (count or replay):
        mask = s.roll.mask()[rows]
        width = ids.shape[1]
        reference = [r[rows, :width].reshape(-1, r.shape[-1]) for r in s.roll.routing]
        ctx = run.recorder.training(reference, mask.reshape(-1).bool(), replay=replay, count=count)
    else:
        ctx = contextlib.nullcontext()
    start = s.roll.prompt_len - 1
    with ctx:
        hidden = run.model(ids, segment_ids=seg, return_logits=False).hidden_states[:, start:]
    logits = run.model.lm_head(run.model.model.norm(hidden)).float() / run.config.rl.temperature
    ent = None
    if entropy:
        with torch.no_grad():
            ent = (token_entropy(logits.detach()) * s.roll.mask()[rows, start:]).sum()
    return token_logps(logits, targets[:, start:]), ent


def _no_grad_logps(run: GRPORun, s: Scored, slices: list[slice], *, reference: bool, count: bool) -> list[torch.Tensor]:
    """Per micro-batch log-probs without gradient: the policy's (old) or the frozen reference's."""
    swap = run.reference.applied(run.model) if reference else contextlib.nullcontext()
    with torch.no_grad(), swap:
        return [_forward_logps(run, s, sl, count=count)[0] for sl in slices]


def _loss_weight(loss_type: str, rows: int, tokens: torch.Tensor, s: Scored, dp: int) -> torch.Tensor | float:
    """The factor that makes this micro-batch's :func:`grpo_loss` its share of the global batch's loss, times dp
    (the gradients are averaged over dp)."""
    if loss_type in ("grpo", "dr_grpo"):
        return dp * rows / s.rows_global
    if loss_type == "bnpo":
        return dp * tokens / max(s.tokens_global, 1.0)
    return float(dp)  # dapo: num_items is the global token count


def _rollout_load(run: GRPORun, s: Scored) -> torch.Tensor | None:
    """[n_moe_layers, N_r] completion tokens routed to each expert in the rollout (the bias update's loads)."""
    if s.roll.routing is None:
        return None
    valid = s.roll.mask().bool()
    n = run.mcfg.n_routed_experts
    return torch.stack([torch.bincount(r[:, : valid.shape[1]][valid].reshape(-1), minlength=n) for r in s.roll.routing])


def policy_update(run: GRPORun, s: Scored) -> dict[str, float]:
    """Steps 4-5 of :func:`grpo_step`: the mu clipped policy-gradient updates on ``s``; returns their metrics."""
    rl, ctx = run.config.rl, run.parallel
    dp = ctx.dp if run.distributed else 1
    mask = s.roll.mask()[:, s.roll.prompt_len - 1 :]  # the positions _forward_logps scores
    fed = s.roll.tokens[:, :-1].numel()  # tokens of one training forward
    slices = _micro_slices(mask.shape[0], run.config.data.micro_batch)
    counted = rl.grpo_iterations > 1
    old = _no_grad_logps(run, s, slices, reference=False, count=True) if counted else None
    ref = _no_grad_logps(run, s, slices, reference=True, count=False) if rl.beta > 0 else None
    diag = torch.zeros(6, dtype=torch.float64, device=run.device)  # tokens, low, high, region, kl, entropy
    losses, norms, skipped, t0 = [], [], 0, time.perf_counter()
    for it in range(rl.grpo_iterations):
        total = torch.zeros(5, dtype=torch.float64, device=run.device)
        for i, sl in enumerate(slices):
            logps, ent = _forward_logps(run, s, sl, count=not counted and it == 0, entropy=it == 0)
            m, adv = mask[sl], s.advantages[sl]
            kwargs = dict(beta=rl.beta, epsilon_low=rl.epsilon_low, epsilon_high=rl.epsilon_high)
            loss = grpo_loss(
                logps,
                old[i] if old else None,
                ref[i] if ref else None,
                adv,
                m,
                loss_type=rl.loss_type,
                max_completion_length=rl.max_completion_tokens,
                num_items=s.tokens_global,
                **kwargs,
            )
            scaled = loss * _loss_weight(rl.loss_type, sl.stop - sl.start, m.sum(), s, dp)
            scaled.backward()
            total[0] += scaled.detach().double()
            total[4] += m.sum().double()
            if it == 0:
                st = grpo_stats(
                    logps,
                    old[i] if old else None,
                    ref[i] if ref else None,
                    adv,
                    m,
                    epsilon_low=rl.epsilon_low,
                    epsilon_high=rl.epsilon_high,
                )
                diag += torch.stack(
                    [st["tokens"], st["clip_low"], st["clip_high"], st["clip_region"], st["kl"], ent]
                ).double()
        load = _rollout_load(run, s) if rl.rl_bias_update else None
        gamma = moe_schedule(run.config, run.mcfg).gamma if rl.rl_bias_update else 0.0
        stats = _update(run, total, load, fed, gamma)
        losses.append(stats.loss)
        norms.append(stats.grad_norm)
        skipped += stats.skipped
    train_time = time.perf_counter() - t0
    d = _dp_sum(diag, ctx).tolist()
    tokens = max(d[0], 1.0)
    passes = rl.grpo_iterations + (1 if counted else 0) + (1 if rl.beta > 0 else 0)
    return {
        "loss": losses[0],
        "loss_last": losses[-1],
        "grad_norm": norms[0],
        "skipped": skipped,
        "clip_low": d[1] / tokens,
        "clip_high": d[2] / tokens,
        "clip_region": d[3] / tokens,
        "kl": d[4] / tokens,
        "entropy": d[5] / tokens,
        "train_tokens_per_s": passes * fed * dp / max(train_time, 1e-9),
        "train_time": train_time,
    }


def _nan_stats(values: torch.Tensor) -> tuple[float, float]:
    """(mean, std) over the non-NaN entries (NaN, NaN when there are none)."""
    v = values[~torch.isnan(values)]
    if v.numel() == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std()) if v.numel() > 1 else 0.0


def step_metrics(run: GRPORun, s: Scored) -> dict[str, Any]:
    """The rollout's metrics: rewards (total and per function), groups with zero std, completion lengths,
    routing agreement and rollout tokens/s (over all dp ranks)."""
    G = run.config.rl.group_size
    groups = s.rewards.view(-1, G)
    out: dict[str, Any] = {
        "reward": float(s.rewards.mean()),
        "reward_std": float(s.rewards.std()),
        "frac_reward_zero_std": float((groups.std(dim=1) == 0).float().mean()),
    }
    for name, values in s.per_function.items():
        out[f"reward/{name}"], out[f"reward_std/{name}"] = _nan_stats(values)
    out.update(
        completion_length=float(s.lengths.mean()),
        completion_length_max=float(s.lengths.max()),
        completion_cut=float(s.cut.mean()),
    )
    if run.recorder is not None and run.recorder.active:
        agree, total = _dp_sum(run.recorder.tally(), run.parallel).tolist()
        if total:
            out["routing_agreement"] = agree / total
    out["rollout_tokens_per_s"] = float(s.lengths.sum()) / max(s.rollout_time, 1e-9)
    return out


def grpo_step(run: GRPORun) -> dict[str, Any]:
    """One GRPO optimizer step (see the module docstring); returns its metrics. ``run.step`` is advanced."""
    lr = run.schedule.lr_at(run.step)
    set_lr(run.optimizer, lr)
    scored = sample_and_score(run)
    update = policy_update(run, scored)  # the routing agreement is counted here ...
    metrics = {"step": run.step + 1, "lr": lr, **update, **step_metrics(run, scored)}  # ... and read here
    metrics["rollout_time"] = scored.rollout_time
    run.step += 1
    return metrics
