"""Robustness, class 8: small truths a user reads (logits with labels, run directories as checkpoints,
the expert-load plot's step axis). The progress-line labels are checked in test_robust_input."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import small_config

import dsv3
from dsv3.checkpoint.state import save_checkpoint
from dsv3.errors import CheckpointError
from dsv3.train import plots


def _model(seed):
    from dsv3.model import DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    return DeepseekV3ForCausalLM(small_config(vocab_size=64)).eval()


def test_model_with_labels_returns_logits_when_asked():
    model = _model(0)
    ids = torch.randint(0, 64, (2, 12))
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    with torch.no_grad():
        plain = model(ids)
        out = model(ids, labels, return_logits=True)
        default = model(ids, labels)
    assert default.logits is None  # the default with labels: no [B, T, V] logits kept (documented)
    torch.testing.assert_close(out.logits, plain.logits)
    # the LM loss is the cross-entropy of exactly these logits (float64 reference)
    logits = out.logits.double().reshape(-1, 64)
    target = labels.reshape(-1)
    keep = target != -100
    reference = torch.nn.functional.cross_entropy(logits[keep], target[keep])
    assert abs(float(out.lm_loss) - float(reference)) < 1e-5


def test_from_pretrained_accepts_a_run_directory(tmp_path):
    run = tmp_path / "run"
    first, second = _model(1), _model(2)
    save_checkpoint(str(run), 1, model=first)
    save_checkpoint(str(run), 3, model=second)
    loaded = dsv3.from_pretrained(run)  # the run directory: its latest checkpoint
    reference = second.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in loaded.state_dict().items())
    os.remove(run / "checkpoints" / "step-0000003" / "model.safetensors")  # damaged: the one before is used
    loaded = dsv3.from_pretrained(run)
    reference = first.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        dsv3.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "steps,edges",
    [
        ([1, 10], [0.0, 5.5, 14.5]),
        ([1], [0.5, 1.5]),
        ([10, 20, 30], [5.0, 15.0, 25.0, 35.0]),
        ([2, 3], [1.5, 2.5, 3.5]),
    ],
)
def test_step_edges_never_go_below_zero(steps, edges):
    assert plots.step_edges(steps) == edges


def test_expert_load_plot_of_a_short_run_has_no_negative_steps(tmp_path, monkeypatch):
    figures = []
    real_save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path, **kw: (figures.append(fig), real_save(fig, path, **kw))[1])
    records = [
        {"step": 1, "expert_load": [[3, 1, 2, 2], [1, 1, 4, 2]]},
        {"step": 10, "expert_load": [[2, 2, 2, 2], [4, 1, 1, 2]]},
    ]
    path = plots.plot_expert_load(records, tmp_path / "expert_load.png")
    assert path is not None and path.is_file()
    panels = [ax for ax in figures[0].axes if ax.get_visible() and ax.get_xlabel() == "step"]
    assert panels
    for ax in panels:
        low, high = ax.get_xlim()
        assert low >= 0 and high >= 10
        assert all(t >= 0 for t in ax.get_xticks() if low <= t <= high)
