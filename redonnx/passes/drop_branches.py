"""drop-branches: remove whole residual branches (depth pruning).

A residual block computes y = s(x) + f(x): a shortcut s (the identity, or a strided/padded or
1x1 projection of x) and a branch f of layers reading only x. Removing the branch saves all of
its latency, whatever its channel counts:

    y = s(x) + f(x)    becomes    y = s(x) + c,    c = E[f(x)] per channel

with c measured on the channel statistics' synthetic inputs (the same BatchNorm-corrected ones
merging uses; :func:`branch_means`). Where f(x) is provably constant (its last layer's weights
are all zero and nothing nonlinear follows it) c is that constant and the rewrite is exact: the
only branches removed by ``--exact``. Otherwise the planner (parameter ``drop``: the Add nodes whose
branch goes) chooses, ranking branches by how much removing each alone changes the outputs per
millisecond it saves (:func:`redonnx.planner.stages.depth_stage`).

Matching: for y = Add(p, q) with p and q of the same shape, the branch behind p is every node
that p depends on and q does not; it must be entered through one tensor x (which q depends on),
and nothing outside it may read its tensors. Declined (with the reason) otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from redonnx.inputs.shapes import annotate_graph
from redonnx.io.graph import LINEAR_OPS, const_value, is_graph_output
from redonnx.passes.base import Pass, PassContext, PassResult


@dataclass
class Branch:
    add: gs.Node
    side: int  # which input of the Add is the branch
    nodes: list[gs.Node]
    entry: gs.Tensor
    constant: np.ndarray | None  # the branch's output when it is provably constant

    @property
    def axis(self) -> int:
        """Channel axis of the branch's output: 1 after convolutions, the last after MatMul/Gemm."""
        last = next((n for n in self.nodes if n.op in LINEAR_OPS), None)
        return 1 if last is not None and last.op in ("Conv", "ConvTranspose") else -1

    @property
    def key(self) -> str:
        return self.add.name or self.add.outputs[0].name

    @property
    def output(self) -> gs.Tensor:
        return self.add.inputs[self.side]

    def layers(self) -> list[gs.Node]:
        return [n for n in self.nodes if n.op in LINEAR_OPS]


class _Ancestry:
    """Which tensors each tensor depends on (itself included), as bit sets computed once per graph:
    every Add asks for its other side's ancestors, which would otherwise be walked again per Add."""

    def __init__(self) -> None:
        self._index: dict[int, int] = {}
        self._bits: dict[int, int] = {}

    def bit(self, t: gs.Tensor) -> int:
        return 1 << self._index.setdefault(id(t), len(self._index))

    def of(self, t: gs.Tensor) -> int:
        stack, open_ = [(t, False)], set()  # open_: on the stack (a cycle, in a broken graph, ends there)
        while stack:
            cur, ready = stack.pop()
            if id(cur) in self._bits or (not ready and id(cur) in open_):
                continue
            parents = [x for n in cur.inputs for x in n.inputs if isinstance(x, gs.Variable)]
            if ready:
                bits = self.bit(cur)
                for x in parents:
                    bits |= self._bits.get(id(x), 0)
                self._bits[id(cur)] = bits
                continue
            open_.add(id(cur))
            stack.append((cur, True))
            stack.extend((x, False) for x in parents if id(x) not in self._bits)
        return self._bits[id(t)]


def _branch(graph: gs.Graph, add: gs.Node, side: int, ancestry: _Ancestry) -> Branch | str:
    p, q = add.inputs[side], add.inputs[1 - side]
    shortcut = ancestry.of(q)
    nodes: list[gs.Node] = []
    entries: dict[int, gs.Tensor] = {}
    stack, seen = [p], set()
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        if shortcut & ancestry.bit(t):
            entries[id(t)] = t
            continue
        if not t.inputs:
            return "the branch reads a graph input the shortcut does not"
        node = t.inputs[0]
        if node.op in ("If", "Loop", "Scan") or len(node.outputs) != 1:
            return f"the branch holds a {node.op}"
        nodes.append(node)
        stack.extend(x for x in node.inputs if isinstance(x, gs.Variable))
    if len(entries) != 1 or not any(n.op in LINEAR_OPS for n in nodes):
        return "" if not any(n.op in LINEAR_OPS for n in nodes) else "the branch has several entries"
    inside = {id(n) for n in nodes}
    for n in nodes:
        out = n.outputs[0]
        if is_graph_output(graph, out) or any(id(r) not in inside and r is not add for r in out.outputs):
            return f"{out.name} is read outside the branch"
    if p.outputs.count(add) != 1 or len(p.outputs) != 1:
        return f"{p.name} is read outside the branch"
    return Branch(add, side, nodes, next(iter(entries.values())), _constant_output(p))


