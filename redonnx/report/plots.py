"""PNG plots (optional extra ``plots``: matplotlib): weight densities with modes and basins."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from redonnx.errors import RedonnxError
from redonnx.redundancy.hashing import Binned, Hashing


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RedonnxError("plots need matplotlib: pip install 'redonnx[plots]'") from None
    return plt


def plot_hashing(path: Path, title: str, b: Binned, h: Hashing) -> Path:
    """Density of the weights (paper Figures 1 and 4): modes, kept modes, basin boundaries, values."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=110)
    dens = h.density / max(h.density.max(), 1e-300)
    hist = b.count / max(b.count.max(), 1e-300)
    ax.fill_between(b.grid, hist, step="mid", color="0.85", label="weights (binned)")
    ax.plot(b.grid, dens, color="tab:blue", lw=1.2, label=f"KDE, h={h.bandwidth:.3g}")
    if len(h.modes) <= 400:
        ax.vlines(b.grid[h.modes], 0, dens[h.modes], color="tab:orange", lw=0.6, label=f"{len(h.modes)} modes")
    for s in h.boundaries[:400]:
        ax.axvline(b.grid[min(s, len(b.grid) - 1)] - b.dx / 2, color="0.5", lw=0.4, ls="--")
    ax.plot(h.values, np.full(len(h.values), -0.04), "|", color="tab:red", ms=8, label=f"{len(h.values)} values")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("weight value")
    ax.set_yticks([])
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
