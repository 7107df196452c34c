"""fold-constants: evaluate subgraphs that depend only on constants.

Rewrite: a node whose inputs are all constants (initializers, Constant nodes, or the output of
``Shape`` on a tensor whose shape is statically known) is evaluated once with onnxruntime and
replaced by its value: f(c1, ..., cn) -> C. Typical catch: the Shape/Gather/Unsqueeze/Concat
arithmetic exporters emit in front of Reshape. Exact by construction (same kernels, same values).
Results larger than ``fold_size_limit`` bytes (default 16 MiB, e.g. a Tile of a constant) are not
folded so the model does not bloat. Dynamic dimensions are never fixed: only shapes the graph
already states are used. If/Loop/Scan bodies are left untouched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import onnx_graphsurgeon as gs

import redonnx.measure.runtime  # noqa: F401  (quiets onnxruntime's logger)
from redonnx.inputs.shapes import annotate_graph, restore_constants, swap_constants
from redonnx.io.graph import lift_constant_nodes, tensor_map
from redonnx.io.weights import ExternalValues
from redonnx.passes.base import Decline, Pass, PassContext, PassResult

DEFAULT_SIZE_LIMIT = 16 * 2**20


@dataclass
class FoldConstants(Pass):
    """Evaluates every node that depends only on constants, in one onnxruntime run (exact)."""

    name: ClassVar[str] = "fold-constants"
    size_limit: int = DEFAULT_SIZE_LIMIT  # bytes: larger folded tensors stay computed

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        res = self.result()
        graph.toposort(recurse_subgraphs=False)
        if not _may_fold(graph):  # gs would copy the graph to find nothing: most CNNs, every trial
            graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=False)
            res.count("nodes folded", 0)
            return res
        annotate_graph(graph)  # folding reads static shapes (Shape of a known tensor); passes that need them annotate
        _load_folded_weights(graph)
        before = len(graph.nodes)
        _quiet_gs()
        try:
            _fold(graph, self.size_limit)
        except Exception as exc:  # gs surfaces onnxruntime failures as bare exceptions
            res.declined.append(Decline("<graph>", "", f"constant folding failed, skipped: {exc}"))
            return res
        lift_constant_nodes(graph)
        graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=False)
        res.count("nodes folded", max(0, before - len(graph.nodes)))
        return res


def _fold(graph: gs.Graph, limit: int) -> None:
    """All constant nodes in one onnxruntime run; if onnxruntime fails on any of them, again
    partitioned so the rest still fold (partitioning copies the graph per partition: minutes on
    graphs with hundreds of constant subgraphs, so it is only the fallback). ``graph`` is toposorted."""
    kw = dict(fold_shapes=True, recurse_subgraphs=False, flatten_subgraphs=False, size_threshold=limit,
              recurse_functions=False)  # fmt: skip
    # custom-domain nodes never fold (onnxruntime has no kernel): their constant inputs become
    # placeholder inputs while folding runs
    shielded = swap_constants(graph, lambda node, _t: node.domain not in (None, "", "ai.onnx"), rename=True)
    try:
        graph.fold_constants(partitioning=None, error_ok=False, **kw)
    except Exception:  # one node onnxruntime cannot evaluate
        graph.toposort(recurse_subgraphs=False)
        graph.fold_constants(partitioning="basic", error_ok=True, **kw)
    finally:
        restore_constants(graph, shielded)


#: ops gs's folding acts on whatever their inputs: shape arithmetic, cast elision, constant nodes
_ALWAYS = frozenset({"Shape", "Size", "Cast", "CastLike", "Constant"})


def _may_fold(graph: gs.Graph) -> bool:
    """Whether folding could change ``graph``: some node computes from constants alone (or from
    nothing), reads a shape, is a Cast, or has subgraphs (their outer reads are not looked at here).
    False is a proof that ``graph.fold_constants`` would find nothing."""
    for node in graph.nodes:
        if node.op in _ALWAYS or any(isinstance(v, gs.Graph) or (isinstance(v, list) and v and isinstance(
                v[0], gs.Graph)) for v in node.attrs.values()):  # fmt: skip
            return True
        if all(isinstance(t, gs.Constant) or t.is_empty() for t in node.inputs):
            return True
    return False


def _load_folded_weights(graph: gs.Graph) -> None:
    """Read weights that folding will consume (e.g. DequantizeLinear of int8 weights) into memory:
    onnxruntime, which evaluates the folded nodes, cannot see weights still on disk."""
    const = {name for name, t in tensor_map(graph).items() if isinstance(t, gs.Constant)}
    for node in graph.nodes:
        if node.inputs and all(not t.name or t.name in const for t in node.inputs):
            for t in node.inputs:
                if isinstance(t, gs.Constant) and isinstance(t._values, ExternalValues):
                    t.values  # noqa: B018  (loads the values)
            const.update(t.name for t in node.outputs)


def _quiet_gs() -> None:
    from onnx_graphsurgeon.logger import G_LOGGER

    G_LOGGER.severity = G_LOGGER.ERROR
    logging.getLogger("onnx_graphsurgeon").setLevel(logging.ERROR)
