"""``make gpu-check`` (bench/gpu_check.py) cannot rot: its CPU dry run exercises every part with tiny
shapes, and without CUDA every part says it was skipped.

The dry run's numbers are checked where they mean something on a CPU: the emulated FP8 GEMM and the FP8
Linear against float64 products of the same operands, the table's rows for all five parts.
"""

import json
import re
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

_BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(_BENCH))
import gpu_check  # noqa: E402

PARTS = ("FP8 GEMM", "FP8 Linear", "training step", "prefetcher", "speculative decoding")


def _errors(value: str) -> list[float]:
    return [float(x) for x in re.search(r"rel err[^0-9]*([0-9e.+\-/]+)", value).group(1).split("/")]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dry_run_runs_every_part(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert gpu_check.main(["--dry-run", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["part"] for r in rows} == set(PARTS)
    assert not [r for r in rows if r["what"] == "skipped"]
    gemm = [r for r in rows if r["part"] == "FP8 GEMM"]
    assert gemm and all(_errors(r["value"])[0] < 1e-5 for r in gemm)  # emulation = float64 product, FP32 sums
    linear = {r["what"].split()[-1]: r["value"] for r in rows if r["part"] == "FP8 Linear" and "rel err" in r["value"]}
    assert max(_errors(linear["bf16"])) < 1e-2  # BF16 rounding of y, dx, dW
    assert 1e-3 < max(_errors(linear["fp8"])) < 0.1  # E4M3 operands: a few percent, not exact
    printed = capsys.readouterr().out
    assert "| part | what | result |" in printed and printed.count("| training step |") == 4


def test_without_cuda_every_part_skips(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    printed = capsys.readouterr().out
    for part in ("FP8 GEMM", "FP8 Linear", "training step", "prefetcher", "speculative decoding"):
        assert f"[gpu-check] {part}: skipped (" in printed
    assert "| FP8 GEMM | skipped | needs a Hopper (SM90) GPU with CUDA >= 12.9 |" in printed
