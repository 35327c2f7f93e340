"""The DeepEP adapter (dsv3.parallel.deepep) against a stand-in ``deep_ep`` with DeepEP's documented semantics.

No GPU and no DeepEP here: :class:`FakeBuffer` implements what DeepEP's README and tests/test_intranode.py
document for ``get_dispatch_layout``, ``dispatch`` (a token arrives once per destination rank, rows grouped by
source rank in token order, ``recv_topk_idx`` local or -1) and ``combine`` (sum of the rows sent back), with
the ranks as threads of this process exchanging through a barrier. The adapter's outputs and gradients
(tokens, gate weights, expert weights) must equal one process's LocalDispatcher on all ranks' tokens, and its
received rows must be LocalDispatcher's rows of this rank's experts in the same order, so a mislaid row fails.
"""

from __future__ import annotations

import importlib.machinery
import sys
import threading
import types

import pytest
import torch
from helpers import assert_one_error, cli, quick_options

from dsv3.errors import ConfigError
from dsv3.model.moe import LocalDispatcher

N, K, E, D = 7, 3, 8, 16  # tokens per rank, choices per token, global experts, hidden size
JUNK = 777.0  # what the stand-in puts in the weights of choices on other ranks (DeepEP leaves them unspecified)


# ---------------------------------------------------------------------------- the stand-in deep_ep
class FakeWorld:
    """``ep`` ranks as threads: each posts one message per destination, then reads one per source."""

    def __init__(self, ep: int) -> None:
        self.ep = ep
        self.barrier = threading.Barrier(ep, timeout=30)
        self.board: dict = {}

    def exchange(self, rank: int, outgoing: list) -> list:
        self.board[rank] = outgoing
        self.barrier.wait()
        got = [self.board[src][rank] for src in range(self.ep)]
        self.barrier.wait()  # every rank has read before anyone posts again
        return got


class FakeGroup:
    def __init__(self, world: FakeWorld, rank: int) -> None:
        self.world, self.rank_ = world, rank

    def size(self) -> int:
        return self.world.ep

    def rank(self) -> int:
        return self.rank_


class FakeEvent:
    def __init__(self, log: list) -> None:
        self.log = log

    def current_stream_wait(self) -> None:
        self.log.append("wait")


class FakeConfig:
    def get_nvl_buffer_size_hint(self, hidden_bytes: int, n: int) -> int:
        return hidden_bytes * n

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, n: int) -> int:
        return 0


