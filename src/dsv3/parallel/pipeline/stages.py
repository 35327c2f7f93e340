"""Pipeline stages: the model's layers cut into ``pp`` consecutive pieces, run step by step.

A :class:`PipelineStage` is a *view* of a built
:class:`~dsv3.model.transformer.DeepseekV3ForCausalLM`: it holds no modules of
its own, it calls the model's submodules (the model file is untouched):

* stage 0 starts with the embedding ``Emb(t)``;
* every stage runs its decoder layers, each as two *steps*, attention
  ``h = x + MLA(RMSNorm(x))`` and feed-forward ``out = h + FFN(RMSNorm(h))``
  (through the block's recomputation policy ``layer.recompute`` when it has one,
  so selective recomputation applies; a policy that recomputes the whole block
  makes the block one step);
* the last stage ends with the *head* step: final norm, output-head loss
  L_Main and the MTP modules' loss (which need ``Emb`` of the labels' tokens,
  so the last stage uses the embedding too).

An MoE layer whose dispatcher exchanges tokens with other ranks (expert
parallelism) is cut further at its all-to-alls (:mod:`~dsv3.parallel.pipeline.overlap`,
report Figure 4): its feed-forward is three steps, DISPATCH (router, shared
experts, dispatch started), MLP (dispatch waited, routed experts, combine started)
and COMBINE (combine waited, residual), and so is its backward, whose gradient
exchanges are started in one step and waited in the next. Between two steps of one
micro-batch the FB op runs a step of the other, so each all-to-all is in flight
while the other micro-batch computes.

Every step takes a detached input and keeps (input, output, auxiliary loss);
its backward is run explicitly, one step at a time, and the input's ``.grad`` is
the next step's output gradient. That is what lets the runtime interleave the
steps of one micro-batch's forward with another's backward (the FB op) and
what makes a stage's loss exactly the single-process loss: each step's
auxiliary loss is the layer's sequence-wise balance loss L_Bal, back-propagated
with the same weight 1/n_micro as the main loss.

The split (:func:`stage_layers`) is the planner's balanced split, which
minimises the slowest stage's forward FLOPs (head and MTP count on the last).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint
from torch import nn

from dsv3.config import ModelConfig
from dsv3.errors import ConfigError
from dsv3.memory.recompute import RecomputePolicy
from dsv3.parallel.pipeline.overlap import CutMoE, cuts, span


def stage_layers(mcfg: ModelConfig, pp: int, seq_len: int, *, mtp: bool = True) -> tuple[int, ...]:
    """Decoder layers per stage: the planner's balanced split (:func:`dsv3.plan.planner.default_stage_layers`).

    Raises:
        ConfigError: ``pp`` is not a positive integer or exceeds the number of layers.
    """
    from dsv3.plan.flops import model_flops
    from dsv3.plan.layout import Layout
    from dsv3.plan.planner import default_stage_layers

    if isinstance(pp, bool) or not isinstance(pp, int) or pp < 1:
        raise ConfigError(f"pp must be a positive integer, got {pp!r}.")
    if pp > mcfg.num_hidden_layers:
        raise ConfigError(f"the model has {mcfg.num_hidden_layers} layers, fewer than pp={pp} pipeline stages; "
                          f"use pp <= {mcfg.num_hidden_layers}.")
    layout = Layout(pp=pp, seq_len=seq_len, mtp=mtp)
    return default_stage_layers(mcfg, layout, model_flops(mcfg, seq_len))


def _new_stats():
    """A fresh per-forward ``RoutingStats`` on models whose MoE layers record into one, else None."""
    from dsv3.model import moe

    cls = getattr(moe, "RoutingStats", None)
    return cls() if cls is not None else None


def _call(fn, *args, stats=None):
    """``fn(*args, stats=stats)`` when there is a ``stats`` to pass down, else ``fn(*args)``."""
    return fn(*args) if stats is None else fn(*args, stats=stats)


@dataclass
class MicroBatch:
    """One micro-batch as every stage sees it.

    Attributes:
        ids: [b, T] input token ids (the first stage embeds them; the last one's MTP embeds them too).
        labels: [b, T] next-token labels (used on the last stage).
        cos, sin: [1, T, d_h^R/2] rotary tables.
        scale: the loss weight 1/n_micro (the gradient of the step loss for this micro-batch's loss).
    """

    ids: torch.Tensor
    labels: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    scale: float


@dataclass
class StageRecord:
    """What one stage's forward of one micro-batch keeps for its backward, and its statistics.

    ``steps`` holds (input, output, auxiliary loss, name) per step, or for a step of a cut MoE layer a
    callable ``backward(output_grad, scale) -> input_grad`` (None between its components); ``output`` is the
    stage output (activation [b, T, d], or on the last stage the scalar loss);
    ``parts`` are detached [lm, mtp, balance] loss terms computed here; ``loads``
    maps an MoE layer's index in ``model.moe_layers()`` to its [N_r] token counts.
    """

    steps: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]] = field(default_factory=list)
    output: torch.Tensor | None = None
    parts: list[torch.Tensor] = field(default_factory=list)
    loads: dict[int, torch.Tensor] = field(default_factory=dict)


class PipelineStage:
    """Stage ``stage`` of a ``pp``-stage split of ``model`` holding decoder layers ``layers``.

    Args:
        model: the built causal LM (every rank builds the whole model; a stage uses its part).
        stage: the stage index s in ``0 .. pp-1``.
        pp: number of stages.
        layers: indices of its decoder layers (consecutive).
        cut_moe: cut MoE layers that exchange tokens at their all-to-alls (three steps each way, see the
            module docstring); False runs each such feed-forward as one step (exchanges inside it).

    ``events``: None, or a list that every step appends ``(phase, name, start, end)`` to (phase "F"/"B";
    name EMB, ATTN, FFN, BLOCK, HEAD, END, or a cut layer's DISPATCH / MLP / COMBINE), together with the
    cut layers' exchange starts and waits (:mod:`~dsv3.parallel.pipeline.overlap`); for traces and tests.
    """

    def __init__(self, model: nn.Module, stage: int, pp: int, layers: list[int], *, cut_moe: bool = True) -> None:
        self.model, self.stage, self.pp = model, stage, pp
        self.cut_moe = cut_moe
        self.events: list | None = None
        self.layer_ids = list(layers)
        self.is_first, self.is_last = stage == 0, stage == pp - 1
        moes = model.moe_layers()
        self._moe_index = {id(m): i for i, m in enumerate(moes)}

    # ------------------------------------------------------------------ parameters
    def modules(self) -> list[nn.Module]:
        """The submodules this stage runs (the embedding on the first stage, and on the last one when
        MTP or a tied head uses it)."""
        m = self.model
        out: list[nn.Module] = []
        uses_embedding = self.is_first or (self.is_last and (len(m.mtp) > 0 or m.config.tie_word_embeddings))
        if uses_embedding:
            out.append(m.model.embed_tokens)
        out += [m.model.layers[i] for i in self.layer_ids]
        if self.is_last:
            out += [m.model.norm, m.lm_head, *m.mtp]
        return out

    def parameter_names(self) -> list[str]:
        """Names (as in ``model.named_parameters()``) of the parameters this stage uses."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        seen: dict[str, None] = {}
        for module in self.modules():
            for p in module.parameters():
                seen[names[id(p)]] = None
        return list(seen)

    # ------------------------------------------------------------------ forward / backward
    def _moe_stats(self, mlp: nn.Module, rec: StageRecord, stats=None) -> torch.Tensor | None:
        """The MoE layer's load and balance loss of the forward that just ran (None for dense layers).

        ``stats``: the per-forward ``RoutingStats`` the layer recorded into, on models that pass one
        down the forward; otherwise the layer's ``last_load`` / ``last_balance_loss``.
        """
        idx = self._moe_index.get(id(mlp))
        if idx is None:
            return None
        if stats is not None:
            key = mlp.layer_idx
            rec.loads[idx] = stats.load[key] if key in stats.load else torch.zeros(
                mlp.n_experts, dtype=torch.long, device=self.model.model.embed_tokens.weight.device)
            return stats.balance.get(key)
        rec.loads[idx] = mlp.last_load
        return mlp.last_balance_loss

    def forward_steps(self, x: torch.Tensor | None, mb: MicroBatch, rec: StageRecord) -> Iterator[None]:
        """Run the stage forward on ``x`` ([b, T, d]; ignored on the first stage, which embeds ``mb.ids``),
        yielding after each step; fills ``rec``."""
        m = self.model
        balance = []

        def keep(inp, out, aux=None, name="STEP"):
            rec.steps.append((inp, out, aux, name))
            if aux is not None:
                balance.append(aux.detach())
            return out.detach().requires_grad_(out.requires_grad)

        if self.is_first:
            with span(self.events, "F", "EMB"):
                h = keep(None, m.model.embed_tokens(mb.ids), name="EMB")
            yield
        else:
            h = x.detach().requires_grad_(True)
        for i in self.layer_ids:
            layer = m.model.layers[i]
            policy = layer.recompute
            if self.cut_moe and cuts(layer):
                h = yield from self._cut_layer_steps(layer, policy, h, mb, rec, balance)
                continue
            if policy is not None and type(policy).block is not RecomputePolicy.block:
                with span(self.events, "F", "BLOCK"):
                    inp = h  # the policy recomputes the whole block: one step
                    stats = _new_stats()
                    out = _call(policy.block, layer, inp, mb.cos, mb.sin, stats=stats)
                    h = keep(inp, out, self._moe_stats(layer.mlp, rec, stats), "BLOCK")
                yield
                continue
            with span(self.events, "F", "ATTN"):
                inp = h
                attn = (policy.attention(layer, inp, mb.cos, mb.sin) if policy is not None
                        else layer.attention(inp, mb.cos, mb.sin))
                h = keep(inp, inp + attn, name="ATTN")
            yield
            with span(self.events, "F", "FFN"):
                inp = h
                stats = _new_stats()
                out = inp + (_call(policy.ffn, layer, inp, stats=stats) if policy is not None
                             else _call(layer.ffn, inp, stats=stats))
                h = keep(inp, out, self._moe_stats(layer.mlp, rec, stats), "FFN")
            yield
        with span(self.events, "F", "HEAD" if self.is_last else "END"):
            if self.is_last:
                inp = h
                h_norm = m.model.norm(inp)
                lm = m._head_loss(h_norm, mb.labels)
                emb = m.model.embed_tokens(mb.ids) if len(m.mtp) else None
                stats = _new_stats()
                mtp = (_call(m._mtp_loss, inp, emb, mb.labels, mb.cos, mb.sin, stats=stats) if len(m.mtp)
                       else lm.new_zeros(()))
                mtp_bal = [b for b in (self._moe_stats(layer.mlp, rec, stats) for layer in m.mtp) if b is not None]
                loss = lm + mtp
                if mtp_bal:
                    loss = loss + torch.stack(mtp_bal).sum()
                    balance += [b.detach() for b in mtp_bal]
                rec.steps.append((inp, loss, None, "HEAD"))
                rec.output = loss
                rec.parts = [lm.detach(), mtp.detach()]
            else:
                rec.output = h
                rec.parts = [torch.zeros((), device=h.device), torch.zeros((), device=h.device)]
            rec.parts.append(torch.stack(balance).sum() if balance else torch.zeros((), device=rec.parts[0].device))
        yield

    def _cut_layer_steps(self, layer, policy, inp, mb: MicroBatch, rec: StageRecord, balance: list):
        """A decoder layer whose MoE exchanges tokens, as four steps: ATTN, then :class:`CutMoE`'s DISPATCH, MLP
        and COMBINE; yields after each; returns the layer output (detached, requiring grad)."""
        with span(self.events, "F", "ATTN"):
            if policy is not None and type(policy).block is not RecomputePolicy.block:
                # A whole-block policy recomputes only the attention branch of such a layer
                # (as FullRecompute.block does for layers that communicate).
                attn = torch.utils.checkpoint.checkpoint(layer.attention, inp, mb.cos, mb.sin, use_reentrant=False)
            elif policy is not None:
                attn = policy.attention(layer, inp, mb.cos, mb.sin)
            else:
                attn = layer.attention(inp, mb.cos, mb.sin)
            attn_out = inp + attn
        h = attn_out.detach().requires_grad_(attn_out.requires_grad)

        def back_attn(g, scale):
            with span(self.events, "B", "ATTN"):
                torch.autograd.backward([attn_out], [g])
            return inp.grad

        rec.steps.append(back_attn)
        yield
        stats = _new_stats()
        ffn = CutMoE(layer, h, stats, lambda: self.events)
        ffn.dispatch()
        aux = self._moe_stats(layer.mlp, rec, stats)

        def back_dispatch(g, scale):
            ffn.backward_dispatch(scale)
            return h.grad

        rec.steps.append(back_dispatch)
        yield
        ffn.mlp()

        def back_mlp(g, scale):
            ffn.backward_mlp()

        rec.steps.append(back_mlp)
        yield
        out = ffn.combine()

        def back_combine(g, scale):
            ffn.backward_combine(g)

        rec.steps.append(back_combine)
        if aux is not None:
            balance.append(aux.detach())  # the loss part; its backward runs in back_dispatch
        return out.detach().requires_grad_(out.requires_grad)

    def backward_steps(self, rec: StageRecord, grad: torch.Tensor | None, scale: float) -> Iterator[None]:
        """Back-propagate ``grad`` (the stage output's gradient; None on the last stage, whose output is the
        loss, weighted by ``scale``) step by step, yielding after each; afterwards ``rec.output`` is the
        gradient of the stage input (None on the first stage) and ``rec.steps`` is empty."""
        g = grad
        while rec.steps:
            step = rec.steps.pop()
            if callable(step):  # a component of a cut MoE layer
                g = step(g, scale)
                yield
                continue
            inp, out, aux, name = step
            with span(self.events, "B", name):
                if g is None:  # the loss
                    g = torch.full_like(out, scale)
                tensors, grads = [out], [g]
                if aux is not None and aux.requires_grad:
                    tensors.append(aux)
                    grads.append(torch.full_like(aux, scale))
                torch.autograd.backward(tensors, grads)
                g = inp.grad if inp is not None else None
            yield
        rec.output = g
