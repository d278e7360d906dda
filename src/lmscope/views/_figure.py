"""Static matplotlib figures (PNG/SVG for papers), made without pyplot.

matplotlib is an optional extra (``lmscope[analysis]``), imported only when a figure is asked for.
Figures are built with ``matplotlib.figure.Figure`` on an Agg canvas, so no global backend or
pyplot state is touched and it works headless; ``figure.savefig("x.svg")`` picks the format from
the file name.
"""

from __future__ import annotations

from typing import Any

from lmscope.errors import LmscopeError

__all__ = ["new_figure"]


def new_figure(**kwargs: Any) -> Any:
    """A ``matplotlib.figure.Figure`` on an Agg canvas (``kwargs`` go to ``Figure``)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise LmscopeError(
            "static figures need matplotlib, which is not installed: pip install 'lmscope[analysis]'"
        ) from error
    figure = Figure(**kwargs)
    FigureCanvasAgg(figure)
    return figure
