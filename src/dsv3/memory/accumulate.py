"""Gradient accumulation in place for the routed experts (a memory transformation of a training model).

Over the micro-batches of a step autograd makes each weight gradient as a new tensor and adds it into
``.grad``: for a stacked expert block ``[N_r/EP, 2I, d]`` that is, for a moment, a second copy of the block's
gradient (0.125 GiB per MoE layer on bench/scale_memory.py's model). :func:`accumulate_in_place` marks the
expert weights of every :class:`~dsv3.model.moe.Experts` so that the grouped GEMM's backward adds its weight
gradient into ``.grad`` a few experts at a time (:func:`dsv3.model.ops.grouped_mm_wgrad_into`): the same
GEMMs and the same additions (bit for bit the gradients of plain autograd), with a transient of one piece
of at most :data:`~dsv3.model.ops.WGRAD_PIECE_ELEMS` elements. The first micro-batch's gradient becomes
``.grad`` as before. For training only: ``torch.autograd.grad`` with respect to a marked weight whose
``.grad`` is set would find that gradient added into ``.grad`` instead of returned.
"""

from __future__ import annotations

from torch import nn

from dsv3.model.moe import Experts
from dsv3.model.ops import ACCUMULATE_IN_PLACE


def accumulate_in_place(model: nn.Module) -> int:
    """Mark the stacked weights (``gate_up_proj`` [E, 2I, d], ``down_proj`` [E, d, I]) of every
    :class:`~dsv3.model.moe.Experts` of ``model`` for in-place accumulation. Call it on the materialised model
    (materialisation makes new Parameters). Returns the number of weights marked."""
    count = 0
    for module in model.modules():
        if isinstance(module, Experts):
            for p in (module.gate_up_proj, module.down_proj):
                setattr(p, ACCUMULATE_IN_PLACE, True)
                count += 1
    return count
