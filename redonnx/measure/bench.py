"""onnxruntime CPU latency: median and spread over repeated runs, models interleaved."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from redonnx.io.files import load_model
from redonnx.measure.runtime import session


def bench_models(
    paths: list[str | Path],
    shapes: dict[str, list[int]] | None = None,
    runs: int = 50,
    warmup: int = 5,
    batch: int = 1,
    threads: int = 0,
    optimize: bool = True,
    inputs: dict[str, np.ndarray] | str | Path | None = None,
) -> dict[str, Any]:
    """Latency of each model on the same inputs (the first ``batch`` given samples, or valid ones
    drawn as :mod:`redonnx.inputs.model` infers them); runs alternate between models to share noise."""
    models = [load_model(p).model for p in paths]
    sessions = [session(m, optimize=optimize, threads=threads, spin=True) for m in models]
    feeds = bench_feeds(models[0], inputs, shapes, batch)
    times = interleaved_times(sessions, feeds, runs=runs, warmup=warmup)
    rows = []
    for p, ts in zip(paths, times, strict=True):
        ts_ms = sorted(ts)
        rows.append(
            {
                "model": str(p),
                "median_ms": statistics.median(ts_ms),
                "p10_ms": ts_ms[len(ts_ms) // 10],
                "p90_ms": ts_ms[(len(ts_ms) * 9) // 10],
            }
        )
    out: dict[str, Any] = {"runs": runs, "batch": batch, "optimized": optimize, "models": rows}
    if len(rows) == 2:
        out["speedup"] = rows[0]["median_ms"] / rows[1]["median_ms"]
    return out


def bench_feeds(
    model, inputs: dict[str, np.ndarray] | str | Path | None, shapes: dict[str, list[int]] | None, batch: int = 1
) -> dict[str, np.ndarray]:
    """Valid inputs for timing: given samples, or drawn by the inferred input model."""
    from redonnx.inputs.model import infer
    from redonnx.inputs.sizes import settle

    given, shapes, _ = settle(model, inputs, shapes)
    if given is not None:
        return {k: v[:batch] if np.ndim(v) else v for k, v in given.items()}
    return infer(model, shapes).draw(model, shapes, batch=batch, seed=0)


def interleaved_times(
    sessions: list[ort.InferenceSession], feeds: dict[str, np.ndarray], runs: int = 50, warmup: int = 5
) -> list[list[float]]:
    """Milliseconds per run for each session; sessions alternate every run so they share noise."""
    for sess in sessions:
        for _ in range(warmup):
            sess.run(None, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for i, sess in enumerate(sessions):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            times[i].append((time.perf_counter() - t0) * 1000)
    return times


def format_bench(result: dict[str, Any]) -> str:
    lines = [f"onnxruntime CPU, batch {result['batch']}, {result['runs']} runs, medians:"]
    for r in result["models"]:
        lines.append(f"  {r['median_ms']:9.3f} ms  (p10 {r['p10_ms']:.3f}, p90 {r['p90_ms']:.3f})  {r['model']}")
    if "speedup" in result:
        lines.append(f"  speedup of the second over the first: {result['speedup']:.2f}x")
    return "\n".join(lines)