class FakeBuffer:
    """DeepEP's normal-kernel ``Buffer`` as documented, exchanging through a :class:`FakeWorld`."""

    made: list = []

    def __init__(self, group: FakeGroup, num_nvl_bytes: int, num_rdma_bytes: int) -> None:
        self.group, self.num_nvl_bytes, self.num_rdma_bytes = group, num_nvl_bytes, num_rdma_bytes
        self.log: list = []
        FakeBuffer.made.append(self)

    @staticmethod
    def get_dispatch_config(n: int) -> FakeConfig:
        return FakeConfig()

    @staticmethod
    def get_combine_config(n: int) -> FakeConfig:
        return FakeConfig()

    def get_dispatch_layout(
        self, topk_idx, num_experts, previous_event=None, async_finish=False, allocate_on_comm_stream=False
    ):
        assert topk_idx.dtype == torch.int64
        ep = self.group.size()
        dest = topk_idx // (num_experts // ep)
        in_rank = torch.zeros(topk_idx.shape[0], ep, dtype=torch.bool)
        in_rank.scatter_(1, dest, True)
        per_expert = torch.bincount(topk_idx.reshape(-1), minlength=num_experts).int()
        return in_rank.sum(0).int(), None, per_expert, in_rank, FakeEvent(self.log)

    def dispatch(
        self,
        x,
        handle=None,
        num_tokens_per_rank=None,
        num_tokens_per_rdma_rank=None,
        is_token_in_rank=None,
        num_tokens_per_expert=None,
        topk_idx=None,
        topk_weights=None,
        expert_alignment=1,
        config=None,
        previous_event=None,
        async_finish=False,
        allocate_on_comm_stream=False,
    ):
        assert not torch.is_grad_enabled()  # DeepEP is not autograd-aware: the adapter must call it outside
        self.log.append(("dispatch", async_finish, handle is not None))
        ep, rank = self.group.size(), self.group.rank()
        in_rank = handle["in_rank"] if handle is not None else is_token_in_rank
        n_local = None if topk_idx is None else int(num_tokens_per_expert.numel()) // ep
        out = []
        for dst in range(ep):
            tokens = in_rank[:, dst].nonzero(as_tuple=True)[0]  # token order
            msg = [x.index_select(0, tokens)]
            if topk_idx is not None and handle is None:
                idx = topk_idx.index_select(0, tokens)
                here = idx // n_local == dst
                msg.append(torch.where(here, idx - dst * n_local, torch.full_like(idx, -1)))
                msg.append(
                    torch.where(
                        here,
                        topk_weights.index_select(0, tokens),
                        torch.full_like(topk_weights.index_select(0, tokens), JUNK),
                    )
                )
            out.append(msg)
        got = self.group.world.exchange(rank, out)  # from each source rank, in rank order
        recv_x = torch.cat([m[0] for m in got])
        new_handle = handle if handle is not None else {"in_rank": in_rank, "splits": [len(m[0]) for m in got]}
        if topk_idx is None or handle is not None:
            return recv_x, None, None, None, new_handle, FakeEvent(self.log)
        recv_idx, recv_w = torch.cat([m[1] for m in got]), torch.cat([m[2] for m in got])
        counts = [int((recv_idx == i).sum()) for i in range(n_local)]
        return recv_x, recv_idx, recv_w, counts, new_handle, FakeEvent(self.log)

    def combine(
        self,
        x,
        handle,
        topk_weights=None,
        config=None,
        previous_event=None,
        async_finish=False,
        allocate_on_comm_stream=False,
    ):
        assert not torch.is_grad_enabled()
        self.log.append(("combine", async_finish))
        ep, rank = self.group.size(), self.group.rank()
        parts = [x.split(handle["splits"])] + (
            [topk_weights.split(handle["splits"])] if topk_weights is not None else []
        )
        got = self.group.world.exchange(rank, [[p[src] for p in parts] for src in range(ep)])
        in_rank = handle["in_rank"]
        outs = []
        for j, like in enumerate(parts):
            total = torch.zeros(in_rank.shape[0], like[0].shape[1], dtype=like[0].dtype)
            for dst in range(ep):  # each token: the sum of what the ranks it went to send back
                total.index_add_(0, in_rank[:, dst].nonzero(as_tuple=True)[0], got[dst][j])
            outs.append(total)
        return outs[0], (outs[1] if topk_weights is not None else None), FakeEvent(self.log)


@pytest.fixture
def fake_deep_ep(monkeypatch):
    mod = types.ModuleType("deep_ep")
    mod.__spec__ = importlib.machinery.ModuleSpec("deep_ep", None)
    mod.Buffer = FakeBuffer
    monkeypatch.setitem(sys.modules, "deep_ep", mod)
    FakeBuffer.made = []
    return mod


# ---------------------------------------------------------------------------- inputs and the reference
def _inputs(rank: int, ep: int):
    """Per-rank tokens with uneven routing: rank 1 sends nothing to rank 0, rank 0 piles on expert 0."""
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(N, D, dtype=torch.float64, generator=g)
    w = torch.rand(N, K, generator=g).double()  # FP32 values: DeepEP carries gate weights as FP32
    per = E // ep
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    if rank == 1:
        idx = per + torch.stack([torch.randperm(E - per, generator=g)[:K] for _ in range(N)])
    if rank == 0:
        idx[:, 0] = 0
    probe = torch.randn(N, D, dtype=torch.float64, generator=g)
    return x, idx, w, probe


def _mats():
    return torch.randn(E, D, D, dtype=torch.float64, generator=torch.Generator().manual_seed(7))


def _experts(recv, counts, weights, mats):
    """Per-expert linear maps of the expert-sorted rows, scaled by their gate values (as the Experts module)."""
    return torch.cat([r @ m.T for r, m in zip(recv.split(counts.tolist()), mats)]) * weights


def _reference(ep: int):
    """One process, LocalDispatcher, all ranks' tokens concatenated in rank order."""
    xs, idxs, ws, probes = zip(*(_inputs(r, ep) for r in range(ep)))
    x = torch.cat(xs).requires_grad_(True)
    w = torch.cat(ws).requires_grad_(True)
    mats = _mats().requires_grad_(True)
    disp = LocalDispatcher(E)
    recv, counts, h = disp.dispatch(x, torch.cat(idxs), w)
    out = disp.combine(_experts(recv, counts, h.recv_weights, mats), h)
    (out * torch.cat(probes)).sum().backward()
    return dict(
        out=out.detach().split(N),
        gx=x.grad.split(N),
        gw=w.grad.split(N),
        gm=mats.grad,
        recv=recv.detach(),
        counts=counts,
        idx=torch.cat(idxs),
    )


