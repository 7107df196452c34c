"""The prune pipeline: load -> passes -> export -> verify, with a JSON-ready report."""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import redonnx
from redonnx import passes as passes_mod
from redonnx.cost import ModelCost, model_cost
from redonnx.graph import to_graph, to_model
from redonnx.io import LoadedModel, load_model
from redonnx.passes.base import PassContext, PassResult
from redonnx.verify import (
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    DEFAULT_SAMPLES,
    LOSSY_MIN_COSINE,
    LOSSY_RTOL,
    VerificationResult,
    verify,
)


@dataclass
class PruneResult:
    """The rewritten model and everything the report says about it."""

    model: onnx.ModelProto
    source: LoadedModel
    passes: list[PassResult]
    before: ModelCost
    after: ModelCost
    verification: VerificationResult | None
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def modified(self) -> bool:
        return any(p.modified for p in self.passes)

    def report(self) -> dict[str, Any]:
        """The JSON report: sizes before/after, what each pass did and declined, verification."""
        before, after = _sizes(self.source.model, self.before), _sizes(self.model, self.after)
        return {
            "tool": f"redonnx {redonnx.__version__}",
            "input": str(self.source.path) if self.source.path else None,
            "input_shapes": self.before.input_shapes,
            "before": before,
            "after": after,
            "removed": {
                "params": before["params"] - after["params"],
                "params_pct": _pct(before["params"], after["params"]),
                "macs": (before["macs"] - after["macs"]) if before["macs"] is not None else None,
                "macs_pct": _pct(before["macs"], after["macs"]),
            },
            "passes": [p.to_dict() for p in self.passes],
            "verification": self.verification.to_dict() if self.verification is not None else None,
            "notes": self.source.notes + self.notes,
            "seconds": round(self.seconds, 3),
        }

    def summary(self) -> str:
        r = self.report()
        b, a = r["before"], r["after"]
        lines = [p.summary() for p in self.passes]
        lines.append(
            f"parameters {b['params']:,} -> {a['params']:,} ({r['removed']['params_pct']:.1f}% removed); "
            f"MACs {_fmt(b['macs'])} -> {_fmt(a['macs'])} ({_fmt_pct(r['removed']['macs_pct'])} removed)"
        )
        for p in self.passes:
            for d in p.declined[:20]:
                lines.append(f"  declined [{p.name}] {d.op} {d.node}: {d.reason}")
        if self.verification is not None:
            lines.append(self.verification.summary())
        return "\n".join(lines)


def _fmt(v: int | None) -> str:
    return f"{v:,}" if v is not None else "?"


def _fmt_pct(v: float | None) -> str:
    return f"{v:.1f}%" if v is not None else "?"


def _pct(before: int | None, after: int | None) -> float | None:
    if before is None or after is None or before == 0:
        return None
    return round(100.0 * (before - after) / before, 3)


def deflated_size(model: onnx.ModelProto) -> int:
    """Bytes of the serialized model after deflate (zip) compression, the paper's size measure."""
    return len(zlib.compress(model.SerializeToString(), 6))


def _sizes(model: onnx.ModelProto, cost: ModelCost) -> dict[str, Any]:
    return {
        "params": cost.params,
        "macs": cost.macs,
        "bytes": model.ByteSize(),
        "deflated_bytes": deflated_size(model),
        "nodes": len(model.graph.node),
        "ops": cost.ops,
        "layers": [
            {"name": lay.name, "op": lay.op, "weight": lay.weight_shape, "params": lay.params, "macs": lay.macs}
            for lay in cost.layers
        ],
    }


def run_passes(
    model: onnx.ModelProto, names: list[str] | None, exact: bool, options: dict[str, Any] | None = None
) -> tuple[onnx.ModelProto, list[PassResult]]:
    """Apply passes to a copy of ``model``; returns the new model and each pass's result."""
    chosen = passes_mod.resolve(names, exact=exact, options=options)
    graph = to_graph(model)
    ctx = PassContext(opset=int(graph.opset), options=dict(options or {}))
    results = []
    for mod in chosen:
        t0 = time.perf_counter()
        res = mod.run(graph, ctx)
        res.seconds = time.perf_counter() - t0
        results.append(res)
    note = ",".join(m.name for m in chosen)
    return to_model(graph, model, note=note), results


def prune(
    source: LoadedModel | onnx.ModelProto | str | Path,
    *,
    passes: list[str] | None = None,
    exact: bool = False,
    shapes: dict[str, list[int]] | None = None,
    inputs: dict[str, np.ndarray] | str | Path | None = None,
    check: bool = True,
    samples: int = DEFAULT_SAMPLES,
    atol: float | None = None,
    rtol: float | None = None,
    min_cosine: float | None = None,
    options: dict[str, Any] | None = None,
) -> PruneResult:
    """Rewrite a model with the chosen passes and verify it against the original.

    Unset tolerances follow the passes: exact pipelines are held to atol 1e-6 / rtol 1e-4,
    pipelines with a lossy pass to cosine >= 0.99 and rtol 0.5 (see :mod:`redonnx.verify`).
    """
    t0 = time.perf_counter()
    if isinstance(source, onnx.ModelProto):
        source = LoadedModel(model=source)
    elif not isinstance(source, LoadedModel):
        source = load_model(source)
    before = model_cost(source.model, shapes)
    options = {**(options or {}), "shapes": shapes}
    lossy = any(not passes_mod.is_exact(m, options) for m in passes_mod.resolve(passes, exact=exact, options=options))
    atol = DEFAULT_ATOL if atol is None else atol
    rtol = (LOSSY_RTOL if lossy else DEFAULT_RTOL) if rtol is None else rtol
    if min_cosine is None and lossy:
        min_cosine = LOSSY_MIN_COSINE
    model, results = run_passes(source.model, passes, exact, options)
    after = model_cost(model, shapes)
    verification = None
    if check:
        verification = verify(
            source.model,
            model,
            inputs=inputs,
            shapes=shapes,
            samples=samples,
            atol=atol,
            rtol=rtol,
            min_cosine=min_cosine,
        )
    return PruneResult(
        model=model,
        source=source,
        passes=results,
        before=before,
        after=after,
        verification=verification,
        seconds=time.perf_counter() - t0,
    )
