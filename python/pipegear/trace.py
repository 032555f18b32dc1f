"""Timelines of pipelined steps: the cells each stage ran, and when.

:class:`Trace` is the C++ ``pipegear::Trace``; :func:`plot_trace` draws one
as GPipe's figure 2 (arXiv 1811.06965), from real timestamps.

>>> trace = Trace(2, 2, [(0, 0, "forward", False, 0, 10),
...                      (1, 0, "forward", False, 10, 20)])
>>> plot_trace(trace, "step.png")
"""
import os
from typing import Any, Optional, Union

from pipegear._C import Trace, TraceEvent

__all__ = ["Trace", "TraceEvent", "plot_trace"]

_FORWARD_COLOR = "#4c72b0"
_BACKWARD_COLOR = "#dd8452"
_WEIGHT_COLOR = "#55a868"  # the W half of a split backward


def plot_trace(
    trace: Any,
    path: Union[str, "os.PathLike[str]"],
    title: Optional[str] = None,
) -> None:
    """Draws ``trace`` (a :class:`Trace`, or ``pipegear.GPipe``'s
    ``last_trace``) as a PNG timeline at ``path``.

    One row per stage (stage 0 on top), time in milliseconds from the first
    cell; forward cells in one colour, backward cells in another, backward
    cells that began by recomputing a checkpointed forward hatched, and the
    micro-batch number in each box (``3.1``: micro-batch 3 on the worker's
    stage of chunk 1, when interleaved). The title defaults to the bubble
    fraction, measured and GPipe's theoretical (K-1)/(M+K-1).

    Needs matplotlib; draws with the Agg canvas and never touches pyplot's
    global state.
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch, Rectangle
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plot_trace needs matplotlib: pip install matplotlib") from e

    # pipegear.GPipe's Trace wraps this one.
    trace = getattr(trace, "_trace", trace)
    if not isinstance(trace, Trace):
        raise TypeError(f"trace must be a pipegear Trace, got {type(trace).__name__}")
    if trace.empty():
        raise ValueError("cannot plot an empty trace")

    events = trace.events
    origin = min(e.start_ns for e in events)
    end = max(e.end_ns for e in events)
    span_ms = max((end - origin) * 1e-6, 1e-9)
    stages = trace.stages
    # Interleaved: every label names its chunk, as the clock table does.
    interleaved = any(e.chunk for e in events)

    width = min(max(8.0, 0.35 * len(events) / stages + 4.0), 24.0)
    fig = Figure(figsize=(width, 0.6 * stages + 1.6), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for e in events:
        x = (e.start_ns - origin) * 1e-6
        w = (e.end_ns - e.start_ns) * 1e-6
        color = {"forward": _FORWARD_COLOR,
                 "backward_weight": _WEIGHT_COLOR}.get(e.phase, _BACKWARD_COLOR)
        ax.add_patch(
            Rectangle(
                (x, e.stage - 0.4),
                w,
                0.8,
                facecolor=color,
                edgecolor="black",
                linewidth=0.5,
                hatch="//" if e.recompute else None,
            )
        )
        # A label only where it fits: about 1/60 of the width per digit.
        label = (f"{e.micro_batch}.{e.chunk}" if interleaved
                 else str(e.micro_batch))
        if w >= span_ms * len(label) / 60.0:
            ax.text(
                x + w / 2,
                e.stage,
                label,
                ha="center",
                va="center",
                fontsize=8,
                color="white",
                fontweight="bold",
            )

    ax.set_xlim(0, span_ms)
    ax.set_ylim(stages - 0.5, -0.5)  # stage 0 on top
    ax.set_yticks(range(stages))
    ax.set_yticklabels([f"stage {s}" for s in range(stages)])
    ax.set_xlabel("time (ms)")
    ax.grid(axis="x", linestyle=":", linewidth=0.5)
    ax.set_axisbelow(True)
    legend = [
        Patch(facecolor=_FORWARD_COLOR, edgecolor="black", label="forward"),
        Patch(facecolor=_BACKWARD_COLOR, edgecolor="black", label="backward"),
    ]
    if any(e.phase == "backward_weight" for e in events):
        legend[-1] = Patch(facecolor=_BACKWARD_COLOR, edgecolor="black",
                           label="backward (B: input gradient when split)")
        legend.append(Patch(facecolor=_WEIGHT_COLOR, edgecolor="black",
                            label="W: weight gradients"))
    if any(e.recompute for e in events):
        legend.append(
            Patch(
                facecolor=_BACKWARD_COLOR,
                edgecolor="black",
                hatch="//",
                label="recompute + backward",
            )
        )
    ax.legend(
        handles=legend,
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=8,
        frameon=False,
    )
    if title is None:
        title = (
            f"{stages} stages, {trace.micro_batches} micro-batches: "
            f"bubble {trace.bubble_fraction:.1%} "
            f"(GPipe's (K-1)/(M+K-1) = {trace.theoretical_bubble_fraction:.1%})"
        )
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png")
