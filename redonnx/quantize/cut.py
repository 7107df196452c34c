"""One layer in INT8, cut from the model with every layer in INT8: the sensitivity trials' models
without a library build each.

The INT8 stage scores each layer by the output deviation with that layer alone in INT8. onnxruntime's
quantizer writes a layer's INT8 form the same whichever other layers it quantizes, where each layer
reads its own weight and bias (the prepared model's: :func:`redonnx.quantize.quantizer.own_weights`):

- each activation it quantizes gets one QuantizeLinear/DequantizeLinear pair, its scale and zero
  point from the calibration cache (per tensor), and *every* reader of that tensor is rewired to the
  DequantizeLinear (float readers too: a residual Add reads the quantized activation);
- its weight is quantized per channel and its bias to int32 at the input's scale times the
  weight's, both from the weights alone;
- the static quantizer pairs the layer's output as well (``QDQConv``, ``QDQGemm``, ``QDQMatMul``),
  unless the op is excluded from output quantization (the TensorRT scheme); the dynamic quantizer
  writes ``DynamicQuantizeLinear`` on the input, which only the layer reads.

So the nodes the full model holds between the float model's tensors and the layer's output (and the
pair on that output where the layer makes it), spliced into the float model in the layer's place,
with the readers of every tensor they pair rewired, is the model the quantizer writes for that layer
alone: onnxruntime computes the same outputs bit for bit, with graph optimizations on and off
(tests: ResNet-20 and MobileNetV2 static, ResNet-20 TensorRT's scheme, all-MiniLM-L6-v2 dynamic).
A cut takes milliseconds where a build reloads and rewrites the whole model (all-MiniLM-L6-v2: 1 s
a layer). Where the full model does not hold what the cut needs, :meth:`Cutter.alone` returns None
and the stage builds that layer alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import onnx

from redonnx.measure.segments import node_reads

SUFFIX = "__int8_alone"  # a cut tensor named like a float model's initializer (a bias's DequantizeLinear)


@dataclass
class Part:
    """One layer's INT8 nodes as a model: from the float tensors it ``reads`` to the values that
    replace float tensors (``replaces``: float tensor -> output; every reader but the layer reads
    it instead: a pair's DequantizeLinear, the layer's own output)."""

    nodes: list[onnx.NodeProto]
    initializers: dict[str, onnx.TensorProto]
    reads: list[str]
    replaces: dict[str, str]
    full: onnx.ModelProto  # the library's model: its opsets hold for these nodes

    def model(self, dtypes: dict[str, int]) -> onnx.ModelProto:
        """The part as a model; ``dtypes``: each read tensor's element type."""
        inputs = [onnx.helper.make_tensor_value_info(n, dtypes[n], None) for n in self.reads]
        outputs = [onnx.helper.make_empty_tensor_value_info(o) for o in dict.fromkeys(self.replaces.values())]
        graph = onnx.helper.make_graph(self.nodes, "int8 part", inputs, outputs, list(self.initializers.values()))
        m = onnx.helper.make_model(graph, opset_imports=self.full.opset_import)
        m.ir_version = self.full.ir_version
        return m


