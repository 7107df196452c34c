"""Function-preserving widening of real models (test helper, independent of redonnx's passes).

A copied channel duplicates a producer row (and depthwise kernel) and splits each consumer
column between the original and the copy; a dead channel has zero weights and a negative bias
before a ReLU/ReLU6, so it reads as zero whatever its consumer columns are. Outputs are unchanged.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs


def _node(graph: gs.Graph, name: str) -> gs.Node:
    return next(n for n in graph.nodes if n.name == name)


def _set(t: gs.Constant, values: np.ndarray) -> None:
    t.values = np.asarray(values.astype(t.values.dtype), order="C")


def widen(
    model: onnx.ModelProto,
    producers: list[str],
    consumers: list[str],
    src: int,
    dead: bool = False,
    depthwise: list[str] = (),
    pads: list[str] = (),
    frac: float = 0.3,
    seed: int = 0,
) -> onnx.ModelProto:
    """Append one channel to the given producers' outputs; return the new model."""
    rng = np.random.default_rng(seed)
    graph = gs.import_onnx(model)
    for name in producers:
        n = _node(graph, name)
        w, b = n.inputs[1], n.inputs[2]
        row = np.zeros_like(w.values[src : src + 1]) if dead else w.values[src : src + 1]
        _set(w, np.concatenate([w.values, row]))
        _set(b, np.concatenate([b.values, [-0.5] if dead else b.values[src : src + 1]]))
    for name in depthwise:
        n = _node(graph, name)
        w, b = n.inputs[1], n.inputs[2]
        _set(w, np.concatenate([w.values, w.values[src : src + 1]]))
        _set(b, np.concatenate([b.values, [0.0] if dead else b.values[src : src + 1]]))
        n.attrs["group"] = int(n.attrs["group"]) + 1
    for name in pads:
        n = _node(graph, name)
        p = np.array(n.inputs[1].values)
        p[1 + len(p) // 2] += 1  # one more zero channel after the data
        n.inputs[1] = gs.Constant(f"{n.inputs[1].name}_widened", p)
    for name in consumers:
        n = _node(graph, name)
        w = n.inputs[1]
        axis = 1  # Conv [out, in, ...]; Gemm with transB=1 [out, in]
        col = np.take(w.values, [src], axis=axis)
        if dead:
            new = rng.standard_normal(col.shape).astype(col.dtype)
            _set(w, np.concatenate([w.values, new], axis=axis))
        else:
            values = np.array(w.values)
            idx = [slice(None)] * values.ndim
            idx[axis] = src
            values[tuple(idx)] *= 1 - frac
            _set(w, np.concatenate([values, col * frac], axis=axis))
    for t in graph.tensors().values():
        if isinstance(t, gs.Variable) and t not in graph.inputs and t not in graph.outputs:
            t.shape = None
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = model.ir_version
    del out.graph.value_info[:]
    return out
