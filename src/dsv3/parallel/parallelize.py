"""The one ordered transformation of a model for a layout: :func:`parallelize` (docs/architecture.md).

A run builds its model on the ``meta`` device (:func:`build_meta_model`), then :func:`parallelize` applies,
in this order (:data:`ORDER`, as torchtitan's ``parallelize_deepseekv3``): precision (dtype, FP8 recipe),
recomputation, expert sharding (:func:`dsv3.parallel.dispatch.shard_experts`: dispatchers and this rank's
``N_r / ep`` experts), stage selection (``--pp``: other stages removed, global names kept),
materialisation of what is still held (initialised from the per-parameter seeds or read from
``--init-from``: :func:`initialize`; the expert weights then accumulate their gradients in place,
:func:`dsv3.memory.accumulate.accumulate_in_place`), the pipeline runtime (``--pp``), and the ZeRO-1 optimizer
(:class:`~dsv3.parallel.zero.ZeroAdamW`, which at dp = 1 is AdamW). The runtime and the optimizer come after
materialisation, since their buffers and state are made from real tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dsv3.config import ModelConfig
from dsv3.fp8 import FP8Recipe, convert
from dsv3.memory.accumulate import accumulate_in_place
from dsv3.memory.recompute import apply_recompute
from dsv3.model import DeepseekV3ForCausalLM
from dsv3.model.rope import RotaryEmbedding
from dsv3.model.transformer import apply_rope_config
from dsv3.parallel.checkpointer import Checkpointer
from dsv3.parallel.dispatch import shard_experts
from dsv3.parallel.pipeline.stages import select_stages as remove_other_stages
from dsv3.parallel.pipeline.train import build_pipeline
from dsv3.parallel.zero import ZeroAdamW
from dsv3.utils.meta import materialize

ORDER = ("precision", "recompute", "experts", "stages", "materialize", "runtime", "optimizer")


@dataclass
class Parallelized:
    """What :func:`parallelize` returns.

    Attributes:
        model: the transformed, materialised model (the same object that was given).
        optimizer: the :class:`~dsv3.parallel.zero.ZeroAdamW` over this rank's parameters (None when not ``optimize``).
        pipeline: the :class:`~dsv3.parallel.pipeline.executor.PipelineRuntime` (None without ``--pp``).
    """

    model: nn.Module
    optimizer: ZeroAdamW | None
    pipeline: Any = None


def build_meta_model(mcfg: ModelConfig, seed: int) -> nn.Module:
    """The whole model on the ``meta`` device (no storage) with ``init_seed`` drawn after ``torch.manual_seed(seed)``,
    exactly as a model built on a real device would draw it."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        return DeepseekV3ForCausalLM(mcfg)


def apply_precision(model: nn.Module, config) -> nn.Module:
    """Step 1: the parameter dtype and the FP8 recipe (``config``: a TrainConfig)."""
    model.to(getattr(torch, config.precision.dtype))
    if config.precision.fp8:
        prec = config.precision
        convert(model, FP8Recipe(backend=prec.fp8_backend, scale_format=prec.fp8_scale_format, fp8_gemm=prec.fp8_gemm))
    return model


def apply_recomputation(model: nn.Module, config) -> nn.Module:
    """Step 2: the selective or full recomputation policy of every block."""
    if config.memory.recompute != "none":
        apply_recompute(model, config.memory.recompute)
    return model


def select_stages(model: nn.Module, ctx, config) -> None:
    """Step 4: under ``--pp`` remove the stages this pipeline device does not run (on meta: nothing was ever
    allocated for them; :func:`dsv3.parallel.pipeline.stages.select_stages`)."""
    if ctx.pp > 1:
        remove_other_stages(model, ctx, seq_len=config.data.seq_len)


def build_runtime(model: nn.Module, ctx, config, run_dir: str | None = None):
    """Step 6: under ``--pp`` the pipeline runtime of the (cut, materialised) model (collective), else None."""
    if ctx.pp <= 1:
        return None
    return build_pipeline(model, ctx, config, run_dir)


