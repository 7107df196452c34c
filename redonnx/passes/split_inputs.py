"""split-inputs: compute each distinct product once (RED++ input splitting). Exact.

After hashing, input feature i of a Gemm/MatMul y = x W (W [K, M]) meets only D_i distinct
values among W[i, :]. Every product x_i w_io is then one of D_i products, so

    P[n, i, d] = x[n, i] * V[i, d]          (sum_i D_i multiplications instead of K M)
    y[n, o]    = sum_i P[n, i, code(i, o)]  (a Gather and a ReduceSum: additions only)

with V the distinct values (zero-padded to the largest D_i) and code(i, o) the index of w_io in
V[i]. In ONNX: Unsqueeze, Mul, Reshape, Gather, Reshape, ReduceSum (+ Add for the bias), all
standard ops of the model's opset. Convolutions are not split here: distinct kernels per input
channel are a low-rank case that separate-depthwise already rewrites.

Fewer multiplications are not faster on every runtime: a tuned GEMM beats gather-and-sum easily.
With ``split_check_latency`` (default on) each candidate layer is timed alone in onnxruntime,
original against split, and kept only when the split form is faster at batch 1 and 32; the
report gives the multiplications removed and the measured ratio either way.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from redonnx.inputs.shapes import annotate_graph
from redonnx.io.graph import const_value
from redonnx.passes.base import Pass, PassContext, PassResult

_ids = itertools.count()


def codebook(w_km: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """V [K, Dmax] distinct values per input row (zero padded), codes [M, K], and D_i."""
    k, m = w_km.shape
    rows = [np.unique(w_km[i], return_inverse=True) for i in range(k)]
    dmax = max(len(u) for u, _ in rows)
    v = np.zeros((k, dmax), w_km.dtype)
    codes = np.zeros((m, k), np.int64)
    for i, (u, inv) in enumerate(rows):
        v[i, : len(u)] = u
        codes[:, i] = i * dmax + inv
    return v, codes, [int(np.count_nonzero(u)) for u, _ in rows]


@dataclass
class SplitInputs(Pass):
    """RED++ input splitting of hashed Gemm/MatMul layers (exact)."""

    name: ClassVar[str] = "split-inputs"
    check_latency: bool = True  # keep a split only where onnxruntime runs it faster

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        res = self.result()
        annotate_graph(graph)
        for node in list(graph.nodes):
            plan = _match(node)
            if isinstance(plan, str):
                if plan != "skip":
                    res.decline(node, plan)
                continue
            w_km, alpha = plan
            v, codes, d = codebook(w_km)
            before, after = int(np.count_nonzero(w_km)), int(sum(d))
            record = {"layer": node.name, "K": w_km.shape[0], "M": w_km.shape[1], "mults_before": before,
                      "mults_after": after, "max_distinct": v.shape[1]}  # fmt: skip
            if after >= before:
                res.decline(node, f"every input meets {v.shape[1]} distinct values: no multiplication saved")
                continue
            if self.check_latency:
                ratio = _latency_ratio(w_km, v * alpha, codes, graph.opset)
                record["split_over_original_latency"] = ratio
                if ratio >= 1.0:
                    res.decline(node, f"{before - after} multiplications saved, but {ratio:.1f}x slower in onnxruntime")
                    res.layers.append({**record, "kept": False})
                    continue
            _rewrite(graph, node, v * alpha, codes)
            res.count("layers split")
            res.count("multiplications removed per sample", before - after)
            res.layers.append({**record, "kept": True})
        graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=False)
        return res


def _match(node: gs.Node) -> tuple[np.ndarray, float] | str:
    if node.op not in ("Gemm", "MatMul"):
        return "skip"
    w = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or w.ndim != 2 or w.dtype.kind != "f":
        return "skip"
    x = node.inputs[0]
    if node.op == "MatMul" and (x.shape is None or len(x.shape) != 2):
        return "input rank is not known to be 2"
    if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
        return "transposed input"
    if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name and const_value(node.inputs[2]) is None:
        return "bias is not constant"
    w_km = w.T if node.op == "Gemm" and int(node.attrs.get("transB", 0)) else w
    alpha = float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0
    return np.ascontiguousarray(w_km), alpha


def _nodes(x: gs.Tensor, out: gs.Tensor, v: np.ndarray, codes: np.ndarray, opset: int, tag: str) -> list[gs.Node]:
    """Unsqueeze -> Mul -> Reshape -> Gather -> Reshape -> ReduceSum, writing ``out``."""
    m, k = codes.shape
    t = [gs.Variable(f"{tag}_{s}", dtype=v.dtype) for s in ("col", "prod", "flat", "picked", "grid")]
    axes2 = gs.Constant(f"{tag}_axes", np.array([2], np.int64))
    unsq = (
        gs.Node("Unsqueeze", f"{tag}_unsqueeze", {}, [x, axes2], [t[0]])
        if opset >= 13
        else gs.Node("Unsqueeze", f"{tag}_unsqueeze", {"axes": [2]}, [x], [t[0]])
    )
    red = (
        gs.Node("ReduceSum", f"{tag}_sum", {"keepdims": 0}, [t[4], axes2], [out])
        if opset >= 13
        else gs.Node("ReduceSum", f"{tag}_sum", {"keepdims": 0, "axes": [2]}, [t[4]], [out])
    )
    return [
        unsq,
        gs.Node("Mul", f"{tag}_mul", {}, [t[0], gs.Constant(f"{tag}_values", v)], [t[1]]),
        gs.Node("Reshape", f"{tag}_flat", {}, [t[1], gs.Constant(f"{tag}_s1", np.array([0, -1], np.int64))], [t[2]]),
        gs.Node("Gather", f"{tag}_gather", {"axis": 1}, [t[2], gs.Constant(f"{tag}_codes", codes.reshape(-1))], [t[3]]),
        gs.Node("Reshape", f"{tag}_grid", {}, [t[3], gs.Constant(f"{tag}_s2", np.array([0, m, k], np.int64))], [t[4]]),
        red,
    ]


def _rewrite(graph: gs.Graph, node: gs.Node, v: np.ndarray, codes: np.ndarray) -> None:
    tag = f"{node.name or node.outputs[0].name}_split{next(_ids)}"
    out = node.outputs[0]
    bias = None
    if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name:
        bias = const_value(node.inputs[2]) * float(node.attrs.get("beta", 1.0))
    target = gs.Variable(f"{tag}_nobias", dtype=out.dtype) if bias is not None else out
    graph.nodes.extend(_nodes(node.inputs[0], target, v, codes, int(graph.opset), tag))
    if bias is not None:
        c = gs.Constant(f"{tag}_bias", bias.astype(v.dtype))
        graph.nodes.append(gs.Node("Add", f"{tag}_bias", {}, [target, c], [out]))
    node.inputs.clear()
    node.outputs.clear()


def _latency_ratio(w_km: np.ndarray, v: np.ndarray, codes: np.ndarray, opset: int) -> float:
    """Median time of the split layer over the original MatMul, worst of batch 1 and 32."""
    from redonnx.measure.bench import interleaved_times
    from redonnx.measure.runtime import session

    k, m = w_km.shape
    models = []
    for split in (False, True):
        x = gs.Variable("x", dtype=np.float32, shape=["n", k])
        y = gs.Variable("y", dtype=np.float32, shape=["n", m])
        nodes = (
            _nodes(x, y, v.astype(np.float32), codes, 13, "s")
            if split
            else [gs.Node("MatMul", "mm", {}, [x, gs.Constant("w", w_km.astype(np.float32))], [y])]
        )
        g = gs.Graph(nodes=nodes, inputs=[x], outputs=[y], opset=13)
        model = gs.export_onnx(g)
        model.ir_version = 8  # any onnxruntime reads it; opset <= 17 here
        models.append(session(model, optimize=True))
    worst = 0.0
    for batch in (1, 32):
        feeds = {"x": np.random.default_rng(0).standard_normal((batch, k)).astype(np.float32)}
        t = interleaved_times(models, feeds, runs=30, warmup=3)
        worst = max(worst, float(np.median(t[1]) / np.median(t[0])))
    return worst
