"""Adaptive scalar hashing of a weight tensor (RED step 1), linear in the number of weights.

The weights are binned once onto a regular grid over [min, max] (per-bin count, sum and sum of
squares: exact first and second moments). Everything after that works on the grid, so a
tensor of n weights costs O(n) once plus O(G log G) per density evaluation:

1. density: Gaussian KDE d(w) = 1/(n h) sum_i K((w - w_i) / h), evaluated by convolving the
   binned counts with the sampled kernel (FFT);
2. modes: local maxima of d; basin boundaries: the lowest point of d between two maxima
   (the middle of a flat stretch); every weight takes the value of its basin;
3. contrast tau: a mode closer than tau % of the range to a denser kept mode is merged into it
   (non-maximum suppression, densest first);
4. values: the paper takes each basin's mode; ``centroids=True`` takes each basin's mean, which
   minimises the squared error for the same basins, then refines boundaries with Lloyd steps
   (boundary = midpoint of neighbouring centroids), all on the grid.

``choose_bandwidth`` searches the widest bandwidth whose relative error ||W~ - W|| / ||W|| stays
under a bound: fewer distinct values for a stated loss.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass, field, replace

import numpy as np

DEFAULT_GRID = 4096
MAX_GRID = 2**20


@dataclass
class Binned:
    """A tensor's values binned on a regular grid, with exact per-bin moments."""

    lo: float
    hi: float
    grid: np.ndarray  # bin centres
    count: np.ndarray
    total: np.ndarray
    sq: np.ndarray
    index: np.ndarray  # bin of every weight (int32), in the tensor's flat order
    sumsq: float  # sum of squares of all weights
    spectra: dict[int, np.ndarray] = field(default_factory=dict)  # rfft of counts per padded size

    @property
    def dx(self) -> float:
        return float(self.grid[1] - self.grid[0]) if len(self.grid) > 1 else 1.0


@dataclass
class Hashing:
    """Result of hashing one tensor on the grid: per-bin basin and per-basin value."""

    bandwidth: float
    density: np.ndarray
    modes: np.ndarray  # grid indices of all density maxima
    kept: np.ndarray  # grid indices of the maxima kept after contrast
    boundaries: np.ndarray  # bin index where each basin after the first starts
    values: np.ndarray  # value of each basin
    sse: float  # squared error of the hashed tensor
    lloyd_steps: int = 0
    extra: dict = field(default_factory=dict)


def bin_values(w: np.ndarray, grid_size: int = DEFAULT_GRID) -> Binned:
    """Bin the finite values of ``w`` (caller checks finiteness) onto ``grid_size`` bins."""
    x = np.asarray(w, dtype=np.float64).reshape(-1)
    lo, hi = float(x.min()), float(x.max())
    g = max(2, int(grid_size)) if hi > lo else 2
    dx = (hi - lo) / g if hi > lo else 1.0
    idx = np.minimum(((x - lo) / dx).astype(np.int64), g - 1).astype(np.int32)
    count = np.bincount(idx, minlength=g).astype(np.float64)
    total = np.bincount(idx, weights=x, minlength=g)
    sq = np.bincount(idx, weights=x * x, minlength=g)
    grid = lo + (np.arange(g) + (0.5 if hi > lo else 0.0)) * dx
    return Binned(lo, hi, grid, count, total, sq, idx, float(sq.sum()))


def paper_bandwidth(w: np.ndarray) -> float:
    """The paper's rule: median gap between consecutive distinct sorted weights."""
    s = np.unique(np.asarray(w, dtype=np.float64).reshape(-1))
    if s.size < 2:
        return 1.0
    return float(np.median(np.diff(s)))


def silverman_bandwidth(w: np.ndarray) -> float:
    x = np.asarray(w, dtype=np.float64).reshape(-1)
    iqr = np.subtract(*np.percentile(x, [75, 25]))
    sigma = min(x.std(), iqr / 1.349) if iqr > 0 else x.std()
    return float(0.9 * max(sigma, 1e-12) * x.size ** (-0.2))


def scott_bandwidth(w: np.ndarray) -> float:
    x = np.asarray(w, dtype=np.float64).reshape(-1)
    return float(1.059 * max(x.std(), 1e-12) * x.size ** (-0.2))


