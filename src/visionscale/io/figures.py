"""Matplotlib figures to PNG bytes, without pyplot's global state (safe in threads and
without a display); write the bytes with :func:`visionscale.io.atomic.write_atomic`."""

from __future__ import annotations

import io


def figure_png(fig, dpi: int = 100) -> bytes:
    """Render a ``matplotlib.figure.Figure`` (made with ``Figure()`` or pyplot) to PNG bytes."""
    if fig.canvas is None or type(fig.canvas).__name__ == "FigureCanvasBase":
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()
