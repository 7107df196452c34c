"""Parameter and multiply-accumulate (MAC) counts per layer, op histogram, candidate layers.

MACs per layer (N = batch, from the input shapes, batch 1 unless given):
- Conv: prod(output shape) * (C_in / group) * prod(kernel)
- ConvTranspose: prod(input shape) * (C_out / group) * prod(kernel)
- Gemm: N * M * K;  MatMul: prod(output shape) * K
Parameters: elements of a layer's constant weight and bias; the model total counts every
floating-point constant the graph reads (BatchNorm statistics included) except scalars, which are
hyper-parameters such as Clip bounds.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from redonnx.errors import RedonnxError
from redonnx.inputs.shapes import graph_shapes, infer_shapes, resolve_input_shapes
from redonnx.io.graph import tensor_map, to_graph

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "ConvInteger", "MatMulInteger")
_AS = {"ConvInteger": "Conv", "MatMulInteger": "MatMul"}  # dynamic quantization: same shapes and MACs


@dataclass
class LayerCost:
    name: str
    op: str
    weight_shape: list[int]
    params: int
    macs: int | None
    groups: int = 1
    candidate: bool = False
    note: str = ""
    origin: str = ""  # what the layer is across rewrites: see :func:`layer_origin`


@dataclass
class ModelCost:
    layers: list[LayerCost]
    params: int
    macs: int | None
    ops: dict[str, int]
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_cost(model: onnx.ModelProto, shapes: dict[str, list[int]] | None = None) -> ModelCost:
    """Count parameters and MACs of ``model`` (batch 1 unless ``shapes`` says otherwise)."""
    return cost_and_shapes(model, shapes)[0]


def cost_and_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]] | None = None) -> tuple[ModelCost, dict]:
    """:func:`model_cost`, and the tensor shapes it counted with (the folded graph's at the
    concrete input shapes: what the cost model needs where the model's own are symbolic)."""
    notes: list[str] = []
    try:
        concrete = resolve_input_shapes(model, shapes, batch=1)
    except RedonnxError as exc:
        concrete = {}
        notes.append(f"MACs unknown: {exc}")
    graph, inferred = folded_graph(model, concrete)
    layers = [_layer_cost(node, inferred) for node in graph.nodes if node.op in LAYER_OPS]
    macs_known = bool(concrete) and all(layer.macs is not None for layer in layers)
    if concrete and not macs_known:
        notes.append("some layer shapes could not be inferred: their MACs are not counted")
    cost = ModelCost(
        layers=layers,
        params=_total_params(graph),
        macs=sum(layer.macs or 0 for layer in layers) if macs_known else None,
        ops=dict(Counter(n.op_type for n in model.graph.node).most_common()),
        input_shapes=concrete,
        notes=notes,
    )
    return cost, inferred


def folded_graph(model: onnx.ModelProto, concrete: dict[str, list[int]]) -> tuple[gs.Graph, dict]:
    """The graph with constants folded (at fixed input shapes if given) and its tensor shapes.

    Folding first makes weights computed from constants (CNTK's Reshape of a parameter) count as
    weights, and resolves Shape -> Reshape arithmetic so every layer's output shape is known.
    """
    from redonnx.passes.fold_constants import FoldConstants

    graph = to_graph(model)
    for t in graph.inputs:
        if isinstance(t, gs.Variable) and t.name in concrete:
            t.shape = list(concrete[t.name])
    FoldConstants()(graph)
    shapes = graph_shapes(graph)
    return graph, shapes or infer_shapes(model)


def _total_params(graph: gs.Graph) -> int:
    total = 0
    for t in tensor_map(graph).values():
        size = int(np.prod(t.shape)) if isinstance(t, gs.Constant) else 0
        if size > 1 and t.outputs and _is_weight_dtype(t.dtype):
            total += size
    return total


def _is_weight_dtype(dtype: Any) -> bool:
    """Floats, and 8-bit integers (quantized weights); not int64 shapes or indices."""
    try:
        d = np.dtype(dtype)
    except TypeError:
        return False
    return d.kind == "f" or (d.kind in "iu" and d.itemsize == 1)


def _known(shape: list | None) -> list[int] | None:
    if shape is None or any(not isinstance(d, int) or d <= 0 for d in shape):
        return None
    return [int(d) for d in shape]


def _stored(t: gs.Tensor | None) -> gs.Constant | None:
    """The constant a layer input holds: itself, or the quantized constant a DequantizeLinear reads
    (a QDQ model's weights and biases: int8 and int32, scaled back at run time)."""
    if isinstance(t, gs.Constant):
        return t
    producer = t.inputs[0] if t is not None and len(t.inputs) == 1 else None
    if producer is not None and producer.op == "DequantizeLinear" and isinstance(producer.inputs[0], gs.Constant):
        return producer.inputs[0]
    return None


def _layer_cost(node: gs.Node, shapes: dict[str, list]) -> LayerCost:
    w = node.inputs[1] if len(node.inputs) > 1 else None
    const_w = isinstance(w, gs.Constant)
    stored_w = _stored(w)
    biases = node.inputs[2:3] if node.op in ("Conv", "ConvTranspose", "Gemm") else []
    params = sum(int(np.prod(t.shape)) for t in [stored_w, *map(_stored, biases)] if t is not None)
    wshape = [int(d) for d in stored_w.shape] if stored_w is not None else []
    out = _known(shapes.get(node.outputs[0].name)) if node.outputs else None
    inp = _known(shapes.get(node.inputs[0].name)) if node.inputs else None
    wsh = wshape or _known(shapes.get(w.name)) if w is not None else None
    macs = _macs(node, wsh, inp, out)
    groups = int(node.attrs.get("group", 1))
    layer = LayerCost(
        name=node.name or node.outputs[0].name,
        op=node.op,
        weight_shape=wshape,
        params=params,
        macs=macs,
        groups=groups,
        candidate=const_w,
        origin=layer_origin(node),
    )
    if _AS.get(node.op, node.op) == "Conv" and wshape and groups > 1:
        layer.note = "depthwise" if groups == wshape[0] and wshape[1] == 1 else f"grouped ({groups})"
    if stored_w is None:
        layer.note = "weight computed at run time"
    elif not const_w:
        layer.note = f"{np.dtype(stored_w.dtype).name} weights" + (f", {layer.note}" if layer.note else "")
    return layer


def layer_origin(node: gs.Node) -> str:
    """The layer's identity across rewrites: its node's name, or for an unnamed node (PyTorch 1.2
    exports) its constant weight's name, copies' suffixes dropped: folding BatchNorm hands the
    layer the BatchNorm's output tensor, so the output's name does not follow the layer."""
    if node.name:
        return node.name
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if isinstance(w, gs.Constant) and w.name:
        return re.sub(r"(_r\d+)+$", "", w.name)  # graph.fresh_name: a shared weight copied before a change
    return node.outputs[0].name if node.outputs else ""


def _macs(node: gs.Node, w: list[int] | None, inp: list[int] | None, out: list[int] | None) -> int | None:
    op = _AS.get(node.op, node.op)
    if not w:
        if op == "MatMul" and inp and out:
            return int(np.prod(out)) * inp[-1]
        return None
    if op == "Conv":
        return int(np.prod(out)) * int(np.prod(w[1:])) if out else None
    if op == "ConvTranspose":
        return int(np.prod(inp)) * int(np.prod(w[1:])) if inp else None
    if op == "Gemm":
        k = w[1] if node.attrs.get("transB", 0) else w[0]
        return int(np.prod(out)) * k if out else None
    return int(np.prod(out)) * w[0] if out else None


def format_cost(cost: ModelCost, top: int = 0) -> str:
    """Human-readable table."""
    rows = [f"{'layer':40s} {'op':14s} {'weight':>20s} {'params':>10s} {'MACs':>14s}"]
    layers = sorted(cost.layers, key=lambda x: -(x.macs or 0))[:top] if top else cost.layers
    for layer in layers:
        macs = f"{layer.macs:,}" if layer.macs is not None else "?"
        op = layer.op + (f"/{layer.note}" if layer.note in ("depthwise",) else "")
        rows.append(
            f"{layer.name[:40]:40s} {op:14s} {'x'.join(map(str, layer.weight_shape)) or '-':>20s} "
            f"{layer.params:>10,} {macs:>14s}"
        )
    macs = f"{cost.macs:,}" if cost.macs is not None else "unknown"
    rows.append(f"total: {cost.params:,} parameters, {macs} MACs at input shapes {cost.input_shapes}")
    rows.append("ops: " + ", ".join(f"{k} {v}" for k, v in cost.ops.items()))
    n_cand = sum(layer.candidate for layer in cost.layers)
    rows.append(f"candidate layers (constant weights): {n_cand} of {len(cost.layers)}")
    rows += [f"note: {n}" for n in cost.notes]
    return "\n".join(rows)
