"""Matplotlib without a display (the Agg backend), and the finish every plot here shares."""

from __future__ import annotations


def pyplot():
    """matplotlib.pyplot on the Agg backend (imported on first use: plots are optional)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str, *, legends=(), dpi: int = 100) -> None:
    """A light grid and a legend on each of `legends` (axes), then PNG to `path`; closes fig."""
    for ax in legends:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