@dataclass
class Cutter:
    """Cuts layers of ``full`` (``float_model`` quantized by the library, every candidate layer in
    INT8) into ``float_model``; ``output_pairs``: the quantizer pairs layer outputs (static, not TensorRT)."""

    float_model: onnx.ModelProto
    full: onnx.ModelProto
    output_pairs: bool
    _float: set[str] = field(default_factory=set, init=False, repr=False)  # the float model's activations
    _inits: dict[str, onnx.TensorProto] = field(default_factory=dict, init=False, repr=False)
    _made_by: dict[str, onnx.NodeProto] = field(default_factory=dict, init=False, repr=False)  # in ``full``
    _read_by: dict[str, list[onnx.NodeProto]] = field(default_factory=dict, init=False, repr=False)
    _q_inits: dict[str, onnx.TensorProto] = field(default_factory=dict, init=False, repr=False)
    _nodes: dict[str, tuple[int, onnx.NodeProto]] = field(default_factory=dict, init=False, repr=False)  # by name

    def __post_init__(self) -> None:
        g, q = self.float_model.graph, self.full.graph
        self._nodes = {n.name: (i, n) for i, n in enumerate(g.node)}
        self._inits = {t.name: t for t in g.initializer}
        fed = {i.name for i in g.input if i.name not in self._inits}  # older exports list weights as inputs
        self._float = {o for n in g.node for o in n.output if o} | fed
        self._made_by = {o: n for n in q.node for o in n.output if o}
        for n in q.node:
            for i in n.input:
                self._read_by.setdefault(i, []).append(n)
        self._q_inits = {t.name: t for t in q.initializer}

    def alone(self, name: str) -> onnx.ModelProto | None:
        """The float model with node ``name`` in INT8 as the library writes it alone (None: not cut)."""
        return self.cut([name])

    def cut(self, names: Iterable[str]) -> onnx.ModelProto | None:
        """The float model with the nodes ``names`` in INT8 as the library writes them with every
        other layer float (None: not cut)."""
        collected = self._collect(names)
        return self._splice(*collected) if collected is not None else None

    def part(self, name: str) -> Part | None:
        """Node ``name``'s INT8 form on its own: what :meth:`alone` splices in, as a model from the
        float tensors it reads to the values that replace float tensors (None: not cut)."""
        collected = self._collect([name])
        if collected is None:
            return None
        placed, inits = collected
        cut, paired, rename = self._wiring(placed, inits)
        nodes = [_renamed(n, rename) for n in cut]
        made = {o for n in nodes for o in n.output}
        node = self._nodes[name][1]
        replaces = {**{y: y for y in node.output if y}, **paired}
        reads = sorted({i for n in nodes for i in n.input if i in self._float and i not in made})
        tensors = {rename.get(t, t): v for t, v in inits.items()}
        tensors.update({i: self._inits[i] for n in nodes for i in n.input if i in self._inits and i not in tensors})
        return Part(nodes, tensors, reads, replaces, self.full)

    def _collect(self, names: Iterable[str]) -> tuple[dict[str, list[onnx.NodeProto]], dict] | None:
        if any(name not in self._nodes for name in names):
            return None
        placed: dict[str, list[onnx.NodeProto]] = {}  # each layer's nodes go in its place
        inits: dict[str, onnx.TensorProto] = {}
        seen: set[int] = set()  # a pair two layers share (one's output, the other's input) goes once
        for name in sorted(set(names), key=lambda n: self._nodes[n][0]):
            node, mine = self._nodes[name][1], []
            if not all(self._walk(y, set(node.output), mine, inits, seen) for y in node.output if y):
                return None
            for y in node.output if self.output_pairs else []:
                for n in self._pair(y) or []:
                    if id(n) not in seen:
                        seen.add(id(n))
                        mine.append(n)
            placed[name] = mine
        return placed, inits

    def _walk(self, t: str, outputs: set[str], nodes: list, inits: dict, seen: set[int]) -> bool:
        """Collect what makes ``t`` in the full model back to the float model's tensors (inputs first)."""
        if t in self._float and t not in outputs:
            return True
        if t in self._q_inits:
            inits[t] = self._q_inits[t]
            return True
        n = self._made_by.get(t)
        if n is None:
            return False
        if id(n) not in seen:
            seen.add(id(n))
            if not all(self._walk(i, outputs, nodes, inits, seen) for i in n.input if i):
                return False
            nodes.append(n)
        return True

    def _pair(self, t: str) -> list[onnx.NodeProto] | None:
        """The QuantizeLinear reading ``t`` and the DequantizeLinear reading it, in the full model."""
        q = next((n for n in self._read_by.get(t, []) if n.op_type == "QuantizeLinear"), None)
        if q is None:
            return None
        dq = next((n for n in self._read_by.get(q.output[0], []) if n.op_type == "DequantizeLinear"), None)
        return [q, dq] if dq is not None else None

    def _wiring(self, placed: dict[str, list[onnx.NodeProto]], inits: dict) -> tuple[list, dict, dict]:
        """The cut nodes, the float tensors they pair (-> the DequantizeLinear's output every reader
        reads), and the names they rename (a cut tensor or initializer named like a float one)."""
        cut = [n for nodes in placed.values() for n in nodes]
        for n in cut:  # the pairs' scales and zero points
            for i in n.input:
                if i in self._q_inits:
                    inits[i] = self._q_inits[i]
        paired = {}
        for n in cut:
            if n.op_type == "QuantizeLinear" and n.input[0] in self._float:
                dq = next((d for d in cut if d.op_type == "DequantizeLinear" and d.input[0] == n.output[0]), None)
                if dq is not None:
                    paired[n.input[0]] = dq.output[0]
        rename = {t: t + SUFFIX for n in cut for t in n.output if t in self._inits}
        for t, tensor in inits.items():
            if t in self._inits and self._inits[t].SerializeToString() != tensor.SerializeToString():
                rename[t] = t + SUFFIX
        return cut, paired, rename

    def _splice(self, placed: dict[str, list[onnx.NodeProto]], inits: dict) -> onnx.ModelProto | None:
        _cut, paired, rename = self._wiring(placed, inits)
        out = onnx.ModelProto()
        out.CopyFrom(self.float_model)
        del out.opset_import[:]  # the library's: they hold for its nodes and, as it writes them, for the float ones
        out.opset_import.extend(self.full.opset_import)
        out.ir_version = self.full.ir_version
        g = out.graph
        nodes = []
        for n in g.node:
            if n.name in placed:
                nodes += [_renamed(m, rename) for m in placed[n.name]]  # in the layer's place
                continue
            for k, i in enumerate(n.input):
                if i in paired:
                    n.input[k] = paired[i]
            nodes.append(n)
        for t, tensor in inits.items():
            if t in self._inits and t not in rename:
                continue  # the float model's own, the same bytes
            copy = onnx.TensorProto()
            copy.CopyFrom(tensor)
            copy.name = rename.get(t, t)
            g.initializer.append(copy)
        ordered = _toposort(nodes, {i.name for i in g.input} | {t.name for t in g.initializer})
        if ordered is None:
            return None
        del g.node[:]
        g.node.extend(ordered)
        return out


def _renamed(node: onnx.NodeProto, rename: dict[str, str]) -> onnx.NodeProto:
    out = onnx.NodeProto()
    out.CopyFrom(node)
    for k, i in enumerate(out.input):
        out.input[k] = rename.get(i, i)
    for k, o in enumerate(out.output):
        out.output[k] = rename.get(o, o)
    return out


def _toposort(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto] | None:
    """``nodes`` in an order where each reads only what is available before it (stable: the given
    order wherever it already is one); None where no order exists."""
    have = set(available) | {""}
    pending, out = list(nodes), []
    while pending:
        rest = []
        for n in pending:
            if all(i in have for i in node_reads(n)):
                out.append(n)
                have.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            return None
        pending = rest
    return out