def _rank(rank, world, mode, results):
    from dsv3.parallel.deepep import DeepEPBuffer, DeepEPDispatcher

    try:
        ep = world.ep
        x, idx, w, probe = _inputs(rank, ep)
        x.requires_grad_(True)
        w.requires_grad_(True)
        per = E // ep
        mats = _mats()[rank * per : (rank + 1) * per].clone().requires_grad_(True)
        disp = DeepEPDispatcher(
            FakeGroup(world, rank), ep, rank, E, buffer=DeepEPBuffer(FakeGroup(world, rank)), ranks_per_node=2
        )
        if mode == "halves":  # start, other work, wait
            pending = disp.dispatch_start(x, idx, w)
            other = (x * 2).sum()
            recv, counts, h = disp.dispatch_wait(pending)
            pc = disp.combine_start(_experts(recv, counts, h.recv_weights, mats), h)
            out = disp.combine_wait(pc) + 0 * other
            (out * probe).sum().backward()
        elif mode == "cut":  # the FB overlap's cut MoE layer: leaves at the exchanges, gradients sent back by hand
            ran = []
            p = disp.dispatch_start(x, idx, w, meanwhile=lambda: ran.append(True))
            recv, counts, h = disp.dispatch_wait(p, cut=True)
            pc = disp.combine_start(_experts(recv, counts, h.recv_weights, mats), h)
            out = disp.combine_wait(pc, cut=True)
            torch.autograd.backward([out], [probe])
            torch.autograd.backward([pc.z], [disp.combine_backward_wait(disp.combine_backward_start(pc))])
            g_x, g_meta = disp.dispatch_backward_wait(disp.dispatch_backward_start(p))
            torch.autograd.backward([p.send_x, p.meta], [g_x, g_meta])
            assert ran == [True]
        else:
            recv, counts, h = disp.dispatch(x, idx, w)
            out = disp.combine(_experts(recv, counts, h.recv_weights, mats), h)
            (out * probe).sum().backward()
        results[rank] = dict(
            out=out.detach(),
            gx=x.grad,
            gw=w.grad,
            gm=mats.grad,
            recv=recv.detach(),
            counts=counts,
            stats=disp.stats,
            log=disp.buffer.buffer.log,
            rows=h.n_recv,
        )
    except BaseException as exc:  # noqa: BLE001 - the main thread reports it
        results[rank] = exc
        world.barrier.abort()


