"""The one ordered transformation of a model for a layout: :func:`parallelize`.

A training run builds its model on the ``meta`` device (:func:`build_meta_model`: shapes and
names, no storage), then :func:`parallelize` applies, in this order (as torchtitan's
``parallelize_deepseekv3`` does):

1. **precision**: the parameter dtype (``--dtype``), then the FP8 recipe (:func:`dsv3.fp8.convert`:
   Linears swapped for FP8 Linears sharing their Parameters, FP8 grouped GEMMs for the experts);
2. **recomputation**: the policy of every block (:func:`dsv3.memory.recompute.apply_recompute`);
3. **expert sharding**: every MoE layer gets a dispatcher and, under expert parallelism, only this
   rank's block of ``N_r / ep`` experts, created directly at the local size
   (:func:`dsv3.parallel.dispatch.shard_experts`; on meta no full layer ever exists);
4. **stage selection**: under ``--pp`` the stages this pipeline device does not run are removed
   (:func:`dsv3.parallel.pipeline.stages.select_stages`: their slots become empty blocks, global
   names kept);
5. **materialisation**: only the tensors still on the model get storage on ``ctx.device``
   (:func:`dsv3.utils.meta.materialize`), initialised from the per-parameter seeds
   (:meth:`~dsv3.model.DeepseekV3ForCausalLM.reset_parameters`: ``(seed, global name)``, routed experts by
   global index) or read from ``--init-from`` (only the held tensors and expert rows, :func:`initialize`);
   so a rank holds exactly the values one process would;
6. **pipeline runtime**: under ``--pp`` the :class:`~dsv3.parallel.pipeline.executor.PipelineRuntime`
   over the held stages (process groups: collective);
7. **optimizer**: :class:`~dsv3.parallel.zero.ZeroAdamW` over the held parameters, for every layout
   (one process is :meth:`ParallelContext.single`, where ZeRO-1 with dp = 1 is AdamW).

The runtime and the optimizer come after materialisation: the runtime's buffers and the optimizer's
state (FP32 master chunks) are made from real tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dsv3.config import ModelConfig
from dsv3.parallel.dispatch import shard_experts
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
    from dsv3.model import DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    with torch.device("meta"):
        return DeepseekV3ForCausalLM(mcfg)


def apply_precision(model: nn.Module, config) -> nn.Module:
    """Step 1: the parameter dtype and the FP8 recipe (``config``: a TrainConfig)."""
    model.to(getattr(torch, config.precision.dtype))
    if config.precision.fp8:
        from dsv3.fp8 import FP8Recipe, convert

        prec = config.precision
        convert(model, FP8Recipe(backend=prec.fp8_backend, scale_format=prec.fp8_scale_format, fp8_gemm=prec.fp8_gemm))
    return model


def apply_recomputation(model: nn.Module, config) -> nn.Module:
    """Step 2: the selective or full recomputation policy of every block."""
    if config.memory.recompute != "none":
        from dsv3.memory.recompute import apply_recompute

        apply_recompute(model, config.memory.recompute)
    return model


def select_stages(model: nn.Module, ctx, config) -> None:
    """Step 4: under ``--pp`` remove the stages this pipeline device does not run (on meta: nothing was ever
    allocated for them; :func:`dsv3.parallel.pipeline.stages.select_stages`)."""
    if ctx.pp > 1:
        from dsv3.parallel.pipeline.stages import select_stages as remove_other_stages

        remove_other_stages(model, ctx, seq_len=config.data.seq_len)


def build_runtime(model: nn.Module, ctx, config, run_dir: str | None = None):
    """Step 6: under ``--pp`` the pipeline runtime of the (cut, materialised) model (collective), else None."""
    if ctx.pp <= 1:
        return None
    from dsv3.parallel.pipeline.train import build_pipeline

    return build_pipeline(model, ctx, config, run_dir)


@torch.no_grad()
def initialize(
    model: nn.Module, mcfg: ModelConfig, init_from: str | None = None, *, partial: bool = False
) -> nn.Module:
    """The values of a materialised model: the tensors of the Hugging Face checkpoint directory ``init_from``
    (``partial``: the model holds a rank's part, and only that part is read; every held tensor must be
    found), else the per-parameter seeds of ``model.init_seed``;
    then ``model.config = mcfg`` with its rotary tables (non-persistent buffers) and softmax scales."""
    from dsv3.model.rope import RotaryEmbedding
    from dsv3.model.transformer import apply_rope_config

    if init_from:  # only the tensors and expert rows this rank holds are read
        from dsv3.parallel.checkpointer import Checkpointer

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
    model.train()
    pipeline = build_runtime(model, ctx, config, run_dir)
    optimizer = build_optimizer(model, ctx, config, pipeline) if optimize else None
    return Parallelized(model=model, optimizer=optimizer, pipeline=pipeline)
