"""CPU EMA: closed form against FP64, asynchronous updates, checkpoint round trip, weight swapping."""

import gc
import io
import threading

import pytest
import torch
from torch import nn

from dsv3.errors import CheckpointError, ConfigError
from dsv3.memory.ema import CPUEMA


def make_model(seed=0, device="cpu"):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3, bias=False))
    model.register_parameter("low", nn.Parameter(torch.randn(4, 2).to(torch.bfloat16)))  # a non-FP32 parameter
    return model.to(device)


def perturb(model, gen):
    """An in-place 'optimizer step': every parameter moves."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.device, p.dtype) * 0.5)


def snapshot(model):
    return {n: p.detach().to("cpu", torch.float64).clone() for n, p in model.named_parameters()}


def ema_recursion(history, decays):
    """FP64 EMA of the recorded parameter history: ema_0 = theta_0, ema_k = b_k ema_{k-1} + (1 - b_k) theta_k."""
    ema = {n: t.clone() for n, t in history[0].items()}
    for theta, beta in zip(history[1:], decays):
        for n in ema:
            ema[n] = beta * ema[n] + (1 - beta) * theta[n]
    return ema


def closed_form(history, beta):
    """beta^k theta_0 + (1 - beta) sum_j beta^(k-j) theta_j, written out."""
    k = len(history) - 1
    return {
        n: beta**k * history[0][n] + sum((1 - beta) * beta ** (k - j) * history[j][n] for j in range(1, k + 1))
        for n in history[0]
    }


def assert_ema_equals(ema, expected):
    shadow = ema.shadow()
    assert set(shadow) == set(expected)
    for name, value in shadow.items():
        assert value.dtype == torch.float32 and value.device.type == "cpu"
        torch.testing.assert_close(value.double(), expected[name], rtol=1e-6, atol=1e-6, msg=name)


def test_ema_after_k_steps_matches_closed_form():
    model, gen, beta = make_model(), torch.Generator().manual_seed(1), 0.9
    with CPUEMA(model, beta) as ema:
        history = [snapshot(model)]
        for _ in range(25):
            perturb(model, gen)
            history.append(snapshot(model))
            ema.update()
        ema.wait()
        assert ema.num_updates == 25
        expected = ema_recursion(history, [beta] * 25)
        closed = closed_form(history, beta)
        for n in expected:  # the two FP64 references agree with each other
            torch.testing.assert_close(expected[n], closed[n], rtol=1e-12, atol=1e-12)
        assert_ema_equals(ema, expected)


def test_per_update_decay_override():
    model, gen = make_model(), torch.Generator().manual_seed(2)
    decays = [0.0, 0.5, 0.99, 0.9]
    with CPUEMA(model, 0.9) as ema:
        history = [snapshot(model)]
        for beta in decays:
            perturb(model, gen)
            history.append(snapshot(model))
            ema.update(decay=beta)
        assert_ema_equals(ema, ema_recursion(history, decays))


def test_update_does_not_wait_for_a_busy_worker():
    model, gen, beta = make_model(), torch.Generator().manual_seed(3), 0.8
    gate, busy = threading.Event(), threading.Event()

    def slow_worker():
        busy.set()
        gate.wait()

    ema = CPUEMA(model, beta)
    ema._shared.before_apply = slow_worker  # test hook: the worker stalls before each update
    try:
        history = [snapshot(model)]
        perturb(model, gen)
        history.append(snapshot(model))
        ema.update()  # 1: staged in buffer 0
        assert busy.wait(timeout=60)  # the worker is now stuck on update 1
        perturb(model, gen)
        history.append(snapshot(model))
        ema.update()  # 2: returns although the worker is busy (buffer 1 free)
        assert not gate.is_set() and not ema._slots[0].free.is_set()
        perturb(model, gen)  # moving the weights after update() does not change what it staged
        history.append(snapshot(model))

        third = threading.Thread(target=ema.update)  # 3: needs buffer 0, which update 1 still holds
        third.start()
        third.join(timeout=0.3)
        assert third.is_alive()  # blocked until the worker frees buffer 0
        gate.set()
        third.join(timeout=60)
        assert not third.is_alive()
        ema.wait()
        assert ema.num_updates == 3
        assert_ema_equals(ema, ema_recursion(history, [beta] * 3))
    finally:
        gate.set()
        ema.close()


def test_worker_errors_are_raised_in_the_caller():
    model = make_model()
    ema = CPUEMA(model, 0.9)

    def boom():
        raise ArithmeticError("injected failure")

    ema._shared.before_apply = boom
    ema.update()
    with pytest.raises(ArithmeticError, match="injected failure"):
        ema.wait()
    with pytest.raises(ArithmeticError):
        ema.update()
    ema.close()
    with pytest.raises(RuntimeError, match="closed"):
        ema.update()


def test_state_dict_round_trip_continues_identically():
    gen_a, gen_b = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    model = make_model()
    ema = CPUEMA(model, 0.95)
    for _ in range(5):
        perturb(model, gen_a)
        ema.update()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "ema": ema.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    resumed_model = make_model(seed=9)
    resumed_model.load_state_dict(saved["model"])
    resumed = CPUEMA(resumed_model, 0.95)
    resumed.load_state_dict(saved["ema"])
    assert resumed.num_updates == 5
    for _ in range(5):  # advance gen_b to where gen_a was at the checkpoint
        perturb(make_model(), gen_b)
    for _ in range(4):
        perturb(model, gen_a)
        ema.update()
        perturb(resumed_model, gen_b)
        resumed.update()
    for name, value in ema.shadow().items():
        assert torch.equal(value, resumed.shadow()[name]), name
    assert resumed.num_updates == ema.num_updates == 9
    ema.close()
    resumed.close()


def test_load_state_dict_rejects_other_models():
    ema = CPUEMA(make_model(), 0.9)
    state = {k: v for k, v in ema.state_dict().items()}
    state["shadow"] = {k: v.clone() for k, v in state["shadow"].items()}
    wrong_shape = dict(state, shadow=dict(state["shadow"], low=torch.zeros(3)))
    missing = dict(state, shadow={k: v for k, v in state["shadow"].items() if k != "low"})
    extra = dict(state, shadow=dict(state["shadow"], extra=torch.zeros(1)))
    for bad in (wrong_shape, missing, extra, {"decay": 0.9}):
        with pytest.raises(CheckpointError) as info:
            ema.load_state_dict(bad)
        assert "\n" not in str(info.value)
    ema.close()


def test_applied_swaps_in_ema_and_restores_training_weights_exactly():
    model, gen = make_model(), torch.Generator().manual_seed(5)
    ema = CPUEMA(model, 0.5)
    for _ in range(3):
        perturb(model, gen)
        ema.update()
    training = {n: p.detach().clone() for n, p in model.named_parameters()}
    shadow = {n: t.clone() for n, t in ema.shadow().items()}
    with ema.applied():
        for n, p in model.named_parameters():
            assert torch.equal(p, shadow[n].to(p.dtype)), n
            assert not torch.equal(p, training[n]), n
        with pytest.raises(RuntimeError):
            ema.update()
    for n, p in model.named_parameters():
        assert torch.equal(p, training[n]), n
    with pytest.raises(KeyError):  # restored on errors too
        with ema.applied(model):
            raise KeyError("validation failed")
    for n, p in model.named_parameters():
        assert torch.equal(p, training[n]), n

    other = make_model(seed=7)  # copy_to another instance (e.g. the generation model)
    ema.copy_to(other)
    for n, p in other.named_parameters():
        assert torch.equal(p, shadow[n].to(p.dtype)), n
    with pytest.raises(ValueError):
        ema.copy_to(nn.Linear(2, 2))
    ema.close()


def test_nbytes_counts_shadows_and_two_staging_buffers():
    model = make_model()
    ema = CPUEMA(model, 0.9)
    numel = sum(p.numel() for p in model.parameters())
    staging = sum(p.numel() * p.element_size() for p in model.parameters())
    assert ema.nbytes() == 4 * numel + 2 * staging
    assert not ema.pinned  # CPU parameters: nothing to pin
    ema.close()


def test_worker_thread_stops_on_close_and_on_garbage_collection():
    ema = CPUEMA(make_model(), 0.9)
    thread = ema._thread
    assert thread.daemon and thread.is_alive()
    ema.close()
    ema.close()  # idempotent
    thread.join(timeout=60)
    assert not thread.is_alive()

    ema = CPUEMA(make_model(), 0.9)
    ema.update()
    thread = ema._thread
    del ema
    gc.collect()
    thread.join(timeout=60)
    assert not thread.is_alive()


@pytest.mark.parametrize("decay", [1.0, -0.1, float("nan"), "0.9"])
def test_bad_decay_is_a_config_error(decay):
    with pytest.raises(ConfigError):
        CPUEMA(make_model(), decay)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_parameters_use_pinned_staging_and_match_closed_form():
    model, gen, beta = make_model(device="cuda"), torch.Generator().manual_seed(6), 0.9
    with CPUEMA(model, beta) as ema:
        assert ema.pinned and all(b.is_pinned() for b in ema._slots[0].buffers)
        history = [snapshot(model)]
        for _ in range(20):
            perturb(model, gen)  # queued on the stream right after the asynchronous copy
            history.append(snapshot(model))
            ema.update()
        assert_ema_equals(ema, ema_recursion(history, [beta] * 20))
        training = {n: p.detach().clone() for n, p in model.named_parameters()}
        with ema.applied():
            pass
        for n, p in model.named_parameters():
            assert torch.equal(p, training[n]), n
