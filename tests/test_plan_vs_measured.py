"""The planner against what the real model and optimizer allocate (bench/plan_vs_measured.py, tiny preset).

Weights, gradients and optimizer states must be equal to the byte; the activations autograd saves for
backward (each storage once) within 10 %. Recompute policies other than ``none`` are checked once the
trainer has them.
"""

import importlib.util
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

_BENCH = Path(__file__).resolve().parents[1] / "bench" / "plan_vs_measured.py"
_spec = importlib.util.spec_from_file_location("plan_vs_measured", _BENCH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.parametrize("dtype,moments", [("fp32", "fp32"), ("bf16", "bf16")])
def test_planner_matches_the_tiny_model(dtype, moments):
    r = bench.measure("tiny", seq_len=64, micro_batch=2, dtype=dtype, moments=moments)
    for item in ("weights", "grads", "optimizer"):
        assert r["planned"][item] == r["measured"][item], item
    assert r["ratio"]["activations"] == pytest.approx(1.0, abs=0.10)


@pytest.mark.parametrize("policy", ["selective", "full"])
def test_planner_matches_recompute_policies(policy):
    if not bench.recompute_available():
        pytest.skip("dsv3.memory.recompute (the trainer's recompute policies) is not in this tree yet")
    r = bench.measure("tiny", seq_len=64, micro_batch=2, recompute=policy)
    assert r["ratio"]["activations"] == pytest.approx(1.0, abs=0.10)