def density(b: Binned, h: float) -> np.ndarray:
    """Gaussian KDE of the binned values on the grid (unnormalised; shape is what matters).

    The counts' spectrum is computed once per padded size and multiplied by the Gaussian's
    analytic transform exp(-2 pi^2 f^2 (h/dx)^2); padding to G + 10 h/dx keeps wrap-around
    contributions below exp(-12.5).
    """
    g = len(b.count)
    r = int(np.ceil(5.0 * h / b.dx))
    n = 1 << int(np.ceil(np.log2(g + 2 * min(r, 8 * g))))
    spec = b.spectra.get(n)
    if spec is None:
        spec = b.spectra[n] = np.fft.rfft(b.count, n)
    d = np.fft.irfft(spec * np.exp(-2.0 * (_pi_f(n) * h / b.dx) ** 2), n)[:g]
    # FFT round-off leaves ~1e-16 ripples where the density is empty: they are not modes
    d[d < d.max() * 1e-9] = 0.0
    return d


@functools.cache
def _pi_f(n: int) -> np.ndarray:
    """pi times the rfft frequencies of an n-point transform (read-only, shared)."""
    out = np.pi * (np.arange(n // 2 + 1) / n)
    out.flags.writeable = False
    return out


def find_modes(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Grid indices of the local maxima of ``d`` and of the lowest point between each pair.

    Runs of equal values are treated as one point at their middle, so plateaus (and the empty
    stretches between far-apart clusters) give one mode or one boundary. Between two consecutive
    maxima the density only falls then rises, so there is exactly one minimum run.
    """
    change = np.flatnonzero(np.diff(d)) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [len(d)]]) - 1
    v = d[starts]
    left = np.concatenate([[-np.inf], v[:-1]])
    right = np.concatenate([v[1:], [-np.inf]])
    mid = (starts + ends) // 2
    maxima = mid[(v > left) & (v > right)]
    if maxima.size == 0:
        return np.array([int(np.argmax(d))]), np.empty(0, dtype=np.int64)
    inner = (v < left) & (v < right)
    minima = mid[inner]
    minima = minima[(minima > maxima[0]) & (minima < maxima[-1])]
    return maxima, minima


def suppress(maxima: np.ndarray, d: np.ndarray, grid: np.ndarray, radius: float) -> np.ndarray:
    """Contrast: keep modes densest first, dropping any within ``radius`` of a kept one."""
    if radius <= 0 or len(maxima) < 2:
        return maxima
    pos = grid[maxima]
    order = np.argsort(-d[maxima], kind="stable")
    kept_pos: list[float] = []
    kept: list[int] = []
    for i in order:
        j = bisect.bisect_left(kept_pos, pos[i])
        near = (j < len(kept_pos) and kept_pos[j] - pos[i] <= radius) or (j > 0 and pos[i] - kept_pos[j - 1] <= radius)
        if not near:
            kept_pos.insert(j, float(pos[i]))
            kept.append(int(maxima[i]))
    return np.sort(np.array(kept, dtype=np.int64))


def _basins_stats(b: Binned, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Count, sum and sum of squares per basin; ``starts`` are the first bins of basins 1..K-1."""
    edges = np.concatenate([[0], starts, [len(b.count)]])
    c = np.add.reduceat(b.count, edges[:-1])
    s = np.add.reduceat(b.total, edges[:-1])
    q = np.add.reduceat(b.sq, edges[:-1])
    return c, s, q


def hash_binned(
    b: Binned,
    h: float,
    tau: float = 0.0,
    centroids: bool = True,
    lloyd_steps: int = 0,
) -> Hashing:
    """Hash the binned tensor with bandwidth ``h`` and contrast ``tau`` (percent of the range)."""
    d = density(b, h)
    maxima, minima = find_modes(d)
    kept = suppress(maxima, d, b.grid, tau / 100.0 * (b.hi - b.lo))
    starts = _boundaries(d, kept, minima if len(kept) == len(maxima) else None)
    if centroids:
        starts, values, steps, stats = _lloyd(b, starts, lloyd_steps)
    else:
        values, steps = b.grid[kept].copy(), 0
        values, stats = _clip_modes(values, b), _basins_stats(b, starts)
    return Hashing(h, d, maxima, kept, starts, values, _sse(stats, values), steps)


def _boundaries(d: np.ndarray, kept: np.ndarray, minima: np.ndarray | None) -> np.ndarray:
    """First bin of each basin after the first: the lowest density point between kept modes."""
    if len(kept) < 2:
        return np.empty(0, dtype=np.int64)
    if minima is None:  # modes were merged: lowest point between each pair of kept modes
        seg_min = np.minimum.reduceat(d, kept)[:-1]
        minima = np.empty(len(kept) - 1, dtype=np.int64)
        for k in range(len(kept) - 1):
            low = np.flatnonzero(d[kept[k] : kept[k + 1]] == seg_min[k])
            minima[k] = kept[k] + low[len(low) // 2]
    return np.asarray(minima, dtype=np.int64) + 1


def _clip_modes(values: np.ndarray, b: Binned) -> np.ndarray:
    return np.clip(values, b.lo, b.hi)


Stats = tuple[np.ndarray, np.ndarray, np.ndarray]  # count, sum and sum of squares per basin


def _lloyd(b: Binned, starts: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray, int, Stats]:
    """Basin means, then boundaries moved to midpoints of neighbouring means, ``steps`` times;
    also the final basins' statistics (the squared error reads them)."""
    done = 0
    stats = _basins_stats(b, starts)
    values = _means(b, starts, stats)
    for _ in range(steps):
        mids = (values[:-1] + values[1:]) / 2.0
        new = np.searchsorted(b.grid, mids, side="right").astype(np.int64)
        new = np.clip(new, 1, len(b.grid) - 1)
        new = np.unique(new)
        if np.array_equal(new, starts):
            break
        starts = new
        stats = _basins_stats(b, starts)
        values = _means(b, starts, stats)
        done += 1
    return starts, values, done, stats


def _means(b: Binned, starts: np.ndarray, stats: Stats) -> np.ndarray:
    c, s, _ = stats
    edges = np.concatenate([[0], starts, [len(b.count)]])
    fallback = (b.grid[edges[:-1]] + b.grid[np.minimum(edges[1:], len(b.grid)) - 1]) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(c > 0, s / np.maximum(c, 1e-300), fallback)


def _sse(stats: Stats, values: np.ndarray) -> float:
    c, s, q = stats
    # sum (x - v)^2 = sum x^2 - 2 v sum x + n v^2
    return float(max(np.sum(q - 2.0 * values * s + c * values * values), 0.0))


def apply(b: Binned, hashing: Hashing, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """The hashed tensor: every weight replaced by its basin's value."""
    basin_of_bin = np.zeros(len(b.grid), dtype=np.int32)
    basin_of_bin[hashing.boundaries] = 1
    basin_of_bin = np.cumsum(basin_of_bin, dtype=np.int32)
    out = hashing.values.astype(dtype)[basin_of_bin[b.index]]
    return out.reshape(shape)


def choose_bandwidth(
    b: Binned,
    max_rel_error: float,
    tau: float = 0.0,
    centroids: bool = True,
    iterations: int = 10,
    lloyd_steps: int = 8,
) -> Hashing:
    """The widest bandwidth whose hashing keeps ||W~ - W|| / ||W|| <= ``max_rel_error``.

    Bisection on log h between a grid step and the whole range (10 halvings: h within 1 %); the
    error grows with h (wider kernels, fewer modes), so the search ends at the coarsest hashing
    within the bound.
    """
    budget = (max_rel_error**2) * b.sumsq
    lo = np.log(max(b.dx * 0.5, 1e-30))
    hi = np.log(max(b.hi - b.lo, b.dx))
    best = hash_binned(b, float(np.exp(lo)), tau, centroids)
    if best.sse > budget:
        return best  # even the finest hashing exceeds the bound: keep the finest
    for _ in range(iterations):
        mid = (lo + hi) / 2.0
        cand = hash_binned(b, float(np.exp(mid)), tau, centroids)
        if cand.sse <= budget:
            best, lo = cand, mid
        else:
            hi = mid
    if centroids and lloyd_steps:  # Lloyd steps only lower the error: the bound still holds
        best = _refined(b, best, lloyd_steps)
    return best


def _refined(b: Binned, hashing: Hashing, steps: int) -> Hashing:
    """``hashing`` (centroids, no Lloyd steps yet) after up to ``steps`` Lloyd steps: what
    :func:`hash_binned` with those steps returns at the same bandwidth, without the density again."""
    starts, values, done, stats = _lloyd(b, hashing.boundaries, steps)
    return replace(hashing, boundaries=starts, values=values, sse=_sse(stats, values), lloyd_steps=done)
