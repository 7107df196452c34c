"""Small helpers beside onnx-graphsurgeon's ``Graph`` (the IR): import, export, lookups.

``to_graph`` turns a loaded model into a ``gs.Graph`` and treats Constant nodes (paddle2onnx,
old PyTorch) like initializers; ``to_model`` writes it back keeping the source model's identity:
IR version, opset imports, metadata, local functions, and initializers listed as graph inputs
where IR < 4 requires them.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

import redonnx
from redonnx.errors import RedonnxError
from redonnx.io import weights

LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """Import ``model`` as a gs.Graph with Constant nodes lifted into constants."""
    try:
        graph = gs.import_onnx(model)
    except Exception as exc:  # gs raises bare exceptions on exotic input
        raise RedonnxError(f"cannot import the graph: {exc}") from None
    weights.lift_external(graph, weights.external_base(model))
    lift_constant_nodes(graph)
    _own_attribute_tensors(graph)
    return graph


def _own_attribute_tensors(graph: gs.Graph) -> None:
    """Give tensor-valued attributes (ConstantOfShape's value; Constant nodes left after lifting)
    their own copy of the proto: gs keeps the model's own one and its exporter writes the tensor's
    name into it, so every export would change the caller's model (an empty name set: two bytes)."""
    for g in weights.all_graphs(graph):
        for node in g.nodes:
            for value in node.attrs.values():
                if isinstance(value, gs.Constant) and isinstance(value._values, LazyValues):
                    own = onnx.TensorProto()
                    own.CopyFrom(value._values.tensor)
                    value._values.tensor = own


def export(graph: gs.Graph, lean: bool = False, **kw) -> onnx.ModelProto:
    """``gs.export_onnx``; lean (weights in scratch data files, see :mod:`redonnx.io.weights`) when
    asked, or when the graph reads weights from disk or holds more than ``weights.LEAN_BYTES``."""
    if lean or weights.is_lean_graph(graph):
        return weights.export_lean(graph, lambda g: gs.export_onnx(g, do_type_check=False, **kw))
    return gs.export_onnx(graph, do_type_check=False, **kw)


def lift_constant_nodes(graph: gs.Graph) -> int:
    """Replace main-graph Constant nodes by gs.Constant tensors; returns how many were lifted."""
    outputs = {id(t) for t in graph.outputs}
    lifted = 0
    for node in list(graph.nodes):
        if node.op != "Constant" or len(node.outputs) != 1 or id(node.outputs[0]) in outputs:
            continue
        value = _constant_node_value(node)
        if value is None:
            continue
        var = node.outputs[0]
        const = gs.Constant(var.name, np.asarray(value))
        replace_uses(var, const)
        node.outputs.clear()
        lifted += 1
    if lifted:
        graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=False)
    return lifted


def _constant_node_value(node: gs.Node) -> np.ndarray | None:
    attrs = node.attrs
    if "value" in attrs and isinstance(attrs["value"], gs.Constant):
        return attrs["value"].values
    scalars = {
        "value_float": np.float32,
        "value_floats": np.float32,
        "value_int": np.int64,
        "value_ints": np.int64,
    }
    for key, dtype in scalars.items():
        if key in attrs:
            return np.asarray(attrs[key], dtype=dtype)
    return None


def to_model(graph: gs.Graph, source: onnx.ModelProto, note: str = "") -> onnx.ModelProto:
    """Export ``graph`` keeping ``source``'s IR version, opsets, metadata and functions."""
    graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=False).toposort(recurse_subgraphs=False)
    lean_source = weights.external_base(source) is not None  # a large model stays lean through the pipeline
    model = export(graph, lean=lean_source, opset_imports=list(source.opset_import))
    lean = {p.key: p.value for p in model.metadata_props if p.key in (weights.BASE_KEY, weights.SPILL_KEY)}
    model.ir_version = source.ir_version
    model.producer_name = source.producer_name
    model.producer_version = source.producer_version
    model.domain = source.domain
    model.model_version = source.model_version
    model.doc_string = source.doc_string
    del model.functions[:]
    model.functions.extend(source.functions)
    del model.metadata_props[:]
    for prop in source.metadata_props:
        if prop.key not in ("redonnx", weights.BASE_KEY, weights.SPILL_KEY):
            model.metadata_props.append(prop)
    tag = f"redonnx {redonnx.__version__}" + (f": {note}" if note else "")
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, "redonnx": tag, **lean})
    _drop_intermediate_value_info(model)
    if model.ir_version < 4:
        _list_initializers_as_inputs(model.graph)
    return model


def _drop_intermediate_value_info(model: onnx.ModelProto) -> None:
    """Shapes of rewritten tensors may be stale; onnxruntime re-infers them."""
    del model.graph.value_info[:]


def _list_initializers_as_inputs(graph: onnx.GraphProto) -> None:
    listed = {i.name for i in graph.input}
    for init in graph.initializer:
        if init.name not in listed:
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))


