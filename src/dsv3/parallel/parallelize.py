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
4. **stage selection**: under ``--pp`` the :class:`~dsv3.parallel.pipeline.executor.PipelineRuntime`
   of this device's stages (:func:`select_stages`);
5. **materialisation**: only the tensors still on the model get storage on ``ctx.device``
   (:func:`materialize`), initialised from the per-parameter seeds
   (:meth:`~dsv3.model.DeepseekV3ForCausalLM.reset_parameters`: ``(seed, global name)``, routed experts by
   global index) or read from ``--init-from`` (only the held tensors and experts, :func:`initialize`);
   so a rank holds exactly the values one process would;
6. **optimizer**: :class:`~dsv3.parallel.zero.ZeroAdamW` over the held parameters, for every layout
   (one process is :meth:`ParallelContext.single`, where ZeRO-1 with dp = 1 is AdamW).

The optimizer comes last because its state (the FP32 master chunks) is made from materialised values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dsv3.config import ModelConfig
from dsv3.parallel.dispatch import shard_experts
from dsv3.parallel.zero import ZeroAdamW

ORDER = ("precision", "recompute", "experts", "stages", "materialize", "optimizer")


@dataclass
class Parallelized:
    """What :func:`parallelize` returns.

    Attributes:
        model: the transformed, materialised model (the same object that was given).
        optimizer: the :class:`~dsv3.parallel.zero.ZeroAdamW` over this rank's parameters.
        pipeline: the :class:`~dsv3.parallel.pipeline.executor.PipelineRuntime` (None without ``--pp``).
    """

    model: nn.Module
    optimizer: ZeroAdamW
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


def select_stages(model: nn.Module, ctx, config, run_dir: str | None = None):
    """Step 4: under ``--pp`` the pipeline runtime of this device's stages (collective), else None."""
    if config.parallel.pp <= 1:
        return None
    from dsv3.parallel.pipeline.train import build_pipeline

    return build_pipeline(model, ctx, config, run_dir)


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device) -> nn.Module:
    """Step 5: give every ``meta`` parameter and buffer still on ``model`` (uninitialised) storage on ``device``.

    Unlike ``nn.Module.to_empty`` it keeps tied parameters tied (``lm_head`` and the embedding,
    the MTP modules' shared head) and every Parameter's ``requires_grad``. Non-persistent buffers
    (the rotary tables) must be rebuilt by the caller (:func:`initialize`).
    """
    made: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is None or not t.is_meta:
                    continue
                if id(t) not in made:
                    new = torch.empty(t.shape, dtype=t.dtype, device=device)
                    made[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
                table[name] = made[id(t)]
    return model


@torch.no_grad()
def initialize(model: nn.Module, mcfg: ModelConfig, init_from: str | None = None) -> nn.Module:
    """The values of a materialised model: the held tensors of the Hugging Face checkpoint directory
    ``init_from`` (every one is read: strict), else the per-parameter seeds of ``model.init_seed``;
    then ``model.config = mcfg`` with its rotary tables (non-persistent buffers) and softmax scales."""
    from dsv3.model.rope import apply_rope_config

    if init_from:
        from dsv3.checkpoint.hf import load_state_into

        load_state_into(model, init_from)
    else:
        model.reset_parameters(model.init_seed)
    return apply_rope_config(model, mcfg)


def build_optimizer(model: nn.Module, ctx, config, pipeline=None) -> ZeroAdamW:
    """Step 6: ZeRO-1 AdamW over this rank's parameters (under ``--pp`` those of its stages)."""
    opt = config.optimizer
    held = {} if pipeline is None else dict(names=pipeline.owned, norm_names=pipeline.norm_owned,
                                            norm_group=pipeline.group)
    return ZeroAdamW(model, ctx, lr=opt.lr, betas=(opt.beta1, opt.beta2), weight_decay=opt.weight_decay, eps=opt.eps,
                     moments_dtype=config.memory.optim_states, **held)


def parallelize(model: nn.Module, ctx, config, *, mcfg: ModelConfig | None = None, init_from: str | None = None,
                run_dir: str | None = None) -> Parallelized:
    """Apply the layout of ``ctx`` and the recipe of ``config`` to ``model`` in the order of the module docstring.

    Args:
        model: the model from :func:`build_meta_model` (on ``meta``; an already materialised model
            is transformed but keeps its values: step 5 touches only ``meta`` tensors).
        ctx: the :class:`~dsv3.parallel.world.ParallelContext` (``ParallelContext.single(device)`` for one process).
        config: the :class:`~dsv3.train.config.TrainConfig`.
        mcfg: the run's model configuration (default ``model.config``).
        init_from: a Hugging Face checkpoint directory (:func:`dsv3.checkpoint.hf.resolve_pretrained`)
            whose held tensors are the initial values (default: the per-parameter seeds).
        run_dir: where a ``--trace`` of the pipeline goes.
    """
    mcfg = mcfg or model.config
    apply_precision(model, config)
    apply_recomputation(model, config)
    dispatcher = config.parallel.dispatcher if ctx.distributed else "local"  # one process: every expert is local
    shard_experts(model, ctx, dispatcher=dispatcher, fp8=config.precision.fp8)
    pipeline = select_stages(model, ctx, config, run_dir)
    if any(t.is_meta for t in model.parameters()):
        materialize(model, ctx.device)
        initialize(model, mcfg, init_from)
    model.train()
    return Parallelized(model=model, optimizer=build_optimizer(model, ctx, config, pipeline), pipeline=pipeline)
