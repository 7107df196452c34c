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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from redonnx.graph import const_value

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


@dataclass
class Space:
    """The channel axis of one tensor."""

    tensor: gs.Tensor
    size: int
    axis: int  # channel axis, non-negative
    base: int  # id of element 0 in the union-find


@dataclass
class Item:
    """Something indexed by a tensor's channels that a merge must read or rewrite.

    kind: ``row`` (a layer's output rows define the channel), ``param`` (a per-channel constant
    of an op producing the tensor), ``zero`` (channels [lo, hi) are zero padding), ``sink`` (a
    layer reads the channels linearly: columns), ``op`` (Split/Slice/Pad/Reshape/depthwise
    attributes follow the new sizes).
    """

    kind: str
    node: gs.Node
    tensor: str
    index: int = 1  # input index of the constant (param / row / sink weight)
    features: np.ndarray | None = None  # sink through Flatten: feature rows per channel [C, k]
    lo: int = 0
    hi: int = 0


@dataclass
class ChannelGraph:
    """Spaces, the union-find over their elements, items, and pinned elements with reasons."""

    graph: gs.Graph
    spaces: dict[str, Space] = field(default_factory=dict)
    parent: list[int] = field(default_factory=list)
    items: dict[str, list[Item]] = field(default_factory=dict)
    pins: dict[int, str] = field(default_factory=dict)  # element -> reason
    made: set[str] = field(default_factory=set)  # tensors whose producing node is modelled
    read: dict[int, set[str]] = field(default_factory=dict)  # node id -> channel tensors it models
    flattened: set[str] = field(default_factory=set)  # Flatten outputs whose readers are sinks upstream
    _members: dict[int, list[tuple[str, int]]] | None = None  # classes(), computed once spaces are final

    # ---------------------------------------------------------------- union-find

    def reads(self, node: gs.Node, tensor: gs.Tensor) -> None:
        """Record that ``node``'s use of ``tensor``'s channels is modelled."""
        self.read.setdefault(id(node), set()).add(tensor.name)

    def add_space(self, tensor: gs.Tensor, size: int, axis: int, made: bool = False) -> Space:
        """The space of ``tensor`` (created if new); ``made`` when its producer is being modelled."""
        if made:
            self.made.add(tensor.name)
        if tensor.name in self.spaces:
            sp = self.spaces[tensor.name]
            if sp.size != size:
                self.pin_tensor(tensor.name, f"{tensor.name}: inconsistent channel counts {sp.size} and {size}")
            return sp
        sp = Space(tensor, int(size), int(axis), len(self.parent))
        self.parent.extend(range(sp.base, sp.base + sp.size))
        self.spaces[tensor.name] = sp
        return sp

    def find(self, e: int) -> int:
        root = e
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[e] != root:
            self.parent[e], e = root, self.parent[e]
        return root

    def join(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def join_range(self, src: str, src_lo: int, dst: str, dst_lo: int, n: int) -> None:
        s, d = self.spaces[src], self.spaces[dst]
        for k in range(n):
            self.join(s.base + src_lo + k, d.base + dst_lo + k)

    def pin_tensor(self, name: str, reason: str, lo: int = 0, hi: int | None = None) -> None:
        sp = self.spaces[name]
        for c in range(lo, sp.size if hi is None else hi):
            self.pins.setdefault(sp.base + c, reason)

    def add_item(self, item: Item) -> None:
        self.items.setdefault(item.tensor, []).append(item)

    # ---------------------------------------------------------------- queries

    def element(self, tensor: str, c: int) -> int:
        return self.spaces[tensor].base + c

    def classes(self) -> dict[int, list[tuple[str, int]]]:
        """Root -> members (tensor, channel)."""
        out: dict[int, list[tuple[str, int]]] = {}
        for name, sp in self.spaces.items():
            for c in range(sp.size):
                out.setdefault(self.find(sp.base + c), []).append((name, c))
        return out

    def pinned_roots(self) -> dict[int, str]:
        out: dict[int, str] = {}
        for e, reason in self.pins.items():
            out.setdefault(self.find(e), reason)
        return out

    def members_of(self, root: int) -> list[tuple[str, int]]:
        """(tensor, channel) pairs of the class whose root is ``root``."""
        if self._members is None:
            self._members = self.classes()
        return self._members.get(root, [])

    def producer(self, tensor: str) -> gs.Node | None:
        t = self.spaces[tensor].tensor
        return t.inputs[0] if t.inputs else None


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


def _rank(t: gs.Tensor) -> int | None:
    return len(t.shape) if t.shape is not None else None


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


def _space_of(cg: ChannelGraph, t: gs.Tensor) -> Space | None:
    return cg.spaces.get(t.name) if t is not None else None


def _visit_layer(cg: ChannelGraph, node: gs.Node) -> None:
    w = node.inputs[1] if len(node.inputs) > 1 else None
    out = node.outputs[0]
    if not isinstance(w, gs.Constant):
        return
    x = node.inputs[0]
    if node.op in ("Conv", "ConvTranspose"):
        g = int(node.attrs.get("group", 1))
        if node.op == "Conv":
            cout, cin = int(w.shape[0]), int(w.shape[1]) * g
            if g > 1 and g == cin and cout == cin:  # one kernel per channel
                _depthwise(cg, node, cin)
                return
        else:
            cin, cout = int(w.shape[0]), int(w.shape[1]) * g
        xs = cg.add_space(x, cin, 1) if not isinstance(x, gs.Constant) else None
        cg.add_space(out, cout, 1, made=True)
        if xs:
            cg.reads(node, x)
        if g > 1:
            reason = f"{node.name}: grouped {node.op} ({g} groups)"
            if xs:
                cg.pin_tensor(x.name, reason)
            cg.pin_tensor(out.name, reason)
            return
        if xs:
            cg.add_item(Item("sink", node, x.name))
        cg.add_item(Item("row", node, out.name))
        return
    if len(w.shape) != 2:
        return
    trans_b = node.op == "Gemm" and int(node.attrs.get("transB", 0))
    k, m = (int(w.shape[1]), int(w.shape[0])) if trans_b else (int(w.shape[0]), int(w.shape[1]))
    if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
        return
    if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name:
        c = const_value(node.inputs[2])
        if c is None or c.size not in (1, m):
            return
    rank = 2 if node.op == "Gemm" else _rank(x)
    if rank is None:
        return
    if x.name in cg.flattened:  # its rows are already sinks of the tensor before the Flatten
        cg.add_space(out, m, max(rank, 2) - 1, made=True)
        cg.add_item(Item("row", node, out.name))
        return
    out_rank = max(rank, 2)
    xs = cg.add_space(x, k, rank - 1) if not isinstance(x, gs.Constant) else None
    cg.add_space(out, m, out_rank - 1, made=True)
    if xs:
        cg.reads(node, x)
        cg.add_item(Item("sink", node, x.name))
    cg.add_item(Item("row", node, out.name))


def _depthwise(cg: ChannelGraph, node: gs.Node, c: int) -> None:
    x, out = node.inputs[0], node.outputs[0]
    cg.add_space(x, c, 1)
    cg.add_space(out, c, 1, made=True)
    cg.reads(node, x)
    cg.join_range(x.name, 0, out.name, 0, c)
    cg.add_item(Item("param", node, out.name, index=1))
    if len(node.inputs) > 2 and node.inputs[2].name:
        cg.add_item(Item("param", node, out.name, index=2))
    cg.add_item(Item("op", node, out.name))


def _pass_through(cg: ChannelGraph, node: gs.Node, axis: int | None = None) -> Space | None:
    xs = _space_of(cg, node.inputs[0]) if node.inputs else None
    if xs is None or not node.outputs:
        return None
    os_ = cg.add_space(node.outputs[0], xs.size, xs.axis if axis is None else axis, made=True)
    if node.outputs[0].shape is None and node.inputs[0].shape is not None:  # contrib ops onnx cannot infer
        node.outputs[0].shape = list(node.inputs[0].shape)
    cg.reads(node, node.inputs[0])
    cg.join_range(node.inputs[0].name, 0, node.outputs[0].name, 0, xs.size)
    if any(isinstance(t, gs.Variable) and t.name and t.name not in cg.spaces for t in node.inputs[1:]):
        cg.pin_tensor(node.outputs[0].name, f"{node.name}: {node.op} with a computed parameter")
    return os_


def _per_channel_op(cg: ChannelGraph, node: gs.Node) -> None:
    os_ = _pass_through(cg, node)
    if os_ is None:
        return
    for i in range(1, len(node.inputs)):
        c = const_value(node.inputs[i])
        if c is None:
            cg.pin_tensor(node.outputs[0].name, f"{node.name}: {node.op} parameter is not constant")
        elif c.size == os_.size and c.size > 1:
            cg.add_item(Item("param", node, node.outputs[0].name, index=i))
        elif c.size != 1:
            cg.pin_tensor(node.outputs[0].name, f"{node.name}: {node.op} parameter shape {list(c.shape)}")
    if node.op == "BatchNormalization" and any(o.outputs for o in node.outputs[1:]):
        cg.pin_tensor(node.outputs[0].name, f"{node.name}: training-mode outputs used")


def _channel_vector(c: np.ndarray, sp: Space, out_rank: int | None) -> str:
    """'scalar', 'channel' (varies along the channel axis only) or 'other'."""
    if c.size == 1:
        return "scalar"
    if out_rank is None or c.ndim > out_rank:
        return "other"
    shape = (1,) * (out_rank - c.ndim) + c.shape
    ax = sp.axis
    if ax < out_rank and all(d == 1 for i, d in enumerate(shape) if i != ax) and shape[ax] == sp.size:
        return "channel"
    return "other"


def _binary(cg: ChannelGraph, node: gs.Node) -> None:
    ins = [t for t in node.inputs if t.name]
    spaces = [_space_of(cg, t) for t in ins]
    if not any(spaces) or not node.outputs:
        return
    out = node.outputs[0]
    out_rank = _rank(out)
    ref = next(s for s in spaces if s)
    ranks = [_rank(t) for t in ins]
    for t, s in zip(ins, spaces, strict=True):
        if s:
            cg.reads(node, t)
    if out_rank is None or any(r is None for r in ranks):
        cg.add_space(out, ref.size, ref.axis, made=True)
        for t, s in zip(ins, spaces, strict=True):
            if s:
                cg.pin_tensor(t.name, f"{node.name}: {node.op} with unknown ranks")
        cg.pin_tensor(out.name, f"{node.name}: {node.op} with unknown ranks")
        return
    axis = ref.axis + out_rank - ranks[spaces.index(ref)]
    os_ = cg.add_space(out, ref.size, axis, made=True)
    for t, s, r in zip(ins, spaces, ranks, strict=True):
        if s is not None:
            if s.size != os_.size or s.axis + out_rank - r != axis:
                cg.pin_tensor(t.name, f"{node.name}: {node.op} broadcasts channels")
                cg.pin_tensor(out.name, f"{node.name}: {node.op} broadcasts channels")
                continue
            cg.join_range(t.name, 0, out.name, 0, s.size)
            continue
        c = const_value(t)
        kind = _channel_vector(c, os_, out_rank) if c is not None else "computed"
        if kind == "channel":
            cg.add_item(Item("param", node, out.name, index=node.inputs.index(t)))
        elif kind == "scalar":
            pass
        elif kind == "computed":
            cg.pin_tensor(out.name, f"{node.name}: {node.op} with a computed operand {t.name!r} without channels")
        else:
            cg.pin_tensor(out.name, f"{node.name}: {node.op} constant of shape {list(c.shape)}")


def _concat(cg: ChannelGraph, node: gs.Node) -> None:
    spaces = [_space_of(cg, t) for t in node.inputs]
    if not any(spaces):
        return
    out = node.outputs[0]
    ref = next(s for s in spaces if s)
    rank = _rank(out) or _rank(ref.tensor)
    axis = int(node.attrs.get("axis", 0))
    axis = axis + rank if rank is not None and axis < 0 else axis
    for t, s in zip(node.inputs, spaces, strict=True):
        if s:
            cg.reads(node, t)
    if axis != ref.axis:
        for t, s in zip(node.inputs, spaces, strict=True):
            if s:
                cg.pin_tensor(t.name, f"{node.name}: Concat on a non-channel axis")
        return
    sizes = [s.size if s else _dim(t, axis) for t, s in zip(node.inputs, spaces, strict=True)]
    if any(n is None for n in sizes):
        for t, s in zip(node.inputs, spaces, strict=True):
            if s:
                cg.pin_tensor(t.name, f"{node.name}: Concat of an input with unknown channels")
        return
    cg.add_space(out, sum(sizes), axis, made=True)
    off = 0
    for t, s, n in zip(node.inputs, spaces, sizes, strict=True):
        if s:
            cg.join_range(t.name, 0, out.name, off, n)
        else:
            cg.pin_tensor(out.name, f"{node.name}: Concat input {t.name!r} has no known source", off, off + n)
        off += n
    cg.add_item(Item("op", node, out.name))


def _dim(t: gs.Tensor, axis: int) -> int | None:
    if t.shape is None or axis >= len(t.shape) or not isinstance(t.shape[axis], int):
        return None
    return int(t.shape[axis])


def _split(cg: ChannelGraph, node: gs.Node) -> None:
    xs = _space_of(cg, node.inputs[0])
    if xs is None:
        return
    axis = int(node.attrs.get("axis", 0))
    rank = _rank(node.inputs[0])
    axis = axis + rank if rank is not None and axis < 0 else axis
    sizes = _split_sizes(node, xs.size)
    cg.reads(node, node.inputs[0])
    if axis != xs.axis:  # a split along another axis keeps every channel in every output
        for o in node.outputs:
            cg.add_space(o, xs.size, xs.axis, made=True)
            cg.join_range(xs.tensor.name, 0, o.name, 0, xs.size)
        return
    if sizes is None:
        cg.pin_tensor(xs.tensor.name, f"{node.name}: Split sizes unknown")
        return
    off = 0
    for o, n in zip(node.outputs, sizes, strict=True):
        cg.add_space(o, n, axis, made=True)
        cg.join_range(xs.tensor.name, off, o.name, 0, n)
        off += n
    cg.add_item(Item("op", node, xs.tensor.name))


def _split_sizes(node: gs.Node, total: int) -> list[int] | None:
    split = node.attrs.get("split")
    if split is None and len(node.inputs) > 1 and node.inputs[1].name:
        c = const_value(node.inputs[1])
        split = None if c is None else [int(v) for v in c.reshape(-1)]
    if split is None:
        n = len(node.outputs)
        return [total // n] * n if total % n == 0 else None
    return [int(s) for s in split] if sum(split) == total else None


def slice_params(node: gs.Node) -> tuple[list[int], list[int], list[int], list[int]] | None:
    if "starts" in node.attrs:  # opset < 10
        starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
        axes = list(node.attrs.get("axes", range(len(starts))))
        return starts, ends, axes, [1] * len(starts)
    vals = [const_value(t) if t.name else None for t in node.inputs[1:5]]
    if len(vals) < 2 or vals[0] is None or vals[1] is None:
        return None
    starts, ends = [int(v) for v in vals[0]], [int(v) for v in vals[1]]
    axes = [int(v) for v in vals[2]] if len(vals) > 2 and vals[2] is not None else list(range(len(starts)))
    steps = [int(v) for v in vals[3]] if len(vals) > 3 and vals[3] is not None else [1] * len(starts)
    if len(vals) > 2 and vals[2] is None and len(node.inputs) > 3 and node.inputs[3].name:
        return None
    return starts, ends, axes, steps


def _slice(cg: ChannelGraph, node: gs.Node) -> None:
    xs = _space_of(cg, node.inputs[0])
    if xs is None:
        return
    p = slice_params(node)
    rank = _rank(node.inputs[0])
    if p is None or rank is None:
        cg.pin_tensor(xs.tensor.name, f"{node.name}: Slice with computed parameters")
        return
    starts, ends, axes, steps = p
    axes = [a + rank if a < 0 else a for a in axes]
    if xs.axis not in axes:
        _pass_through(cg, node)
        return
    i = axes.index(xs.axis)
    idx = list(range(xs.size))[slice(starts[i], ends[i], steps[i])]
    cg.reads(node, node.inputs[0])
    os_ = cg.add_space(node.outputs[0], len(idx), xs.axis, made=True)
    for k, c in enumerate(idx):
        cg.join(xs.base + c, os_.base + k)
    if steps[i] != 1:
        cg.pin_tensor(xs.tensor.name, f"{node.name}: strided Slice over channels")
    cg.add_item(Item("op", node, xs.tensor.name))


def _pad(cg: ChannelGraph, node: gs.Node) -> None:
    xs = _space_of(cg, node.inputs[0])
    if xs is None:
        return
    pads = node.attrs.get("pads")
    if pads is None and len(node.inputs) > 1:
        c = const_value(node.inputs[1])
        pads = None if c is None else [int(v) for v in c.reshape(-1)]
    rank = _rank(node.inputs[0])
    mode = node.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    value = const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else np.zeros(1)
    axes_in = len(node.inputs) > 3 and node.inputs[3].name
    if pads is None or rank is None or len(pads) != 2 * rank or axes_in or value is None:
        cg.pin_tensor(xs.tensor.name, f"{node.name}: Pad with unknown pads")
        return
    before, after = int(pads[xs.axis]), int(pads[xs.axis + rank])
    if before == 0 and after == 0:
        _pass_through(cg, node)
        return
    cg.reads(node, node.inputs[0])
    os_ = cg.add_space(node.outputs[0], xs.size + before + after, xs.axis, made=True)
    cg.join_range(xs.tensor.name, 0, node.outputs[0].name, before, xs.size)
    if mode != "constant" or np.any(value) or before < 0 or after < 0:
        cg.pin_tensor(node.outputs[0].name, f"{node.name}: channel Pad that is not zero padding")
    else:
        cg.add_item(Item("zero", node, node.outputs[0].name, lo=0, hi=before))
        cg.add_item(Item("zero", node, node.outputs[0].name, lo=before + xs.size, hi=os_.size))
        cg.add_item(Item("op", node, node.outputs[0].name))


def _transpose(cg: ChannelGraph, node: gs.Node) -> None:
    xs = _space_of(cg, node.inputs[0])
    if xs is None:
        return
    perm = node.attrs.get("perm")
    if perm is None:
        rank = _rank(node.inputs[0])
        perm = list(range(rank))[::-1] if rank is not None else None
    if perm is None:
        cg.pin_tensor(xs.tensor.name, f"{node.name}: Transpose of unknown rank")
        return
    _pass_through(cg, node, axis=list(perm).index(xs.axis))


def _resize(cg: ChannelGraph, node: gs.Node) -> None:
    os_ = _pass_through(cg, node)
    if os_ is None:
        return
    consts = [const_value(t) for t in node.inputs[1:] if t.name]
    if len(consts) != len([t for t in node.inputs[1:] if t.name]):
        cg.pin_tensor(os_.tensor.name, f"{node.name}: Resize with computed sizes")
        return
    # the channel entry of scales must be 1 and of sizes must be the channel count
    for c in consts:
        if c is not None and c.size > os_.axis and c.dtype.kind == "i":
            cg.pin_tensor(os_.tensor.name, f"{node.name}: Resize by sizes")


def _reduce(cg: ChannelGraph, node: gs.Node) -> None:
    xs = _space_of(cg, node.inputs[0])
    if xs is None:
        return
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1].name:
        c = const_value(node.inputs[1])
        axes = None if c is None else [int(v) for v in c.reshape(-1)]
    rank = _rank(node.inputs[0])
    keep = int(node.attrs.get("keepdims", 1))
    if axes is None or rank is None:
        return
    axes = [a + rank if a < 0 else a for a in axes]
    if xs.axis in axes:
        return
    new_axis = xs.axis if keep else xs.axis - sum(a < xs.axis for a in axes)
    _pass_through(cg, node, axis=new_axis)


def _flatten(cg: ChannelGraph, node: gs.Node) -> None:
    """Flatten / Reshape to [N, features] read only by linear layers: their rows per channel."""
    xs = _space_of(cg, node.inputs[0])
    if xs is None:
        return
    shape = node.inputs[0].shape
    out = node.outputs[0]
    readers = list({id(n): n for n in out.outputs}.values())
    ok_shape = shape is not None and all(isinstance(d, int) for d in shape[1:]) and xs.axis >= 1
    ok_target = node.op == "Flatten" and int(node.attrs.get("axis", 1)) == 1
    if node.op == "Reshape":
        t = const_value(node.inputs[1])
        ok_target = t is not None and t.size == 2 and (int(t[1]) == -1 or int(t[0]) in (0, -1))
    linear = readers and all(
        r.op in ("Gemm", "MatMul") and r.inputs[0] is out and isinstance(r.inputs[1], gs.Constant)
        and not int(r.attrs.get("transA", 0)) for r in readers
    )  # fmt: skip
    if not (ok_shape and ok_target and linear) or any(t is out for t in cg.graph.outputs):
        cg.pin_tensor(xs.tensor.name, f"{node.name}: {node.op} not read as flattened features by linear layers")
        return
    feats = np.arange(int(np.prod(shape[1:]))).reshape(shape[1:])
    per_channel = np.moveaxis(feats, xs.axis - 1, 0).reshape(xs.size, -1)
    cg.reads(node, node.inputs[0])
    for r in readers:
        cg.add_item(Item("sink", r, xs.tensor.name, features=per_channel))
    cg.add_item(Item("op", node, xs.tensor.name))
    cg.flattened.add(out.name)


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
