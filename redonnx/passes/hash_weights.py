"""hash-weights: adaptive scalar hashing of layer weights (RED step 1). Lossy.

For each weight tensor W of a Conv, ConvTranspose, Gemm or MatMul (biases with ``hash_biases``):
estimate the density of its scalar values with a Gaussian KDE, find the density's local maxima
(modes) and the minima between them (basin boundaries), and replace every weight by the value
of its basin: W~ = v_k for w in [m_k, m_k+1). A contrast ``tau`` (percent of the layer's range)
merges modes closer than tau into the denser one. Per-layer tau follows a strategy: constant,
block (thirds: max(2t-1, 0), t, min(2t, 1) with t = tau/100), linear ascending
(2 tau l / (L+1)) or linear descending (2 tau (L+1-l) / (L+1)); the last two average tau.

Two rules pick the bandwidth h and the basin values:
- ``paper``: h = median gap between consecutive sorted weights, v_k = the mode (the paper's
  literal rule, on a grid fine enough to resolve h);
- ``bounded`` (default): v_k = the basin mean refined by Lloyd steps, and h = the widest
  bandwidth with ||W~ - W||_F / ||W||_F <= ``hash_error`` (default 6 %). Measured on real
  CIFAR ResNets, the literal rule leaves thousands of modes per layer and compresses 1.4x;
  the bound gives 4x with the same top-1 (see benchmarks/hashing.py).
Tensors holding NaN or Inf are left alone, with a reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from redonnx.errors import RedonnxError
from redonnx.passes.base import Pass, PassContext, PassResult
from redonnx.redundancy import hashing as H

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
DEFAULT_ERROR = 0.06
STRATEGIES = ("constant", "block", "ascending", "descending")


def layer_taus(tau: float, strategy: str, n_layers: int) -> list[float]:
    """Per-layer contrast (percent) for ``n_layers`` layers in graph order (paper, appendix A.3)."""
    if n_layers == 0:
        return []
    idx = np.arange(1, n_layers + 1)
    if strategy == "constant":
        return [tau] * n_layers
    if strategy == "ascending":
        return list(2.0 * tau * idx / (n_layers + 1))
    if strategy == "descending":
        return list(2.0 * tau * (n_layers + 1 - idx) / (n_layers + 1))
    t = tau / 100.0
    third = [max(2 * t - 1, 0.0), t, min(2 * t, 1.0)]
    return [100.0 * third[min(3 * (i - 1) // n_layers, 2)] for i in idx]


def targets(graph: gs.Graph, biases: bool) -> list[tuple[gs.Node, gs.Constant]]:
    """(layer, tensor) pairs to hash, each tensor once, in graph order."""
    seen: set[int] = set()
    out = []
    for node in graph.nodes:
        if node.op not in LAYER_OPS:
            continue
        idx = [1] + ([2] if biases and node.op != "MatMul" else [])
        if node.op == "MatMul" and not isinstance(node.inputs[1], gs.Constant):
            idx = [0]
        for i in idx:
            t = node.inputs[i] if len(node.inputs) > i else None
            if isinstance(t, gs.Constant) and id(t) not in seen:
                seen.add(id(t))
                out.append((node, t))
    return out


@dataclass
class HashWeights(Pass):
    """Replaces each weight by the value of its density basin (RED step 1); lossy."""

    name: ClassVar[str] = "hash-weights"
    rule: str = "bounded"  # bounded (error-bounded bandwidth, centroid values) or paper
    max_error: float = DEFAULT_ERROR  # bounded rule: relative error allowed per tensor
    bandwidth: str | float | None = None  # fixed KDE bandwidth: paper, silverman, scott or a number
    grid: int | None = None  # density grid points
    tau: float = 0.0  # contrast: modes closer than tau % of a layer's range merge
    tau_strategy: str = "constant"  # per-layer tau: constant, block, ascending, descending
    biases: bool = False  # hash biases too
    plot_dir: str | None = None  # a density plot per hashed layer
    plot_limit: int = 10**9  # at most this many plots

    @property
    def exact(self) -> bool:
        return False

    def __post_init__(self) -> None:
        if self.rule not in ("bounded", "paper"):
            raise RedonnxError(f"hash rule {self.rule!r}: expected 'bounded' or 'paper'")
        if not 0 < self.max_error < 1:
            raise RedonnxError("--hash-error must be between 0 and 1 (a fraction, e.g. 0.06)")
        if not 0 <= self.tau <= 100:
            raise RedonnxError("--tau must be a percentage between 0 and 100")
        if self.tau_strategy not in STRATEGIES:
            raise RedonnxError(f"--tau-strategy must be one of {', '.join(STRATEGIES)}")
        if self.grid is not None and not 16 <= int(self.grid) <= 2**24:
            raise RedonnxError("--grid must be between 16 and 16777216")
        if isinstance(self.bandwidth, str) and self.bandwidth not in ("paper", "silverman", "scott"):
            try:
                self.bandwidth = float(self.bandwidth)
            except ValueError:
                raise RedonnxError("--bandwidth must be paper, silverman, scott or a number") from None
        if isinstance(self.bandwidth, float) and self.bandwidth <= 0:
            raise RedonnxError("--bandwidth must be positive")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        res = self.result()
        pairs = targets(graph, self.biases)
        taus = layer_taus(self.tau, self.tau_strategy, len(pairs))
        for (node, tensor), tau in zip(pairs, taus, strict=True):
            values = np.asarray(tensor.values)
            if values.dtype.kind != "f":
                res.decline(node, f"{tensor.name}: {values.dtype} weights are not floating point")
                continue
            if not np.all(np.isfinite(values)):
                res.decline(node, f"{tensor.name}: weights contain NaN or Inf")
                continue
            if np.unique(values).size < 3:
                res.decline(node, f"{tensor.name}: two or fewer distinct values, nothing to hash")
                continue
            t0 = time.perf_counter()
            hashed, record, hashing, binned = hash_tensor(values, self, tau)
            record.update(layer=node.name, op=node.op, tensor=tensor.name, seconds=round(time.perf_counter() - t0, 5))
            tensor.values = hashed
            res.layers.append(record)
            res.count("tensors hashed")
            if self.plot_dir and res.counts["tensors hashed"] <= self.plot_limit:
                _plot(self.plot_dir, node, tensor, binned, hashing)
        if res.layers:
            res.counts["weights hashed"] = int(sum(r["n"] for r in res.layers))
            res.stats["hashing_seconds"] = round(sum(r["seconds"] for r in res.layers), 4)
            res.stats["max_rel_error"] = max(r["rel_error"] for r in res.layers)
        return res


def hash_tensor(values: np.ndarray, cfg: HashWeights, tau: float) -> tuple[np.ndarray, dict, H.Hashing, H.Binned]:
    """Hash one tensor; returns the new values, a report record, and the grid-level result."""
    h_fixed = _fixed_bandwidth(values, cfg)
    grid = cfg.grid or _grid_size(values, h_fixed if cfg.rule == "paper" else None, cfg.max_error)
    binned = H.bin_values(values, grid)
    if h_fixed is not None:
        hashing = H.hash_binned(
            binned, h_fixed, tau, centroids=cfg.rule == "bounded", lloyd_steps=8 * (cfg.rule == "bounded")
        )
    else:
        hashing = H.choose_bandwidth(binned, cfg.max_error, tau)
    hashed = H.apply(binned, hashing, values.shape, values.dtype)
    diff = np.abs(hashed.astype(np.float64) - values)
    norm = float(np.sqrt(binned.sumsq))
    record = {
        "shape": list(values.shape),
        "n": int(values.size),
        "bandwidth": hashing.bandwidth,
        "grid": len(binned.grid),
        "tau": round(float(tau), 4),
        "modes": len(hashing.modes),
        "modes_kept": len(hashing.kept),
        "distinct_before": int(np.unique(values).size),
        "distinct_after": int(np.unique(hashed).size),
        "max_abs_error": float(diff.max()) if diff.size else 0.0,
        "mean_abs_error": float(diff.mean()) if diff.size else 0.0,
        "rel_error": float(np.sqrt((diff**2).sum()) / norm) if norm > 0 else 0.0,
    }
    return hashed, record, hashing, binned


def _fixed_bandwidth(values: np.ndarray, cfg: HashWeights) -> float | None:
    if cfg.rule == "paper" and cfg.bandwidth is None:
        return H.paper_bandwidth(values)
    if cfg.bandwidth is None:
        return None
    if isinstance(cfg.bandwidth, float):
        return cfg.bandwidth
    return {"paper": H.paper_bandwidth, "silverman": H.silverman_bandwidth, "scott": H.scott_bandwidth}[cfg.bandwidth](
        values
    )


def _grid_size(values: np.ndarray, h: float | None, error: float) -> int:
    """Grid points: at least 4096; fine enough to resolve the paper's tiny bandwidth, or (bounded
    rule) for one bin's rounding, dx / sqrt(12), to stay under a quarter of the error bound even
    when outliers stretch the range far beyond the weights' RMS. Capped at 2**20."""
    span = float(values.max() - values.min())
    if h is None:
        rms = float(np.sqrt(np.mean(np.square(values, dtype=np.float64))))
        need = int(np.ceil(span / max(0.87 * error * rms, 1e-30)))
    else:
        need = int(np.ceil(4.0 * span / max(h, 1e-30)))
    return int(np.clip(need, H.DEFAULT_GRID, H.MAX_GRID))


def _plot(folder: str, node: gs.Node, tensor: gs.Constant, binned: H.Binned, hashing: H.Hashing) -> None:
    from redonnx.report.plots import plot_hashing

    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in (node.name or tensor.name))
    Path(folder).mkdir(parents=True, exist_ok=True)
    plot_hashing(Path(folder) / f"hash_{safe}.png", f"{node.name} {list(tensor.shape)}", binned, hashing)