# ---------------------------------------------------------------- lookups used by passes


def const_value(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The value of a constant tensor, or None when it is computed at run time."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    return None


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor for t in graph.outputs)


def readers(tensor: gs.Tensor) -> list[gs.Node]:
    """Nodes that read ``tensor`` (each once)."""
    seen: dict[int, gs.Node] = {}
    for node in tensor.outputs:
        seen.setdefault(id(node), node)
    return list(seen.values())


def sole_reader(graph: gs.Graph, tensor: gs.Tensor) -> gs.Node | None:
    """The only node reading ``tensor``, if it is read once and is not a graph output."""
    rs = readers(tensor)
    if len(rs) != 1 or is_graph_output(graph, tensor):
        return None
    return rs[0]


def shared_constant(tensor: gs.Tensor) -> bool:
    """True when a constant feeds more than one node input (rewriting it would change others)."""
    return isinstance(tensor, gs.Constant) and len(tensor.outputs) > 1


def replace_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every reader of ``old`` read ``new`` instead."""
    for node in list(old.outputs):
        for i, t in enumerate(node.inputs):
            if t is old:
                node.inputs[i] = new


def tensor_map(graph: gs.Graph) -> dict[str, gs.Tensor]:
    """``graph.tensors()`` (every named tensor the main graph uses, by name, in node order; a later
    tensor of a name replaces an earlier one) without its per-tensor duplicate check and list copies:
    a third of its time, and the passes ask for it many times per run."""
    out: dict[str, gs.Tensor] = {}
    for t in graph.inputs:
        if t.name:
            out[t.name] = t
    for node in graph.nodes:
        for t in node.inputs:
            if t.name:
                out[t.name] = t
        for t in node.outputs:
            if t.name:
                out[t.name] = t
    for t in graph.outputs:
        if t.name:
            out[t.name] = t
    return out


def new_constant(graph: gs.Graph, base: str, values: np.ndarray) -> gs.Constant:
    """A fresh constant with a unique name derived from ``base``."""
    names = tensor_map(graph)
    name, k = base, 0
    while name in names:
        k += 1
        name = f"{base}_{k}"
    return gs.Constant(name, np.asarray(values, order="C"))


_fresh = itertools.count()


def fresh_name(base: str) -> str:
    """A tensor or node name derived from ``base`` that no exporter writes."""
    return f"{base}_r{next(_fresh)}"


def set_input_values(node: gs.Node, index: int, values: np.ndarray) -> None:
    """Give ``node`` new constant values at input ``index``; a constant others read is copied first."""
    t = node.inputs[index]
    values = np.asarray(values, order="C")
    if len(t.outputs) > 1:
        node.inputs[index] = gs.Constant(fresh_name(t.name), values)
    else:
        t.values = values


def add_to_bias(graph: gs.Graph, node: gs.Node, delta: np.ndarray) -> None:
    """Add ``delta`` (one value per output channel) to a Conv, ConvTranspose or Gemm bias, creating
    it if needed (Gemm's beta is folded in). MatMul has no bias input: its bias is the constant Add
    that follows, or a new Add."""
    if node.op == "MatMul":
        _add_matmul_bias(graph, node, delta)
        return
    w = node.inputs[1]
    old = const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    base = np.zeros_like(delta) if old is None else np.broadcast_to(old.astype(np.float64).reshape(-1), delta.shape)
    if node.op == "Gemm":
        base = base * float(node.attrs.get("beta", 1.0))
        node.attrs["beta"] = 1.0
    new = (base + delta).astype(w.values.dtype)
    if old is None:
        bias = gs.Constant(fresh_name(f"{w.name}_bias"), new)
        if len(node.inputs) > 2:  # an empty optional input
            node.inputs[2] = bias
        else:
            node.inputs.append(bias)
    else:
        set_input_values(node, 2, new)


def _add_matmul_bias(graph: gs.Graph, node: gs.Node, delta: np.ndarray) -> None:
    out = node.outputs[0]
    rs = readers(out)
    if len(rs) == 1 and rs[0].op == "Add" and not is_graph_output(graph, out):
        add = rs[0]
        j = 1 if add.inputs[0] is out else 0
        old = const_value(add.inputs[j])
        if old is not None and old.size == delta.size and old.ndim <= 1:
            set_input_values(add, j, (old.astype(np.float64) + delta).astype(old.dtype))
            return
    mid = gs.Variable(fresh_name(f"{out.name}_unbiased"), dtype=out.dtype)
    node.outputs[0] = mid
    bias = gs.Constant(fresh_name(f"{node.inputs[1].name}_bias"), delta.astype(node.inputs[1].values.dtype))
    graph.nodes.append(gs.Node("Add", fresh_name(f"{node.name}_bias"), inputs=[mid, bias], outputs=[out]))