def _run(ep: int, mode: str = "whole") -> list:
    world = FakeWorld(ep)
    results: list = [None] * ep
    threads = [threading.Thread(target=_rank, args=(r, world, mode, results), daemon=True) for r in range(ep)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


# ---------------------------------------------------------------------------- tests
@pytest.mark.timeout(60)
@pytest.mark.parametrize("ep", [1, 2, 4])
@pytest.mark.parametrize("mode", ["whole", "halves", "cut"])
def test_deepep_adapter_equals_local_dispatcher(fake_deep_ep, ep, mode):
    got, ref = _run(ep, mode), _reference(ep)
    per = E // ep
    for r in range(ep):
        g = got[r]
        torch.testing.assert_close(g["out"], ref["out"][r], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g["gx"], ref["gx"][r], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g["gw"], ref["gw"][r], rtol=1e-6, atol=1e-7)  # rounded to FP32 on the way
        torch.testing.assert_close(g["gm"], ref["gm"][r * per : (r + 1) * per], rtol=1e-12, atol=1e-12)
        # the received rows: LocalDispatcher's rows of this rank's experts, in the same order
        lo, hi = ref["counts"][: r * per].sum(), ref["counts"][: (r + 1) * per].sum()
        assert torch.equal(g["counts"], ref["counts"][r * per : (r + 1) * per])
        assert torch.equal(g["recv"], ref["recv"][lo:hi])
        # a token travels once to each rank it needs: received rows = distinct (token, rank) pairs
        dest = ref["idx"] // per
        assert g["rows"] == sum(int((dest.view(ep, N, K)[s] == r).any(dim=1).sum()) for s in range(ep))
    # forward asynchronous (start/wait); backward synchronous, or asynchronous when cut; every event waited for
    log, cut = got[0]["log"], mode == "cut"
    assert [e for e in log if e != "wait"] == [
        ("dispatch", True, False),
        ("combine", True),
        ("dispatch", cut, True),
        ("combine", cut),
    ]
    assert log.count("wait") == (4 if cut else 2)


@pytest.mark.timeout(60)
def test_deepep_stats_count_what_crosses_ranks(fake_deep_ep):
    got = _run(2)
    _, idx, _, _ = _inputs(0, 2)
    dest = idx // (E // 2)
    to_other = int((dest == 1).any(dim=1).sum())
    s = got[0]["stats"]
    assert s.tokens == N and s.ranks_reached == int((dest == 0).any(dim=1).sum()) + to_other
    assert s.nodes_reached == N  # ranks_per_node=2: both ranks are one node
    from_other = got[0]["rows"] - int((dest == 0).any(dim=1).sum())
    assert s.bytes_sent == (to_other + from_other) * D * 8  # dispatch out, combine back (float64 rows)


def test_buffer_is_shared_and_grows_only_when_needed(fake_deep_ep):
    from dsv3.parallel.deepep import DeepEPBuffer

    shared = DeepEPBuffer(FakeGroup(FakeWorld(2), 0))
    a = shared.get(torch.zeros(3, 64))
    assert shared.get(torch.zeros(5, 32)) is a and a.num_nvl_bytes == 64 * 4 * 2  # hidden bytes x ranks
    assert shared.get(torch.zeros(5, 128)) is not a and len(FakeBuffer.made) == 2


def test_expand_to_local_experts_sorts_rows_by_expert_then_row():
    from dsv3.model.exchange import expand_to_local_experts

    local = torch.tensor([[1, -1, 0], [-1, -1, -1], [0, 2, -1], [2, 0, 1]])
    token, pos, counts = expand_to_local_experts(local, 3)
    assert token.tolist() == [0, 2, 3, 0, 3, 2, 3] and counts.tolist() == [3, 2, 2]
    assert pos.tolist() == [2, 6, 10, 0, 11, 7, 9]


def test_deepep_refuses_without_the_package_or_cuda_and_fp8(monkeypatch, fake_deep_ep):
    from dsv3.parallel.deepep import DeepEPDispatcher, check_deepep
    from dsv3.parallel.dispatch import resolve_backend

    with pytest.raises(ConfigError, match="runs on CUDA GPUs only"):
        check_deepep("cpu")
    with pytest.raises(ConfigError, match="runs on CUDA GPUs only"):
        resolve_backend("deepep", 2, torch.device("cpu"))
    with pytest.raises(ConfigError, match="FP8"):
        DeepEPDispatcher(None, 2, 0, E, buffer=object(), fp8=True)
    monkeypatch.delitem(sys.modules, "deep_ep")
    if importlib.util.find_spec("deep_ep") is None:
        with pytest.raises(ConfigError, match="needs the deep_ep package"):
            check_deepep("cuda")
    assert resolve_backend("auto", 2, torch.device("cpu")) == "alltoall"


def test_shard_experts_gives_every_layer_a_deepep_dispatcher_on_one_buffer(monkeypatch, fake_deep_ep):
    """The wiring in shard_experts (CUDA check bypassed): one shared buffer, this rank's expert block."""
    from helpers import small_config

    from dsv3.model.transformer import DeepseekV3ForCausalLM
    from dsv3.parallel import deepep, dispatch
    from dsv3.parallel.dispatch import shard_experts

    monkeypatch.setattr(dispatch, "check_deepep", lambda device: None)
    model = DeepseekV3ForCausalLM(small_config(num_hidden_layers=3))
    ctx = types.SimpleNamespace(
        ep=2,
        ep_rank=1,
        ep_group=FakeGroup(FakeWorld(2), 1),
        device=torch.device("cpu"),
        ranks_per_node=2,
        expert_block=lambda n: (n // 2, n),
    )
    shard_experts(model, ctx, dispatcher="deepep")
    disps = [m.dispatcher for m in model.moe_layers()]
    assert len(disps) == 3 and all(isinstance(d, deepep.DeepEPDispatcher) for d in disps)  # 2 layers + MTP's
    assert all(d.buffer is disps[0].buffer for d in disps) and disps[0].n_local == 4
    assert all(m.experts.expert_offset == 4 and m.experts.gate_up_proj.shape[0] == 4 for m in model.moe_layers())


def test_train_with_deepep_on_cpu_is_one_line_and_writes_nothing(train_setup, tmp_path, capsys):
    run = tmp_path / "run"
    opts = quick_options(train_setup, run, steps=1)
    argv = ["train"] + [a for k, v in opts.items() for a in ("--" + k.replace("_", "-"), str(v))]
    code, _, err = cli(argv + ["--dispatcher", "deepep"], capsys)
    line = assert_one_error(code, err, "--dispatcher deepep")
    assert ("deep_ep package" in line) or ("CUDA" in line)
    assert not run.exists()