def _constant_output(p: gs.Tensor) -> np.ndarray | None:
    """The branch output's value when its producer is a linear layer with all-zero weights."""
    node = p.inputs[0] if p.inputs else None
    if node is not None and node.op == "Add":  # MatMul + bias Add
        c = [x for x in node.inputs if isinstance(x, gs.Constant)]
        v = [x for x in node.inputs if isinstance(x, gs.Variable)]
        if len(c) == 1 and len(v) == 1 and v[0].inputs and v[0].inputs[0].op == "MatMul":
            inner = _constant_output(v[0])
            return None if inner is None else inner + np.asarray(c[0].values, np.float64)
        return None
    if node is None or node.op not in LINEAR_OPS:
        return None
    w = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or np.any(w):
        return None
    bias = const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    if node.op == "MatMul":
        return np.zeros(int(w.shape[-1]))
    if bias is None:
        return np.zeros(1)
    return np.asarray(bias, np.float64).reshape(-1)


def find_branches(graph: gs.Graph) -> tuple[list[Branch], list[tuple[gs.Node, str]]]:
    """Residual branches that can go, and the Adds declined with why."""
    annotate_graph(graph)
    found, declined = [], []
    ancestry = _Ancestry()
    for add in graph.nodes:
        if add.op != "Add" or len(add.inputs) != 2 or not all(isinstance(t, gs.Variable) for t in add.inputs):
            continue
        a, b = add.inputs
        if a.shape is None or b.shape is None or list(a.shape) != list(b.shape):
            continue
        options = [_branch(graph, add, side, ancestry) for side in (0, 1)]
        got = [o for o in options if isinstance(o, Branch)]
        if got:
            found.append(max(got, key=lambda br: len(br.nodes)))  # the longer side is the branch
        elif any(options):
            declined.append((add, next(o for o in options if o)))
    return found, declined


def channel_shaped(values: np.ndarray, rank: int, axis: int) -> np.ndarray:
    """A per-channel constant shaped to broadcast along ``axis`` of a rank-``rank`` tensor."""
    v = np.asarray(values, np.float32).reshape(-1)
    if v.size == 1:
        return v.reshape([1] * rank)
    shape = [1] * rank
    shape[axis] = -1
    return v.reshape(shape)


def drop(graph: gs.Graph, branch: Branch, constant: np.ndarray) -> None:
    """y = s(x) + constant: the branch's output is replaced; the cleanup removes its nodes."""
    p = branch.output
    rank = len(p.shape) if p.shape is not None else 4
    c = gs.Constant(f"{branch.key}_branch_mean", channel_shaped(constant, rank, branch.axis))
    branch.add.inputs[branch.side] = c


@dataclass
class DropBranches(Pass):
    """Removes residual branches: provably constant ones exactly, and those the planner names."""

    name: ClassVar[str] = "drop-branches"
    drop: tuple[str, ...] = ()  # the Add nodes whose (non-constant) branch goes, chosen by the planner
    means: dict[str, np.ndarray] = field(default_factory=dict)  # Add -> the branch output's per-channel mean

    @property
    def exact(self) -> bool:
        return not self.drop

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        res = self.result()
        chosen, means = set(self.drop), self.means
        found, declined = find_branches(graph)
        for add, why in declined:
            res.decline(add, why)
        for br in found:
            if br.constant is not None:
                drop(graph, br, br.constant)
                res.count("constant branches removed")
                res.layers.append({"add": br.key, "layers": [n.name for n in br.layers()], "exact": True})
            elif br.key in chosen and br.key in means:
                drop(graph, br, means[br.key])
                res.count("branches removed")
                res.layers.append({"add": br.key, "layers": [n.name for n in br.layers()], "exact": False})
        if res.modified:
            graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=False)
        return res


def per_channel_mean(v: np.ndarray, axis: int) -> np.ndarray:
    v = np.asarray(v, np.float64)
    if v.ndim <= 1:
        return v.reshape(-1)
    axis = axis % v.ndim
    return v.mean(axis=tuple(i for i in range(v.ndim) if i != axis))
