"""Figure helpers: matplotlib figures on the Agg canvas, saved as PNG."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 110
FONT_SIZE = 8


def new_figure(width: float, height: float) -> Figure:
    """Return an empty figure of ``width`` by ``height`` inches on Agg.

    The figure is built without pyplot, so no global state or display
    backend is involved and figures can be made from any thread.
    """
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def save_png(figure: Figure, path: Path) -> str:
    """Save ``figure`` as a PNG at ``path`` and return the file name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI, format="png")
    return path.name
