"""Pictures of a training run from ``RUN_DIR/metrics.jsonl`` (matplotlib, Agg, no pyplot state).

* ``loss.png``: training loss, LM loss, MTP loss and validation loss against the step.
* ``expert_load.png``: for each MoE layer, a heatmap of expert load over training,
  experts down, logged steps across, each expert's token count divided by the mean
  count of its layer at that step (1 = perfectly balanced; the colour scale is
  centred on 1). Written when the run logged ``expert_load``. A line may carry
  ``expert_load_layers`` (the model layer index of each row) for the panel titles.

Files are written atomically.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dsv3.errors import DataError
from dsv3.train.metrics import METRICS_FILE, read_metrics
from dsv3.utils.io import atomic_path
from dsv3.utils.outputs import PNG_METADATA, check_output_dir, check_output_file, is_dsv3_png

__all__ = ["plot_run", "plot_losses", "plot_expert_load", "step_edges"]

# (field, label, style) of the loss curves, in drawing order.
_LOSS_CURVES = (
    ("loss", "train loss", {"lw": 1.2}),
    ("lm_loss", "LM loss", {"lw": 1.0, "alpha": 0.85}),
    ("mtp_loss", "MTP loss", {"lw": 1.0, "alpha": 0.85}),
    ("val_loss", "validation loss", {"lw": 1.5, "marker": "o", "ms": 3}),
)


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            steps.append(record["step"])
            values.append(float(value))
    return steps, values


def _new_figure(width: float, height: float, layout: str | None = "constrained"):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path, dpi: int) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata=PNG_METADATA, dpi=dpi)
    return path


def plot_losses(
    records: Sequence[dict[str, Any]], path: str | os.PathLike, *, log_y: bool = False, title: str | None = None
) -> Path | None:
    """Write the loss curves to ``path``; ``None`` (nothing written) when no record has a loss."""
    curves = [(label, style, *_series(records, key)) for key, label, style in _LOSS_CURVES]
    curves = [c for c in curves if c[2]]
    if not curves:
        return None
    fig = _new_figure(8.0, 4.8)
    ax = fig.add_subplot()
    for label, style, steps, values in curves:
        ax.plot(steps, values, label=label, **style)
    if log_y and all(v > 0 for *_, values in curves for v in values):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return _save(fig, Path(path), dpi=110)


def _load_matrix(records: Sequence[dict[str, Any]]) -> tuple[list[int], list[list[list[float]]], list[str]]:
    """Steps with an ``expert_load``, loads as [layer][expert][column] normalised by the layer mean, titles."""
    steps, snapshots, layer_ids = [], [], None
    for record in records:
        load = record.get("expert_load")
        if load is None:
            continue
        if not isinstance(load, list) or not load:
            raise DataError(
                f"step {record['step']} has a malformed expert_load; it must be a list of per-layer lists of counts"
            )
        if all(isinstance(x, (int, float)) for x in load):
            load = [load]  # one MoE layer logged as a flat list
        if not all(isinstance(row, list) and row and all(isinstance(x, (int, float)) for x in row) for row in load):
            raise DataError(
                f"step {record['step']} has a malformed expert_load; it must be a list of per-layer lists of counts"
            )
        if snapshots and [len(r) for r in load] != [len(r) for r in snapshots[0]]:
            raise DataError(
                f"expert_load at step {record['step']} has a different shape from earlier steps; plot one run at a time"
            )
        steps.append(record["step"])
        snapshots.append(load)
        if layer_ids is None and isinstance(record.get("expert_load_layers"), list):
            layer_ids = record["expert_load_layers"]
    if not snapshots:
        return [], [], []
    n_layers = len(snapshots[0])
    matrix = []
    for layer in range(n_layers):
        n_experts = len(snapshots[0][layer])
        grid = [[math.nan] * len(snapshots) for _ in range(n_experts)]
        for col, snap in enumerate(snapshots):
            row = snap[layer]
            mean = sum(row) / len(row)
            for e, x in enumerate(row):
                grid[e][col] = x / mean if mean > 0 else math.nan
        matrix.append(grid)
    if layer_ids is not None and len(layer_ids) == n_layers:
        titles = [f"layer {i}" for i in layer_ids]
    else:
        titles = [f"MoE layer {i}" for i in range(n_layers)]
    return steps, matrix, titles


def step_edges(steps: Sequence[int]) -> list[float]:
    """Column edges for logged ``steps``: halfway between neighbours, never below step 0.

    Column c covers the steps from halfway to the previous logged step to halfway to the
    next one; the first column starts at ``max(0, s_0 - gap / 2)`` (a short run that logs
    steps 1 and 10 has no negative steps), the last ends half a gap after ``s_-1``.
    """
    if len(steps) == 1:
        return [max(0.0, steps[0] - 0.5), steps[0] + 0.5]
    mids = [(a + b) / 2 for a, b in zip(steps, steps[1:])]
    first = max(0.0, steps[0] - (steps[1] - steps[0]) / 2)
    last = steps[-1] + (steps[-1] - steps[-2]) / 2
    return [first, *mids, last]


def plot_expert_load(records: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path | None:
    """Write the per-layer expert-load heatmaps to ``path``; ``None`` when no record has ``expert_load``."""
    steps, matrix, titles = _load_matrix(records)
    if not steps:
        return None
    from matplotlib.colors import TwoSlopeNorm

    n_layers = len(matrix)
    ncols = min(n_layers, 4)
    nrows = math.ceil(n_layers / ncols)
    # Fixed margins in inches (a constrained layout of 60 panels takes seconds to solve).
    width, height = 3.4 * ncols + 1.6, 2.3 * nrows + 0.9
    fig = _new_figure(width, height, layout=None)
    left_in, right_in, top_in, bottom_in = 0.7, 1.1, 0.55, 0.5
    axes = fig.subplots(
        nrows,
        ncols,
        squeeze=False,
        sharex=True,
        gridspec_kw={
            "left": left_in / width,
            "right": 1 - right_in / width,
            "top": 1 - top_in / height,
            "bottom": bottom_in / height,
            "wspace": 0.18,
            "hspace": 0.45,
        },
    )
    finite = [x for grid in matrix for row in grid for x in row if math.isfinite(x)]
    vmax = max(2.0, max(finite, default=2.0))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax)
    image = None
    edges = step_edges(steps)
    for index, ax in enumerate(axes.flat):
        if index >= n_layers:
            ax.set_visible(False)
            continue
        grid = matrix[index]
        image = ax.pcolormesh(
            edges, [r - 0.5 for r in range(len(grid) + 1)], grid, cmap="RdBu_r", norm=norm, shading="flat"
        )
        ax.set_xlim(edges[0], edges[-1])
        ax.set_ylim(len(grid) - 0.5, -0.5)  # expert 0 at the top
        ax.set_title(titles[index], fontsize=9)
        if index % ncols == 0:
            ax.set_ylabel("expert")
        if index + ncols >= n_layers:  # lowest panel of its column: show the step axis
            ax.set_xlabel("step")
            ax.xaxis.set_tick_params(labelbottom=True)
        ax.tick_params(labelsize=7)
    bar_in = min(height - top_in - bottom_in, 5.0)  # colour bar at the top right, at most 5 inches tall
    cax = fig.add_axes((1 - (right_in - 0.25) / width, 1 - (top_in + bar_in) / height, 0.15 / width, bar_in / height))
    fig.colorbar(image, cax=cax, label="load / mean load of the layer")
    fig.suptitle("Expert load per MoE layer (1 = balanced)", y=1 - 0.08 / height, va="top")
    dpi = 100 if n_layers <= 16 else 72
    return _save(fig, Path(path), dpi=dpi)


#: The files :func:`plot_run` writes.
PLOT_FILES = ("loss.png", "expert_load.png")


def _only_own_plots(directory: str) -> bool:
    """Whether ``directory`` holds nothing but plots dsv3 drew (an earlier ``--out``)."""
    return all(name in PLOT_FILES and is_dsv3_png(os.path.join(directory, name)) for name in os.listdir(directory))


def plot_run(
    run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, log_y: bool = False
) -> list[Path]:
    """Write ``loss.png`` and (when loads were logged) ``expert_load.png`` for a run.

    Args:
        run_dir: the run directory holding ``metrics.jsonl``.
        out_dir: where to write (default ``run_dir``); created if missing. Another directory must be new,
            empty or hold only earlier plots (:mod:`dsv3.utils.outputs`); a PNG there is replaced only
            when dsv3 drew it.
        log_y: logarithmic loss axis.

    Returns:
        The paths written.

    Raises:
        RunDirError: no run directory or no ``metrics.jsonl`` in it.
        DataError: the file holds no records, or none with a loss or an expert load.
        OutputError: ``out_dir`` would replace something dsv3 did not write.
    """
    records = read_metrics(run_dir)
    if not records:
        raise DataError(f"{Path(run_dir) / METRICS_FILE} holds no records yet; plot after the run has logged a step")
    out = Path(run_dir) if out_dir is None else Path(out_dir)
    check_output_dir(str(out), "--out", is_own_dir=_only_own_plots, what="the plots", allow=[run_dir])
    for name in PLOT_FILES:
        check_output_file(str(out / name), "--out", is_own=is_dsv3_png, what="a PNG that dsv3 drew")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in (
        plot_losses(records, out / "loss.png", log_y=log_y, title=Path(run_dir).resolve().name),
        plot_expert_load(records, out / "expert_load.png"),
    ):
        if path is not None:
            written.append(path)
    if not written:
        raise DataError(
            f"{Path(run_dir) / METRICS_FILE} has no loss or expert_load values to plot; check that it comes from dsv3 train"
        )
    return written
