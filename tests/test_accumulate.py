"""Gradient accumulation in place for the routed experts (dsv3.memory.accumulate): the same gradients bit for bit
as plain autograd over several micro-batches, without a second copy of an expert block's gradient."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import small_config
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dsv3.memory.accumulate import accumulate_in_place
from dsv3.memory.recompute import apply_recompute
from dsv3.model import DeepseekV3ForCausalLM
from dsv3.model import ops as ops_module
from dsv3.model.moe import Experts


class _LargestOutput(TorchDispatchMode):
    """The most elements of any tensor an op makes while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.largest = max([self.largest, *sizes])
        return out


def _run(model, batches, watch_from: int = 1) -> int:
    """Forward and backward of each micro-batch (loss / n); the largest op output of the backward passes from
    micro-batch ``watch_from`` on (when ``.grad`` already exists)."""
    largest = 0
    for i, ids in enumerate(batches):
        loss = model(ids, ids).loss / len(batches)
        if i < watch_from:
            loss.backward()
            continue
        with _LargestOutput() as mode:
            loss.backward()
        largest = max(largest, mode.largest)
    return largest


@pytest.mark.parametrize("policy", ["none", "selective"])
@pytest.mark.parametrize("piece", [1, 1 << 22])
def test_in_place_accumulation_equals_autograd_bit_for_bit(monkeypatch, policy, piece):
    monkeypatch.setattr(ops_module, "WGRAD_PIECE_ELEMS", piece)  # 1: one expert per piece (empty experts too)
    torch.manual_seed(0)
    cfg = small_config(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=64)
    ref = DeepseekV3ForCausalLM(cfg).train()
    new = copy.deepcopy(ref)
    for m in (ref, new):
        apply_recompute(m, policy)
    assert accumulate_in_place(new) == 2 * sum(isinstance(m, Experts) for m in new.modules())
    batches = [torch.randint(0, cfg.vocab_size, (2, 16)) for _ in range(3)]
    _run(ref, batches)
    _run(new, batches)
    for (name, a), b in zip(ref.named_parameters(), new.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad), name


def test_no_second_copy_of_an_expert_block_gradient(monkeypatch):
    monkeypatch.setattr(ops_module, "WGRAD_PIECE_ELEMS", 1)
    torch.manual_seed(0)
    # experts wider than every other tensor of the model, so the largest op output is an expert gradient
    cfg = small_config(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=256, vocab_size=64)
    ref = DeepseekV3ForCausalLM(cfg).train()
    new = copy.deepcopy(ref)
    accumulate_in_place(new)
    block = new.model.layers[1].mlp.experts.gate_up_proj
    batches = [torch.randint(0, cfg.vocab_size, (1, 16)) for _ in range(2)]
    assert _run(ref, batches) >= block.numel()  # plain autograd: the whole block's new gradient
    grads_before = None
    largest = 0
    for i, ids in enumerate(batches):
        loss = new(ids, ids).loss / 2
        if i == 0:
            loss.backward()
            grads_before = block.grad.data_ptr()
            continue
        with _LargestOutput() as mode:
            loss.backward()
        largest = mode.largest
    assert largest <= block[0].numel() < block.numel()  # one expert at a time
    assert block.grad.data_ptr() == grads_before  # added into .grad, not replaced


def test_unmarked_or_graph_building_backward_is_plain_autograd():
    torch.manual_seed(0)
    x = torch.randn(12, 16)
    w = torch.nn.Parameter(torch.randn(3, 8, 16))
    offs = torch.tensor([4, 4, 12], dtype=torch.int32)
    dy = torch.randn(12, 8)
    w.grad = torch.zeros_like(w)
    assert not ops_module.grouped_mm_wgrad_into(w, dy, x, offs)  # not marked
    setattr(w, ops_module.ACCUMULATE_IN_PLACE, True)
    with torch.enable_grad():
        assert not ops_module.grouped_mm_wgrad_into(w, dy, x, offs)  # double backward builds a graph
    with torch.no_grad():
        assert ops_module.grouped_mm_wgrad_into(w, dy, x, offs)
    ref = torch.stack([dy[a:b].double().t() @ x[a:b].double() for a, b in ((0, 4), (4, 4), (4, 12))])
    assert torch.allclose(w.grad.double(), ref, atol=1e-5)  # float64 reference


def test_deferred_weight_gradients_of_the_zero_bubble_split_accumulate_in_place_too(monkeypatch):
    """The W op of ZB1P / DualPipe (``split_weight_grads``): over two micro-batches the deferred expert gradients are
    added into ``.grad`` in place and equal plain autograd's bit for bit."""
    from dsv3.parallel.pipeline.wgrad import WeightGradStore, split_weight_grads

    monkeypatch.setattr(ops_module, "WGRAD_PIECE_ELEMS", 1)
    torch.manual_seed(0)
    cfg = small_config(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=64)
    ref = DeepseekV3ForCausalLM(cfg).train()
    new = copy.deepcopy(ref)
    accumulate_in_place(new)
    store = WeightGradStore()
    split_weight_grads(new, store)
    batches = [torch.randint(0, cfg.vocab_size, (2, 16)) for _ in range(2)]
    _run(ref, batches)
    block = new.model.layers[1].mlp.experts.gate_up_proj
    for i, ids in enumerate(batches):
        loss = new(ids, ids).loss / len(batches)
        with store.deferring():
            loss.backward()
        store.flush(i)
        with _LargestOutput() as mode:
            store.pop(i)
        if i == 1:
            assert mode.largest < block.numel()  # no new gradient of the whole block in the W op
    for (name, a), b in zip(ref.named_parameters(), new.parameters()):
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad), name
