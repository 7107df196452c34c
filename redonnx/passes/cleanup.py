"""cleanup: remove what cannot change any output.

Rewrites (all exact):
- Identity, and Dropout in inference (mask unused, no training flag), are bypassed: their
  readers read the input directly. A node whose output is a graph output keeps that name by
  renaming its producer's output instead, when that producer is a plain node.
- Initializers with the same dtype, shape and bytes are shared: y = f(A), z = g(A') with A == A'
  bitwise is the same computation.
- Nodes and initializers that no graph output depends on are removed.
If/Loop/Scan bodies are left untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from redonnx.io import weights
from redonnx.io.graph import const_value, is_graph_output, replace_uses, tensor_map
from redonnx.passes.base import Pass, PassContext, PassResult


@dataclass
class Cleanup(Pass):
    """Bypasses Identity and inference Dropout, shares duplicate initializers, removes dead nodes (exact)."""

    name: ClassVar[str] = "cleanup"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        res = self.result()
        for node in list(graph.nodes):
            if node.op in ("Identity", "Dropout"):
                reason = _bypass_reason(graph, node)
                if reason:
                    res.decline(node, reason)
                else:
                    _bypass(graph, node)
                    res.count(f"{node.op} removed")
        res.count("duplicate initializers shared", _share_duplicates(graph))
        before_nodes, before_consts = len(graph.nodes), _n_constants(graph)
        graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=False)
        res.count("unused nodes removed", before_nodes - len(graph.nodes))
        res.count("unused initializers removed", max(0, before_consts - _n_constants(graph)))
        return res


def _n_constants(graph: gs.Graph) -> int:
    return sum(isinstance(t, gs.Constant) for t in tensor_map(graph).values())


def _bypass_reason(graph: gs.Graph, node: gs.Node) -> str | None:
    if not node.inputs or not node.outputs:
        return "no input or output"
    if node.op == "Dropout":
        if len(node.outputs) > 1 and node.outputs[1].outputs:
            return "dropout mask is used"
        if len(node.outputs) > 1 and is_graph_output(graph, node.outputs[1]):
            return "dropout mask is a graph output"
        if len(node.inputs) > 2 and node.inputs[2].name:
            flag = const_value(node.inputs[2])
            if flag is None or bool(np.any(flag)):
                return "training_mode is set or not constant"
        if node.attrs.get("is_test", 1) == 0:
            return "is_test = 0 (training mode)"
    src, out = node.inputs[0], node.outputs[0]
    if is_graph_output(graph, out):
        if isinstance(src, gs.Constant) or not src.inputs or is_graph_output(graph, src):
            return "its output is a graph output fed by an input, a constant or another output"
        if any(n is not node for n in src.outputs):
            return "its output is a graph output and its input has other readers"
    return None


def _bypass(graph: gs.Graph, node: gs.Node) -> None:
    src, out = node.inputs[0], node.outputs[0]
    if is_graph_output(graph, out):
        # Keep the graph output's name: the producer writes ``out`` directly.
        producer = src.inputs[0]
        for i, t in enumerate(producer.outputs):
            if t is src:
                producer.outputs[i] = out
        node.inputs.clear()
        node.outputs.clear()
        return
    node.inputs.clear()
    node.outputs.clear()
    replace_uses(out, src)


def _share_duplicates(graph: gs.Graph) -> int:
    """Point every reader of a duplicate initializer at its first copy."""
    first: dict[tuple, gs.Constant] = {}
    main = {id(n) for n in graph.nodes}
    shared = 0
    for tensor in list(tensor_map(graph).values()):
        if not isinstance(tensor, gs.Constant) or not tensor.outputs:
            continue
        if any(id(n) not in main for n in tensor.outputs):
            continue  # read inside an If/Loop/Scan body: left untouched
        keep = first.setdefault(weights.digest(tensor), tensor)  # streamed from disk if not loaded
        if keep is not tensor and np.array_equal(keep.values, tensor.values, equal_nan=True):
            replace_uses(tensor, keep)
            shared += 1
    return shared
