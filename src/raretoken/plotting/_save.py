"""Writing a display's figure as PNG and SVG (the one place that does it)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure


def save_png_svg(fig: Figure, stem: str | Path, *, dpi: int = 150) -> tuple[Path, Path]:
    """Write ``<stem>.png`` and ``<stem>.svg`` (no creation date in the SVG, so a rerun
    writes the same bytes) after a tight layout."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    png = stem.parent / (stem.name + ".png")
    svg = stem.parent / (stem.name + ".svg")
    fig.tight_layout()
    fig.savefig(png, dpi=dpi, format="png")
    fig.savefig(svg, format="svg", metadata={"Date": None})
    return png, svg
