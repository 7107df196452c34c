"""Channel statistics and linear reconstruction for relaxed channel removal.

Removing channel r of a tensor read by a linear layer changes that layer's output by
col_r * a_r. If a_r is predicted from the channels that stay, a_r ~ B_r a_K + c_r (least
squares over activation statistics), the layer can absorb the prediction exactly in expectation:

    W[:, K] += W[:, r] B_r        bias += W[:, r] c_r        (summed over kernel taps)

leaving an error of variance ||W[:, r]||^2 / P_rr, where P is the precision matrix (inverse
covariance) of the tensor's channels. That is the cost of removing r; it grows as other channels
go, which a rank-1 update of P tracks (P <- P - P[:, r] P[r, :] / P_rr on the remaining channels).

Statistics come from running the model in onnxruntime on synthetic inputs (seeded normal noise,
no data needed) or on calibration inputs the user passes. The synthetic inputs use their own seed
(:data:`STATS_SEED`), never one of verification's, so a budget is checked on inputs the
reconstruction was not fitted to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from redonnx.inputs.model import InputModel, batch_is_leading
from redonnx.inputs.model import infer as infer_inputs
from redonnx.inputs.realism import Correction, intervene
from redonnx.inputs.sizes import Settled
from redonnx.io.graph import export
from redonnx.measure.runtime import in_order, run, session

ROWS_PER_CHANNEL = 8  # fewer rows per channel than this: shrunk covariance (see Stats.of_rows)
MAX_ROWS = 16384  # samples per tensor kept for the covariance
STATS_SEED = 100_003  # synthetic statistics never reuse a verification seed (0, 1, ... samples - 1)


@dataclass
class Stats:
    """Per-channel mean and covariance of one tensor over batch and spatial positions."""

    mean: np.ndarray
    cov: np.ndarray
    _precision: np.ndarray | None = field(default=None, repr=False)

    @property
    def second_moment(self) -> np.ndarray:
        return np.diag(self.cov) + self.mean**2

    @classmethod
    def of_rows(cls, x: np.ndarray) -> Stats:
        """Mean and covariance of rows ``x`` (samples x channels, float64): the sample covariance
        with at least :data:`ROWS_PER_CHANNEL` rows per channel, else Ledoit-Wolf's (shrinkage would
        blur exact linear dependences a well-sampled covariance shows; too few rows fake them)."""
        mean = x.mean(0)
        xc = x - mean
        if len(x) >= ROWS_PER_CHANNEL * x.shape[1]:
            return cls(mean, xc.T @ xc / max(len(x) - 1, 1))
        return cls(mean, shrunk_covariance(xc))

    def precision(self) -> np.ndarray:
        """A fresh copy of the precision matrix (callers downdate it in place); the inverse is
        computed once per statistics, not once per budget trial."""
        if self._precision is None:
            self._precision = precision(self.cov)
        return self._precision.copy(order="F")


def channel_stats(
    graph: gs.Graph,
    axes: dict[str, int],
    feeds: dict[str, np.ndarray] | None = None,
    shapes: dict[str, list[int]] | None = None,
    batch: int | None = None,
    seed: int = 0,
    input_model: InputModel | None = None,
    corrections: list[Correction] | None = None,
    inputs: Settled | None = None,
) -> dict[str, Stats]:
    """Mean and covariance over channels (axis ``axes[name]``) of the named tensors.

    Synthetic inputs (drawn by the run's settled ``inputs``, else by ``input_model`` at ``shapes``,
    inferred from the graph when None): 64 images
    (every pixel position is a sample) or, for inputs without spatial dimensions, up to 1024
    vectors, within 2**20 input values. ``corrections`` (:mod:`redonnx.inputs.realism`) are inserted
    first, so the statistics are those of activations at their BatchNorm running moments. The
    tensors are taken in name order whatever order ``axes`` lists them in: one generator samples
    every tensor's rows in turn (a set's order varies with PYTHONHASHSEED)."""
    axes = dict(sorted(axes.items()))
    model = export(graph)  # lean for large graphs: weights are not copied into the proto
    del model.graph.value_info[:]
    if corrections:
        model = intervene(model, corrections)
    known = {o.name for o in model.graph.output}
    for name in axes:
        if name not in known:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    if feeds is None:
        feeds = stats_feeds(inputs, batch, seed) if inputs is not None else draw_stats_inputs(
            model, shapes, input_model, batch, seed)  # fmt: skip
    rows = _sample_rows(session(model), feeds, axes, np.random.default_rng(seed), _batch_is_free(model))
    stats = {}
    for name, x in rows.items():
        stats[name] = Stats.of_rows(x)
    return stats


def shrunk_covariance(xc: np.ndarray) -> np.ndarray:
    """Ledoit-Wolf covariance of centred rows: (1 - s) S + s (tr S / p) I with the shrinkage s that
    minimizes the expected squared error (Ledoit & Wolf 2004). With many more rows than channels
    s is ~0 (the sample covariance); with few (48 calibration sentences of 37 tokens against 1536
    MLP neurons) the sample covariance is near-singular, so every channel would look predictable
    from the others and removable for free: shrinkage keeps the errors honest."""
    n, p = xc.shape
    s = xc.T @ xc / max(n, 1)
    if n < 2 or p < 2:
        return s * n / max(n - 1, 1)
    mu = float(np.trace(s)) / p
    frob = float(np.sum(s * s))
    delta = (frob - 2 * mu * float(np.trace(s)) + mu * mu * p) / p  # ||S - mu I||^2 / p
    beta = (float(np.sum(np.sum(xc * xc, axis=1) ** 2)) - n * frob) / (n * n * p)
    shrink = 0.0 if delta <= 0 else min(max(beta, 0.0), delta) / delta
    out = (1.0 - shrink) * s
    out[np.diag_indices(p)] += shrink * mu
    return out * n / (n - 1)


def draw_stats_inputs(
    model: onnx.ModelProto,
    shapes: dict[str, list[int]] | None,
    input_model: InputModel | None = None,
    batch: int | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """:func:`stats_feeds` for ``model`` at ``shapes`` (the input model inferred when None)."""
    im = input_model if input_model is not None else infer_inputs(model, shapes)
    return stats_feeds(Settled.of(model, shapes, im), batch, seed)


def stats_feeds(inputs: Settled, batch: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """The statistics' synthetic inputs: their own seed, 64 images or up to 1024 vectors (at most
    ``batch``), within 2**20 input values."""
    cap = batch or (64 if any(len(v) >= 4 for v in inputs.at(1).values()) else 1024)
    return inputs.draw(batch=int(np.clip(2**20 // inputs.values_per_sample(), 1, cap)), seed=STATS_SEED + seed)


CHUNKS = 16  # the statistics' inputs run in up to this many pieces: one piece's activations in memory


def _batch_is_free(model: onnx.ModelProto) -> bool:
    """Can the inputs be fed in smaller batches (every input's first dimension is dynamic)?"""
    return batch_is_leading(model)


def _sample_rows(sess, feeds: dict[str, np.ndarray], axes: dict[str, int], rng, split: bool) -> dict[str, np.ndarray]:
    """Up to MAX_ROWS rows (channel vectors at sampled positions) of every named tensor, in float64.

    The batch runs in pieces and each piece contributes its share of rows, so memory holds one
    piece's activations per worker thread (all requested tensors of a few images), not the batch's."""
    sizes = {len(v) if np.ndim(v) else 0 for v in feeds.values()}
    n = sizes.pop() if split and len(sizes) == 1 else 1
    pieces = np.array_split(np.arange(n), min(n, CHUNKS)) if n > 1 else [None]
    quota = -(-MAX_ROWS // len(pieces))
    kept: dict[str, list[np.ndarray]] = {name: [] for name in axes}

    def piece(idx) -> dict[str, np.ndarray]:
        return run(sess, feeds if idx is None else {k: v[idx] for k, v in feeds.items()})

    for outs in in_order(piece, pieces):  # pieces side by side; rows drawn in piece order
        for name, axis in axes.items():
            x = np.moveaxis(np.asarray(outs[name]), axis, -1)
            x = x.reshape(-1, x.shape[-1])
            if len(x) > quota:
                x = x[np.sort(rng.choice(len(x), quota, replace=False))]
            kept[name].append(x.astype(np.float64))
        del outs
    return {name: np.concatenate(parts) for name, parts in kept.items()}


def precision(cov: np.ndarray, ridge: float = 1e-6) -> np.ndarray:
    """Inverse of a covariance with a small ridge (relative to its mean variance)."""
    lam = ridge * max(float(np.mean(np.diag(cov))), 1e-30)
    return np.asfortranarray(np.linalg.inv(cov + lam * np.eye(len(cov))))


UPDATE_BLOCK = 2**18  # elements of the temporary a precision update makes at once (2 MiB)
BLAS_FROM = 1024  # channels from which scipy's in-place BLAS update runs (2x numpy's there)


def remove_from_precision(p: np.ndarray, r: int) -> np.ndarray:
    """Precision of the remaining variables' conditional model once r is no longer observed.

    Marginalising r out of the joint Gaussian: P' = P_-r,-r - P_-r,r P_r,-r / P_rr (r's row and
    column are then ignored; they are set to zero with P_rr = inf semantics by the caller). ``p``
    is updated in place: by scipy's BLAS on wide layers, else by numpy a block of columns at a time
    (no C x C temporaries; importing scipy's BLAS costs 0.25 s, more than every update of a CNN's
    narrow layers)."""
    col = p[:, r].copy()
    if len(col) >= BLAS_FROM:
        from scipy.linalg import blas  # wide layers only: the import costs 0.25 s

        p = blas.dger(-1.0 / p[r, r], col, col, a=p, overwrite_a=True)
    else:
        scaled = col * (-1.0 / p[r, r])
        step = max(1, UPDATE_BLOCK // len(col))
        for j in range(0, len(col), step):  # Fortran order: a block of columns is contiguous
            p[:, j : j + step] += np.multiply.outer(scaled[j : j + step], col).T  # in p's (column) order
    p[r, :] = 0.0
    p[:, r] = 0.0
    p[r, r] = np.inf
    return p


def regression(stats: Stats, removed: list[int], kept: list[int], ridge: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """B, c with a_removed ~ B a_kept + c in the least-squares sense."""
    cov = stats.cov
    if not kept:
        return np.zeros((len(removed), 0)), stats.mean[removed]
    ckk = cov[np.ix_(kept, kept)]
    lam = ridge * max(float(np.mean(np.diag(ckk))), 1e-30)
    b = np.linalg.solve(ckk + lam * np.eye(len(kept)), cov[np.ix_(kept, removed)]).T
    c = stats.mean[removed] - b @ stats.mean[kept]
    return b, c
