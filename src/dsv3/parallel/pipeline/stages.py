"""Pipeline stages: the model's layers cut into ``pp`` consecutive pieces, run step by step (docs/pipeline.md).

A :class:`PipelineStage` is a *view* of a built :class:`~dsv3.model.transformer.DeepseekV3ForCausalLM`
that calls the model's own submodules: stage 0 starts with the embedding, every stage runs its decoder
layers as steps (attention, feed-forward; an MoE layer under expert parallelism is cut further at its
all-to-alls, :mod:`~dsv3.parallel.pipeline.overlap`), the last stage ends with the head step (final
norm, L_Main and the MTP losses). Each step takes a detached input and keeps (input, output, auxiliary
loss), and its backward is run explicitly, so the runtime can interleave two micro-batches (the FB op)
and a stage's loss is exactly the single-process loss. :func:`stage_layers` is the planner's balanced
split; :class:`StageLayout` names each stage's modules by their paths and which devices hold them
(``Schedule.device_stages``); :func:`select_stages` removes every module this device does not run
(a :class:`RemovedBlock` keeps the global indices and names). Details: docs/pipeline.md ("Stages",
"What a device holds").
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint
from torch import nn

from dsv3.config import RECIPE_DEFAULTS, ModelConfig
from dsv3.errors import ConfigError
from dsv3.memory.recompute import RecomputePolicy
from dsv3.model.moe import RoutingStats
from dsv3.parallel.pipeline.overlap import CutMoE, cuts, span
from dsv3.plan.flops import model_flops
from dsv3.plan.layout import Layout
from dsv3.plan.planner import default_stage_layers
from dsv3.schedules import build_schedule


def stage_layers(mcfg: ModelConfig, pp: int, seq_len: int, *, mtp: bool = True) -> tuple[int, ...]:
    """Decoder layers per stage: the planner's balanced split (:func:`dsv3.plan.planner.default_stage_layers`).

    Raises:
        ConfigError: ``pp`` is not a positive integer or exceeds the number of layers.
    """
    if isinstance(pp, bool) or not isinstance(pp, int) or pp < 1:
        raise ConfigError(f"pp must be a positive integer, got {pp!r}.")
    if pp > mcfg.num_hidden_layers:
        raise ConfigError(
            f"the model has {mcfg.num_hidden_layers} layers, fewer than pp={pp} pipeline stages; "
            f"use pp <= {mcfg.num_hidden_layers}."
        )
    layout = Layout(pp=pp, seq_len=seq_len, mtp=mtp)
    return default_stage_layers(mcfg, layout, model_flops(mcfg, seq_len))


def _new_stats(alpha: float = 0.0) -> RoutingStats:
    """A fresh per-forward :class:`~dsv3.model.moe.RoutingStats` with balance factor ``alpha``."""
    return RoutingStats(alpha)


def _call(fn, *args, stats=None):
    """``fn(*args, stats=stats)`` when there is a ``stats`` to pass down, else ``fn(*args)``."""
    return fn(*args) if stats is None else fn(*args, stats=stats)


class RemovedBlock(nn.Module):
    """The slot of a decoder layer or MTP module that another pipeline device holds.

    It has no parameters or buffers, so the ``ModuleList`` keeps its length: the held layers keep
    their global indices and checkpoint names. ``mlp`` is None (``model.moe_layers()`` skips it).
    """

    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.mlp = None

    def forward(self, *args, **kwargs):
        raise RuntimeError(
            f"layer {self.layer_idx} is held by another pipeline device; run the model through its PipelineRuntime"
        )

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, held by another pipeline device"


@dataclass(frozen=True)
class StageLayout:
    """Which modules each stage runs and which devices of a pipeline hold them (no torch needed).

    Attributes:
        layers: decoder layers per stage (``pp`` counts summing to L).
        device_stages: the stages each device runs (the schedule's ``device_stages``).
        n_mtp: MTP modules D (all on the last stage).
        embedding_on_last: the last stage uses the embedding too (MTP embeds the shifted tokens, or the
            output head is tied to it).
    """

    layers: tuple[int, ...]
    device_stages: tuple[tuple[int, ...], ...]
    n_mtp: int
    embedding_on_last: bool

    @classmethod
    def of(
        cls, model: nn.Module, schedule: str, pp: int, *, seq_len: int, layers: tuple[int, ...] | None = None
    ) -> "StageLayout":
        """The layout of ``model`` (whole or already cut) under ``schedule`` with ``pp`` stages; ``layers``
        defaults to the planner's balanced split (:func:`stage_layers`)."""
        cfg = model.config
        split = tuple(layers) if layers is not None else stage_layers(cfg, pp, seq_len)
        template = build_schedule(schedule, pp, 2 * pp)
        n_mtp = len(model.mtp)
        return cls(split, template.device_stages, n_mtp, n_mtp > 0 or bool(cfg.tie_word_embeddings))

    @property
    def pp(self) -> int:
        return len(self.layers)

    def layer_ids(self, stage: int) -> list[int]:
        """Global indices of stage ``stage``'s decoder layers."""
        start = sum(self.layers[:stage])
        return list(range(start, start + self.layers[stage]))

    def modules(self, stage: int) -> list[str]:
        """Module paths stage ``stage`` runs, in order: the embedding (first stage; the last one too when
        ``embedding_on_last``), its layers, and on the last stage the final norm, head and MTP modules."""
        last = stage == self.pp - 1
        out = ["model.embed_tokens"] if stage == 0 or (last and self.embedding_on_last) else []
        out += [f"model.layers.{i}" for i in self.layer_ids(stage)]
        if last:
            out += ["model.norm", "lm_head"] + [f"mtp.{k}" for k in range(self.n_mtp)]
        return out

    def device_modules(self, device: int) -> list[str]:
        """Module paths device ``device`` holds (those of its stages, each once)."""
        return list(dict.fromkeys(p for s in self.device_stages[device] for p in self.modules(s)))

    def holders(self, path: str) -> tuple[int, ...]:
        """The devices holding module ``path`` (ascending)."""
        return tuple(d for d in range(len(self.device_stages)) if path in self.device_modules(d))

    def shared_sets(self) -> list[tuple[int, ...]]:
        """Every set of two or more devices that hold a module in common (sorted; the same on every rank)."""
        paths = {p for d in range(len(self.device_stages)) for p in self.device_modules(d)}
        return sorted({self.holders(p) for p in paths if len(self.holders(p)) > 1})

    def eval_device(self, stage: int) -> int:
        """The device that runs ``stage`` in a forward-only pass: the lowest one holding it."""
        return min(d for d, stages in enumerate(self.device_stages) if stage in stages)


def module_of(name: str, paths: list[str]) -> str:
    """The module path among ``paths`` that parameter ``name`` belongs to (longest matching prefix)."""
    found = [p for p in paths if name.startswith(p + ".")]
    if not found:
        raise ValueError(f"parameter {name!r} belongs to none of the modules {paths}")
    return max(found, key=len)


def remove_stages(model: nn.Module, keep: list[str]) -> list[str]:
    """Remove from ``model`` every stage module (see :meth:`StageLayout.modules`) whose path is not in ``keep``;
    return the names of the parameters left (``model.named_parameters()`` order).

    Idempotent. Raises ConfigError when a module in ``keep`` was already removed (a model cut for another device).
    """
    keep = set(keep)
    for attr, blocks in (("model.layers", model.model.layers), ("mtp", model.mtp)):
        for i, block in enumerate(blocks):
            path = f"{attr}.{i}"
            if path not in keep:
                blocks[i] = RemovedBlock(block.layer_idx)
            elif isinstance(block, RemovedBlock):
                raise ConfigError(f"this model no longer holds {path}; build the model again for this device")
    for parent, attr, path in (
        (model.model, "embed_tokens", "model.embed_tokens"),
        (model.model, "norm", "model.norm"),
        (model, "lm_head", "lm_head"),
    ):
        if path not in keep:
            setattr(parent, attr, None)
        elif getattr(parent, attr) is None:
            raise ConfigError(f"this model no longer holds {path}; build the model again for this device")
    return [n for n, _ in model.named_parameters()]


def select_stages(model: nn.Module, ctx, *, seq_len: int, layers: tuple[int, ...] | None = None) -> list[str]:
    """Pipeline stage selection: remove from ``model`` the stages this device does not run; return the held
    parameter names.

    ``ctx`` is the :class:`~dsv3.parallel.world.ParallelContext` (its ``schedule``, ``pp`` and ``pp_rank``,
    the pipeline device); ``seq_len`` decides the planner's balanced split unless ``layers`` gives it.
    Works on a model built on the meta device (nothing is allocated) and on a built one; without
    pipeline parallelism (``ctx.pp == 1``) nothing is removed.
    """
    if ctx.pp <= 1:
        return [n for n, _ in model.named_parameters()]
    layout = StageLayout.of(model, ctx.schedule, ctx.pp, seq_len=seq_len, layers=layers)
    return remove_stages(model, layout.device_modules(ctx.pp_rank))


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
    maps an MoE layer's row in ``expert_load`` (``model.moe_rows()``) to its [N_r] token counts.
    """

    steps: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]] = field(default_factory=list)
    output: torch.Tensor | None = None
    parts: list[torch.Tensor] = field(default_factory=list)
    loads: dict[int, torch.Tensor] = field(default_factory=dict)


class PipelineStage:
    """Stage ``stage`` of a ``pp``-stage split of ``model`` holding decoder layers ``layers``.

    Args:
        model: the causal LM (cut to this device's stages by :func:`remove_stages`, or whole).
        stage: the stage index s in ``0 .. pp-1``.
        pp: number of stages.
        layers: indices of its decoder layers (consecutive).
        paths: the module paths it runs (:meth:`StageLayout.modules`; default: the embedding on the
            first stage, and on the last one when MTP or a tied head uses it; the layers; norm, head, MTP).
        cut_moe: cut MoE layers that exchange tokens at their all-to-alls (three steps each way, see the
            module docstring); False runs each such feed-forward as one step (exchanges inside it).

    ``mtp_loss_weight`` (lambda) and ``seq_aux_alpha`` (alpha) are the loss arguments the stage passes to the
    model (as ``model(ids, labels, mtp_loss_weight=..., seq_aux_alpha=...)`` takes them); the trainer sets them
    before each step (:func:`dsv3.parallel.pipeline.train.set_loss_weights`).

    ``events``: None, or a list that every step appends ``(phase, name, start, end)`` to (phase "F"/"B";
    name EMB, ATTN, FFN, BLOCK, HEAD, END, or a cut layer's DISPATCH / MLP / COMBINE), together with the
    cut layers' exchange starts and waits (:mod:`~dsv3.parallel.pipeline.overlap`); for traces and tests.
    """

    def __init__(
        self,
        model: nn.Module,
        stage: int,
        pp: int,
        layers: list[int],
        *,
        cut_moe: bool = True,
        paths: list[str] | None = None,
    ) -> None:
        self.model, self.stage, self.pp = model, stage, pp
        self.cut_moe = cut_moe
        self.mtp_loss_weight = RECIPE_DEFAULTS["mtp_loss_weight"]
        self.seq_aux_alpha = RECIPE_DEFAULTS["seq_aux_alpha"]
        self.events: list | None = None
        self.layer_ids = list(layers)
        self.is_first, self.is_last = stage == 0, stage == pp - 1
        if paths is None:
            last = self.is_last and (len(model.mtp) > 0 or model.config.tie_word_embeddings)
            paths = (
                (["model.embed_tokens"] if self.is_first or last else [])
                + [f"model.layers.{i}" for i in self.layer_ids]
                + (["model.norm", "lm_head"] + [f"mtp.{k}" for k in range(len(model.mtp))] if self.is_last else [])
            )
        self.paths = list(paths)
        rows = model.moe_rows()
        self._moe_index = {id(m): rows[m.layer_idx] for m in model.moe_layers()}

    @property
    def device(self) -> torch.device:
        """Where the stage's parameters are (read when used: a stage may be made on the meta device)."""
        return next(p for m in self.modules() for p in m.parameters()).device

    # ------------------------------------------------------------------ parameters
    def modules(self) -> list[nn.Module]:
        """The submodules this stage runs (:attr:`paths`: the embedding on the first stage, and on the last one
        when MTP or a tied head uses it)."""
        return [self.model.get_submodule(p) for p in self.paths]

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
            rec.loads[idx] = (
                stats.load[key]
                if key in stats.load
                else torch.zeros(mlp.n_experts, dtype=torch.long, device=self.device)
            )
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
                    stats = _new_stats(self.seq_aux_alpha)
                    out = _call(policy.block, layer, inp, mb.cos, mb.sin, stats=stats)
                    h = keep(inp, out, self._moe_stats(layer.mlp, rec, stats), "BLOCK")
                yield
                continue
            with span(self.events, "F", "ATTN"):
                inp = h
                attn = (
                    policy.attention(layer, inp, mb.cos, mb.sin)
                    if policy is not None
                    else layer.attention(inp, mb.cos, mb.sin)
                )
                h = keep(inp, inp + attn, name="ATTN")
            yield
            with span(self.events, "F", "FFN"):
                inp = h
                stats = _new_stats(self.seq_aux_alpha)
                out = inp + (
                    _call(policy.ffn, layer, inp, stats=stats)
                    if policy is not None
                    else _call(layer.ffn, inp, stats=stats)
                )
                h = keep(inp, out, self._moe_stats(layer.mlp, rec, stats), "FFN")
            yield
        with span(self.events, "F", "HEAD" if self.is_last else "END"):
            if self.is_last:
                inp = h
                h_norm = m.model.norm(inp)
                lm = m._head_loss(h_norm, mb.labels)
                emb = m.model.embed_tokens(mb.ids) if len(m.mtp) else None
                stats = _new_stats(self.seq_aux_alpha)
                mtp = (
                    m._mtp_loss(inp, emb, mb.labels, mb.cos, mb.sin, stats=stats, mtp_loss_weight=self.mtp_loss_weight)
                    if len(m.mtp)
                    else lm.new_zeros(())
                )
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
        stats = _new_stats(self.seq_aux_alpha)
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

    @torch.no_grad()
    def forward_eval(self, x: torch.Tensor | None, mb: MicroBatch) -> torch.Tensor:
        """The stage's forward-only pass for validation: ``x`` [b, T, d] (ignored on the first stage, which
        embeds ``mb.ids``) -> the output activation [b, T, d], or on the last stage the main-model loss L_Main
        (mean cross-entropy of ``mb.labels``, as ``model(ids, labels).lm_loss``; no MTP)."""
        m = self.model
        h = m.model.embed_tokens(mb.ids) if self.is_first else x
        for i in self.layer_ids:
            h = _call(m.model.layers[i], h, mb.cos, mb.sin, stats=_new_stats())
        if not self.is_last:
            return h
        return m._head_loss(m.model.norm(h), mb.labels)
