"""Figures for files, drawn without pyplot.

msnoop writes PNGs from library code that may run inside a user's notebook or a Ray worker.
``matplotlib.use("Agg")`` there would switch the caller's interactive backend, and pyplot keeps
every figure alive until it is closed. A :class:`matplotlib.figure.Figure` attached to its own Agg
canvas has neither problem: it is never registered with pyplot and is freed like any object.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def new_figure(width: float, height: float, dpi: int = 100) -> Any:
    """An empty ``Figure`` of ``width`` x ``height`` inches on an Agg canvas (``fig.subplots`` adds axes)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], **kwargs: Any) -> tuple[Any, Any]:
    """``(figure, axes)`` like ``pyplot.subplots``, without pyplot; ``kwargs`` go to ``Figure.subplots``."""
    fig = new_figure(*figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def save(fig: Any, path: str | Path, dpi: int | None = None) -> Path:
    """Lay out ``fig`` tightly and write it to ``path`` (format from the suffix)."""
    from msnoop.core.storage import atomic_path

    path = Path(path)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # complete or absent
        fig.savefig(tmp, dpi=dpi if dpi is not None else fig.dpi)
    return path
