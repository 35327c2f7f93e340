"""The Dispatcher protocol (dsv3.model.moe.Dispatcher): every backend states it, and its halves compute the MoE.

* structurally: LocalDispatcher, AllToAllDispatcher and DeepEPDispatcher have every member of the protocol,
  with the protocol's parameter names (negative controls: an object missing a method, one misnaming a
  parameter);
* the local dispatcher's start/wait and cut halves, driven by the FB overlap's cut layer (CutMoE), give the
  feed-forward output and gradients of a float64 per-token transcription of report eq. (12)-(13).
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from helpers import small_config

from dsv3.model import DeepseekV3ForCausalLM
from dsv3.model.moe import Dispatcher, DispatchInHalves, LocalDispatcher
from dsv3.parallel.deepep import DeepEPBuffer, DeepEPDispatcher
from dsv3.parallel.dispatch import AllToAllDispatcher
from dsv3.parallel.pipeline.overlap import CutMoE

MEMBERS = [name for name, v in vars(Dispatcher).items() if inspect.isfunction(v) and not name.startswith("_")] + list(
    Dispatcher.__annotations__
)


_MISSING = object()


def _protocol_gaps(obj) -> list[str]:
    """Members of the protocol that ``obj`` lacks, or whose parameters it does not name as the protocol does."""
    gaps = []
    for name in MEMBERS:
        member = getattr(obj, name, _MISSING)
        spec = vars(Dispatcher).get(name)
        if member is _MISSING or (inspect.isfunction(spec) and not callable(member)):
            gaps.append(f"missing {name}")
        elif inspect.isfunction(spec):
            want = [p for p in inspect.signature(spec).parameters if p != "self"]
            got = list(inspect.signature(member).parameters)
            if len(got) != len(want) or got[1:] != want[1:]:  # the first argument may be named as it likes
                gaps.append(f"{name}{tuple(got)} != {tuple(want)}")
    return gaps


def _dispatchers():
    return {
        "local": LocalDispatcher(8),
        "alltoall": AllToAllDispatcher(None, 2, 0, 8),
        "deepep": DeepEPDispatcher(None, 2, 0, 8, buffer=DeepEPBuffer(None, module=object())),
    }


def test_protocol_names_the_halves_and_the_cut():
    assert set(MEMBERS) >= {
        "group",
        "dispatch",
        "combine",
        "dispatch_start",
        "dispatch_wait",
        "combine_start",
        "combine_wait",
        "dispatch_backward_start",
        "dispatch_backward_wait",
        "combine_backward_start",
        "combine_backward_wait",
    }


@pytest.mark.parametrize("name", ["local", "alltoall", "deepep"])
def test_each_dispatcher_satisfies_the_protocol(name):
    disp = _dispatchers()[name]
    assert isinstance(disp, Dispatcher)
    assert _protocol_gaps(disp) == []


def test_an_incomplete_dispatcher_is_not_one():
    every_but_one = {k: v for k, v in vars(LocalDispatcher).items() if k != "combine_wait"}
    NoCombineWait = type("NoCombineWait", (DispatchInHalves,), every_but_one)

    class Misnamed(LocalDispatcher):
        def dispatch_wait(self, pending, *, blocking=False):  # the protocol's keyword is ``cut``
            return super().dispatch_wait(pending, cut=blocking)

    assert isinstance(LocalDispatcher(8), Dispatcher)  # the control's source satisfies it
    assert not isinstance(NoCombineWait(8), Dispatcher)
    assert _protocol_gaps(NoCombineWait(8)) == ["missing combine_wait"]
    assert isinstance(Misnamed(8), Dispatcher)  # isinstance checks the names of members only
    assert _protocol_gaps(Misnamed(8)) == ["dispatch_wait('pending', 'blocking') != ('pending', 'cut')"]


def _reference(layer, h: torch.Tensor) -> torch.Tensor:
    """h + FFN_shared(u) + sum_k g_{t,k} FFN_{i_k}(u), u = RMSNorm(h), token by token in float64."""
    moe = layer.mlp
    u = layer.post_attention_layernorm(h).reshape(-1, h.shape[-1])
    g, idx, _ = moe.gate(u)
    rows = []
    for t in range(u.shape[0]):
        acc = moe.shared_experts(u[t : t + 1])[0]
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            gate, up = (moe.experts.gate_up_proj[e] @ u[t]).chunk(2)
            acc = acc + g[t, k].to(u.dtype) * (moe.experts.down_proj[e] @ (F.silu(gate) * up))
        rows.append(acc)
    return h + torch.stack(rows).view(h.shape)


def test_local_halves_and_cut_equal_a_float64_transcription():
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(small_config())
    model.reset_parameters(seed=3)
    model = model.double().train()
    layer = model.model.layers[1]
    assert layer.mlp is not None and isinstance(layer.mlp.dispatcher, LocalDispatcher)
    params = [p for m in (layer.mlp, layer.post_attention_layernorm) for p in m.parameters() if p.requires_grad]
    h = torch.randn(2, 5, model.config.hidden_size, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn_like(h)

    want = _reference(layer, h)
    want_grads = torch.autograd.grad(want, [h, *params], grad_out)

    h_cut = h.detach().clone().requires_grad_(True)
    cut = CutMoE(layer, h_cut)
    cut.dispatch()
    cut.mlp()
    out = cut.combine()
    cut.backward_combine(grad_out)
    cut.backward_mlp()
    cut.backward_dispatch(1.0)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_cut.grad, want_grads[0], rtol=1e-12, atol=1e-12)
    for p, g in zip(params, want_grads[1:]):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-12)

    # the blocking calls are the same halves without the cut
    blocking = layer.mlp(layer.post_attention_layernorm(h.detach())) + h.detach()
    torch.testing.assert_close(blocking, want.detach(), rtol=1e-12, atol=1e-12)
