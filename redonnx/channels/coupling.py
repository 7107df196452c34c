"""Channel dependency analysis: which channels of which tensors must change together.

Every tensor that carries channels (the output of a Conv, ConvTranspose, Gemm or MatMul layer, and
whatever flows from it) gets a *space* of C channel elements. Elements are joined (union-find)
when they must be merged or removed together:

- element-wise and per-channel ops (activations, BatchNormalization, per-channel constant
  Mul/Add/Sub/Div, PRelu, pooling, spatial Pad/Slice, Resize by scales, Transpose, Cast,
  Identity/Dropout) join input channel c with output channel c;
- Add/Sub/Mul/Div/Max/Min of two activations (residual connections, squeeze-and-excitation
  gates) join both inputs' channel c with the output's channel c;
- Concat joins input k's channel c with output channel offset_k + c; Split, channel Slice and
  channel Pad do the same with their offsets (padded channels are constant zero sources);
- a depthwise Conv joins input channel c with output channel c (its kernel is a per-channel
  parameter).

A *class* is a set of joined elements. What defines a class's values (its *sources*: layer rows,
per-channel parameters, zero padding) and where it is read linearly (its *sinks*: consumer
columns, also through Flatten with the channel-major expansion) are recorded per tensor. Classes
that touch anything else (graph inputs and outputs, unknown ops, grouped convs, Shape, reductions
over channels) are *pinned*, with the reason: never guessed, never changed.

The data (:class:`ChannelGraph`) is in :mod:`redonnx.channels.graph`, the per-op rules in
:mod:`redonnx.channels.rules` and :mod:`redonnx.channels.layout`; this module walks the graph and
pins what they do not model.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from redonnx.channels.graph import ChannelGraph, Space
from redonnx.channels.graph import Item as Item
from redonnx.channels.layout import _concat, _flatten, _pad, _reduce, _resize, _slice, _split, _transpose
from redonnx.channels.layout import slice_params as slice_params
from redonnx.channels.rules import _binary, _pass_through, _per_channel_op, _visit_layer

LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
UNARY = {
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Softplus",
    "Softsign", "Gelu", "Mish", "Erf", "Identity", "Dropout", "Cast", "Neg", "Abs", "Exp", "Sqrt",
    "Reciprocal", "Floor", "Ceil", "Round", "Sign", "ThresholdedRelu", "Celu",
}  # fmt: skip
SPATIAL = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Pow"}  # Pow: x^3 of GELU's tanh form
#: activations onnxruntime's transformer optimizer writes (com.microsoft), with an optional
#: per-channel bias input
FUSED_ACTIVATIONS = {"FastGelu", "BiasGelu", "QuickGelu"}
#: ops that normalize over the channels (a transformer's residual stream): they pin what they read and write
NORMS = {"LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization", "RMSNormalization",
         "SkipSimplifiedLayerNormalization"}  # fmt: skip


# -------------------------------------------------------------------- building


def analyze(graph: gs.Graph) -> ChannelGraph:
    """Build the channel graph of ``graph`` (shapes should be annotated first)."""
    cg = ChannelGraph(graph)
    graph.toposort(recurse_subgraphs=False)
    for node in graph.nodes:
        _visit(cg, node)
    for name, sp in list(cg.spaces.items()):
        _check_readers(cg, graph, name, sp)
    return cg


def _visit(cg: ChannelGraph, node: gs.Node) -> None:
    op = node.op
    if op in LAYERS:
        _visit_layer(cg, node)
    elif op in UNARY or op in SPATIAL or op == "Clip":
        _pass_through(cg, node)
    elif op in ("BatchNormalization", "InstanceNormalization", "PRelu") or op in FUSED_ACTIVATIONS:
        _per_channel_op(cg, node)  # onnxruntime's FastGelu/BiasGelu(x, bias): bias cut with the channels
    elif op in BINARY:
        _binary(cg, node)
    elif op == "Concat":
        _concat(cg, node)
    elif op == "Split":
        _split(cg, node)
    elif op == "Slice":
        _slice(cg, node)
    elif op == "Pad":
        _pad(cg, node)
    elif op == "Transpose":
        _transpose(cg, node)
    elif op == "Resize" or op == "Upsample":
        _resize(cg, node)
    elif op in ("ReduceMean", "ReduceMax", "ReduceSum", "ReduceMin"):
        _reduce(cg, node)
    elif op in ("Flatten", "Reshape"):
        _flatten(cg, node)


def _check_readers(cg: ChannelGraph, graph: gs.Graph, name: str, sp: Space) -> None:
    """Pin a tensor read by anything we did not model, or that enters or leaves the graph."""
    t = sp.tensor
    if any(x is t for x in graph.inputs):
        cg.pin_tensor(name, f"{name} is a graph input")
    if any(x is t for x in graph.outputs):
        cg.pin_tensor(name, f"{name} is a graph output")
    if name not in cg.made:
        what = f"{t.inputs[0].op} {t.inputs[0].name!r}" if t.inputs else "no node"
        if t.inputs and t.inputs[0].op in NORMS:
            cg.pin_tensor(name, f"{name} is normalized over its channels by {what}: the residual stream keeps "
                                "its width")  # fmt: skip
        else:
            cg.pin_tensor(name, f"{name} is produced by {what}, which is not modelled")
    main = {id(n) for n in graph.nodes}
    for reader in {id(n): n for n in t.outputs}.values():
        if id(reader) not in main:
            cg.pin_tensor(name, f"{name} is read inside a subgraph")
        elif name not in cg.read.get(id(reader), ()) and reader.op in NORMS:
            cg.pin_tensor(name, f"{name} is normalized over its channels by {reader.op} {reader.name!r}: the "
                                "residual stream keeps its width")  # fmt: skip
        elif name not in cg.read.get(id(reader), ()):
            cg.pin_tensor(name, f"{name} is read by {reader.op} {reader.name!r}, which is not modelled")