@torch.no_grad()
def initialize(
    model: nn.Module, mcfg: ModelConfig, init_from: str | None = None, *, partial: bool = False
) -> nn.Module:
    """The values of a materialised model: the tensors of the Hugging Face checkpoint directory ``init_from``
    (``partial``: the model holds a rank's part, and only that part is read; every held tensor must be
    found), else the per-parameter seeds of ``model.init_seed``;
    then ``model.config = mcfg`` with its rotary tables (non-persistent buffers) and softmax scales."""
    if init_from:  # only the tensors and expert rows this rank holds are read
        Checkpointer.init_from(init_from, model, partial=partial)
    else:
        model.reset_parameters(model.init_seed)
    tables = [m for m in model.modules() if isinstance(m, RotaryEmbedding)]
    dtypes = [m.inv_freq.dtype for m in tables]  # the model's dtype, as a model cast after its build has them
    apply_rope_config(model, mcfg)
    for m, dtype in zip(tables, dtypes):
        m.inv_freq = m.inv_freq.to(dtype)
    return model


def build_optimizer(model: nn.Module, ctx, config, pipeline=None) -> ZeroAdamW:
    """Step 6: ZeRO-1 AdamW over this rank's parameters (under ``--pp`` those of its stages)."""
    opt = config.optimizer
    held = (
        {}
        if pipeline is None
        else dict(names=pipeline.owned, norm_names=pipeline.norm_owned, norm_group=pipeline.group)
    )
    return ZeroAdamW(
        model,
        ctx,
        lr=opt.lr,
        betas=(opt.beta1, opt.beta2),
        weight_decay=opt.weight_decay,
        eps=opt.eps,
        moments_dtype=config.memory.optim_states,
        **held,
    )


def parallelize(
    model: nn.Module,
    ctx,
    config,
    *,
    mcfg: ModelConfig | None = None,
    init_from: str | None = None,
    run_dir: str | None = None,
    partial: bool | None = None,
    optimize: bool = True,
) -> Parallelized:
    """Apply the layout of ``ctx`` and the recipe of ``config`` to ``model`` in the order of the module docstring.

    Args:
        model: the model from :func:`build_meta_model` (on ``meta``; an already materialised model
            is transformed but keeps its values: step 5 touches only ``meta`` tensors).
        ctx: the :class:`~dsv3.parallel.world.ParallelContext` (``ParallelContext.single(device)`` for one process).
        config: the :class:`~dsv3.train.config.TrainConfig`.
        mcfg: the run's model configuration (default ``model.config``).
        init_from: a Hugging Face checkpoint directory (:func:`dsv3.checkpoint.state.resolve_pretrained`)
            whose held tensors are the initial values (default: the per-parameter seeds).
        run_dir: where a ``--trace`` of the pipeline goes.
        partial: read only the held tensors of ``init_from`` (default: under ep or pp); True also in one process
            when the model leaves out some of the checkpoint's tensors (GRPO and the reward model drop MTP).
        optimize: build the optimizer (False: the caller builds it over a model wrapping this one,
            :func:`build_optimizer`, as the reward model does around its score head).
    """
    mcfg = mcfg or model.config
    apply_precision(model, config)
    apply_recomputation(model, config)
    dispatcher = config.parallel.dispatcher if ctx.distributed else "local"  # one process: every expert is local
    shard_experts(model, ctx, dispatcher=dispatcher, fp8=config.precision.fp8)
    select_stages(model, ctx, config)
    if any(t.is_meta for t in model.parameters()):
        materialize(model, ctx.device)
        initialize(model, mcfg, init_from, partial=ctx.ep > 1 or ctx.pp > 1 if partial is None else partial)
    accumulate_in_place(model)
    model.train()
    pipeline = build_runtime(model, ctx, config, run_dir)
    optimizer = build_optimizer(model, ctx, config, pipeline) if optimize else None
    return Parallelized(model=model, optimizer=optimizer, pipeline=pipeline)
