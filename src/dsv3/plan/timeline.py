"""Draw a simulated pipeline step as a per-device timeline PNG (matplotlib, Agg, imported lazily).

One row per device (device 0 on top), one box per compute op coloured by kind
(F, B input-backward, W weight-backward, BW full backward, F&B overlapped pair
drawn as a forward half over a backward half), with the micro-batch number in
the box. Ops of a device's second chunk (DualPipe's reverse direction,
DualPipeV's way back up) are drawn darker.
"""

from __future__ import annotations

import os

from dsv3.plan.limits import check_plot
from dsv3.schedules import BW, FB, B, F, W
from dsv3.utils.io import atomic_path
from dsv3.utils.outputs import PNG_METADATA

# (chunk 0 colour, chunk 1 colour) per op kind.
COLOURS = {
    F: ("#8ecae6", "#3b8bbd"),
    B: ("#b7e4a7", "#5aa845"),
    W: ("#ffd6a5", "#e6953d"),
    BW: ("#cdb4db", "#8e6bb0"),
}
NAMES = {
    F: "F forward",
    B: "B backward (inputs)",
    W: "W backward (weights)",
    BW: "B full backward",
    FB: "F&B overlapped pair",
}


def plot_timeline(result, path: str | os.PathLike, title: str | None = None) -> str:
    """Write ``result``'s timeline (a :class:`~dsv3.plan.simulate.SimResult`) to a PNG at ``path``.

    Returns the path written. The file is written atomically.
    """
    return plot_timelines([(result, title)], path)


def plot_timelines(panels: list, path: str | os.PathLike) -> str:
    """Write several timelines, one panel each (top to bottom), on one shared time axis to a PNG at ``path``.

    ``panels``: ``(result, title or None)`` pairs, e.g. a measured step (:func:`dsv3.plan.trace.measured_step`)
    above its simulation. Returns the path written. The file is written atomically.
    """
    for result, _ in panels:
        check_plot(result.devices, result.pp, result.microbatches)  # bounded figure size and patch count
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    span = max((r.makespan for r, _ in panels), default=0.0) or 1.0
    most_ops = max((len(row) for r, _ in panels for row in r.timeline), default=1)
    width = min(60.0, max(8.0, 2.0 + 0.28 * most_ops))
    bottom, top, gap = 1.0, 0.5, 0.9  # inches: axis label and legend; first title; axis label and title between
    rows = [max(len(r.timeline), 1) for r, _ in panels]
    height = bottom + top + gap * (len(panels) - 1) + 0.6 * sum(rows)
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    left, right = 0.9, 0.3  # inches for the device labels, and a margin
    kinds_seen: set = set()
    y_top = height - top
    for (result, title), n in zip(panels, rows):
        h = 0.6 * n
        ax = fig.add_axes((left / width, (y_top - h) / height, 1 - (left + right) / width, h / height))
        _draw(ax, result, title, span, width - left - right, kinds_seen)
        y_top -= h + gap
    order = [F, B, W, BW, FB]
    handles = [
        Patch(
            facecolor=COLOURS[k][0] if k != FB else "white",
            edgecolor="black",
            label=NAMES[k],
            hatch="" if k != FB else "//",
        )
        for k in order
        if k in kinds_seen
    ]
    fig.legend(
        handles=handles,
        loc="lower center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=max(len(handles), 1),
        fontsize=8,
        frameon=False,
    )
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata=PNG_METADATA)
    return os.fspath(path)


def _draw(ax, result, title: str | None, span: float, axes_inches: float, kinds_seen: set) -> None:
    """One panel: a row per device (device 0 on top), a box per compute op, time 0 .. ``span``."""
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    rows = result.timeline
    boxes: list = []  # drawn as one collection: thousands of separate patches take minutes

    def box(x0: float, x1: float, y0: float, h: float, colour: str, text: str) -> None:
        boxes.append(Rectangle((x0, y0), x1 - x0, h, facecolor=colour, edgecolor="black", linewidth=0.4))
        box_inches = (x1 - x0) / span * axes_inches
        if text and box_inches > 0.11:
            ax.text((x0 + x1) / 2, y0 + h / 2, text, ha="center", va="center", fontsize=min(8, 5 + box_inches * 8))

    for d, row in enumerate(rows):
        y = len(rows) - 1 - d
        for _label, start, end, op in row:
            kinds_seen.add(op.kind)
            if op.kind == FB:
                box(start, end, y + 0.45, 0.4, COLOURS[F][min(op.chunk, 1)], str(op.microbatch))
                box(start, end, y + 0.05, 0.4, COLOURS[BW][min(op.b_chunk, 1)], str(op.b_microbatch))
            else:
                box(start, end, y + 0.05, 0.8, COLOURS[op.kind][min(op.chunk, 1)], str(op.microbatch))
    ax.add_collection(PatchCollection(boxes, match_original=True))
    ax.set_xlim(0, span)
    ax.set_ylim(0, max(len(rows), 1))
    ax.set_yticks([len(rows) - 1 - d + 0.45 for d in range(len(rows))])
    ax.set_yticklabels([f"device {d}" for d in range(len(rows))])
    ax.set_xlabel("time")
    ax.set_title(
        title
        or (
            f"{result.schedule}: pp={result.pp}, {result.microbatches} micro-batches, {result.devices} devices; "
            f"makespan {result.makespan:.4g}, max bubble {max(result.bubble, default=0.0):.4g}"
        ),
        fontsize=10,
    )
