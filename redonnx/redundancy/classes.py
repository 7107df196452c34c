"""Channel classes and their sources: what each coupled channel is made of (the rows of the layers
writing it, per-channel parameters, padding), summarized by hashes, the constant value a channel
holds where one can be proven, and the sets of parallel classes the criteria compare.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from redonnx.channels.coupling import ChannelGraph, Item
from redonnx.io.graph import const_value

ZERO_SAFE = {
    "Relu", "LeakyRelu", "PRelu", "Tanh", "HardSwish", "Identity", "Dropout", "Cast", "Neg", "Abs", "Elu",
    "Selu", "Gelu", "Mish", "Erf", "Sign", "Softsign", "MaxPool", "AveragePool", "GlobalAveragePool",
    "GlobalMaxPool", "Concat", "Split", "Slice", "Pad", "Transpose", "ReduceMean", "ReduceMax", "ReduceSum",
    "ReduceMin", "Resize", "Upsample", "Add", "Sub", "Mul", "Div", "Max", "Min", "Sum",
}  # fmt: skip


#: classes summarized together: their float64 rows at most this large (memory stays near one copy
#: of the weights; larger chunks are no faster)
SUMMARY_BYTES = 2**20

HOMOGENEOUS = {
    "Relu", "LeakyRelu", "PRelu", "Identity", "Dropout", "MaxPool", "AveragePool", "GlobalAveragePool",
    "GlobalMaxPool", "Concat", "Split", "Slice", "Pad", "Transpose", "ReduceMean", "ReduceMax", "ReduceSum",
    "Add", "Sub", "Sum", "Mul", "Div",
}  # fmt: skip


@dataclass
class ClassInfo:
    """A channel class's sources, summarized: its rows are read again only when needed (weights can
    be larger than memory allows twice), so the class keeps hashes of them."""

    root: int
    members: list[tuple[str, int]]
    key: tuple
    sig: bytes  # hash of the layer rows (scale with the channel) and per-channel parameters (must be equal)
    direction: bytes | None  # hash of the unit-norm rows rounded to 6 decimals, and the parameters
    norm: float  # of the layer rows
    scaled_size: int
    nodes: list[gs.Node]  # nodes that produce the member tensors
    cg: ChannelGraph = field(repr=False)
    zero_item: bool = False  # some member is zero padding
    zero_ok: bool = False  # every source is zero and every op on the way maps 0 to 0
    sourced: bool = False  # has at least one layer row or padding source
    constants: dict[str, float | None] = field(default_factory=dict)  # tensor -> constant value

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """The layer rows and the per-channel parameters, in float64."""
        return _source_vectors(self.cg, self.members)


@dataclass
class Plan:
    """Channel b of class ``drop`` goes into class ``keep`` with factor ``scale`` (None: removed)."""

    merges: list[tuple[int, int | None, float]] = field(default_factory=list)
    absorb: dict[int, list[tuple[Item, int, float]]] = field(default_factory=dict)  # root -> sink, channel, constant
    recon: list[tuple[str, list[int], list[int], np.ndarray, np.ndarray]] = field(default_factory=list)
    new_sources: dict[int, np.ndarray] = field(default_factory=dict)  # relaxed: averaged sources
    exact: dict[int, str] = field(default_factory=dict)  # dropped root -> what the exact merge was

    def undo(self, roots: set[int]) -> None:
        """Forget exact merges (channel counts would otherwise leave the runtime's fast path)."""
        self.merges = [m for m in self.merges if m[0] not in roots]
        for r in roots:
            self.absorb.pop(r, None)
            self.exact.pop(r, None)


def _channel_slice(values: np.ndarray, axis: int, c: int) -> np.ndarray:
    """Channel ``c`` along ``axis``, flattened, in float64 (slicing first: weights can be large)."""
    return np.take(values, c, axis=axis).reshape(-1).astype(np.float64)


class _Rows:
    """Output-channel rows of the last layer read, channel-major (columns of a MatMul weight
    are strided: slicing them one at a time is slow on large layers)."""

    def __init__(self) -> None:
        self._cache: dict[int, np.ndarray] = {}
        self._zero: dict[int, np.ndarray] = {}

    def zero(self, node: gs.Node) -> np.ndarray:
        """Which output channels of a layer have all-zero weights (once per layer)."""
        if id(node) not in self._zero:
            self._zero[id(node)] = zero_rows(node, self)
        return self._zero[id(node)]

    def get(self, node: gs.Node) -> np.ndarray:
        w = np.asarray(node.inputs[1].values)
        axis = out_axis(node)
        if axis == 0:
            return w.reshape(w.shape[0], -1)
        if id(node) not in self._cache:
            if self._cache:
                self._cache.pop(next(iter(self._cache)))
            self._cache[id(node)] = np.ascontiguousarray(np.moveaxis(w, axis, 0)).reshape(w.shape[axis], -1)
        return self._cache[id(node)]


def zero_rows(node: gs.Node, rows: _Rows | None = None) -> np.ndarray:
    """Per output channel of a layer: whether its weights are all zero."""
    w = np.asarray(node.inputs[1].values)
    axis = out_axis(node)
    mat = rows.get(node) if rows is not None else np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    return ~np.any(mat, axis=1)


def channel_row(node: gs.Node, c: int, rows: _Rows | None = None) -> np.ndarray:
    """Weights and bias of output channel ``c`` of a layer."""
    w = np.asarray(node.inputs[1].values)
    bias = const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    parts = [rows.get(node)[c].astype(np.float64) if rows is not None else _channel_slice(w, out_axis(node), c)]
    if bias is not None:
        b = bias.reshape(-1)
        parts.append((b[c : c + 1] if b.size > 1 else b).astype(np.float64))
    return np.concatenate(parts)


def out_axis(node: gs.Node) -> int:
    if node.op == "ConvTranspose":
        return 1
    if node.op == "Gemm":
        return 0 if int(node.attrs.get("transB", 0)) else 1
    if node.op == "MatMul":
        return 1
    return 0


def param_axis(values: np.ndarray, size: int) -> int:
    axes = [i for i, d in enumerate(values.shape) if d == size]
    return axes[-1] if axes else 0


def class_infos(cg: ChannelGraph, memo: dict | None = None) -> tuple[dict[int, ClassInfo], dict[int, str]]:
    """Every unpinned class, summarized; ``memo`` keeps the row summaries between budget trials."""
    pinned = cg.pinned_roots()
    rows = _Rows()
    todo: dict[int, list[tuple[str, int]]] = {}
    for root, members in cg.classes().items():
        if root in pinned:
            continue
        tensors = [t for t, _ in members]
        if len(set(tensors)) != len(tensors):
            pinned[root] = f"{tensors[0]}: a class holds two channels of one tensor"
            continue
        todo[root] = members
    new = [m for m in todo.values() if memo is None or tuple(sorted(m)) not in memo]
    summaries = _summaries(cg, new, rows)
    keeps: dict[tuple, np.ndarray] = {}
    infos = {root: class_info(cg, root, members, memo, summaries, keeps) for root, members in todo.items()}
    return infos, pinned


def _source_vectors(
    cg: ChannelGraph, members: list[tuple[str, int]], rows: _Rows | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A class's layer rows and per-channel parameters, concatenated in member order (float64)."""
    scaled: list[np.ndarray] = []
    fixed: list[np.ndarray] = []
    for t, c in sorted(members):
        for it in cg.items.get(t, []):
            if it.kind == "row":
                scaled.append(channel_row(it.node, c, rows))
            elif it.kind == "param":
                v = const_value(it.node.inputs[it.index])
                fixed.append(_channel_slice(v, param_axis(v, cg.spaces[t].size), c))
    return (np.concatenate(scaled) if scaled else np.zeros(0)), (np.concatenate(fixed) if fixed else np.zeros(0))


def _digest(*parts: np.ndarray) -> bytes:
    h = hashlib.sha1()
    for p in parts:
        h.update(np.ascontiguousarray(p).tobytes())
        h.update(b"|")
    return h.digest()


def class_info(
    cg: ChannelGraph, root: int, members: list[tuple[str, int]], memo: dict | None,
    summaries: dict[tuple, tuple], keeps: dict[tuple, np.ndarray],
) -> ClassInfo:  # fmt: skip
    """A class summarized; ``memo`` (the budget search: every trial starts from the same graph)
    keeps everything but the node references between trials. ``summaries``: its sources' summary
    (:func:`_summaries`, for every class the memo does not hold); ``keeps``: per-channel parameter
    checks, per layer."""
    mkey = tuple(sorted(members))
    nodes = [p for t, _c in mkey if (p := cg.producer(t)) is not None]
    hit = memo.get(mkey) if memo is not None else None
    if hit is None:
        key: list[tuple] = [("tensors", tuple(sorted(t for t, _ in members)))]
        zero_item = False
        zero_ok = True
        for t, c in mkey:
            for it in cg.items.get(t, []):
                if it.kind == "row":
                    key.append(("row", it.node.name))
                elif it.kind == "param":
                    key.append(("param", it.node.name, it.index))
                    zero_ok = zero_ok and _param_keeps_zero(it, cg, t, c, keeps)
                elif it.kind == "zero" and it.lo <= c < it.hi:
                    key.append(("zero", it.node.name))
                    zero_item = True
        has_rows = any(k[0] == "row" for k in key)
        summary = summaries[mkey]
        zero_ok = zero_ok and not summary[4] and all(_op_keeps_zero(n) for n in nodes)
        hit = (tuple(key), zero_item, zero_ok, has_rows, summary)
        if memo is not None:
            memo[mkey] = hit
    key, zero_item, zero_ok, has_rows, (sig, direction, norm, size, _nonzero, constants) = hit
    return ClassInfo(
        root,
        members,
        key,
        sig=sig,
        direction=direction,
        norm=norm,
        scaled_size=size,
        nodes=nodes,
        cg=cg,
        zero_item=zero_item,
        zero_ok=zero_ok,
        sourced=has_rows or zero_item,
        constants=constants,
    )


def _summaries(cg: ChannelGraph, classes: list[list[tuple[str, int]]], rows: _Rows) -> dict[tuple, tuple]:
    """Per class (by its sorted members): hashes of its sources (:func:`_source_vectors`: the layer
    rows, and the unit-norm rows rounded), their norm, size and non-zeroness, and its constant
    values. Classes over the same tensors read the same layers, so each layer's rows are taken
    for all of them as one matrix (a chunk of classes at a time)."""
    by_tensors: dict[tuple, list[tuple]] = defaultdict(list)
    for members in classes:
        mkey = tuple(sorted(members))
        by_tensors[tuple(t for t, _ in mkey)].append(mkey)
    out: dict[tuple, tuple] = {}
    for tensors, group in by_tensors.items():
        width = max(_row_width(cg, tensors), 1)
        step = max(1, SUMMARY_BYTES // (8 * width))  # float64 rows of a chunk of classes at a time
        for start in range(0, len(group), step):
            out.update(_summarize_chunk(cg, tensors, group[start : start + step], rows))
    return out


def _row_width(cg: ChannelGraph, tensors: tuple[str, ...]) -> int:
    """Length of a class's concatenated layer rows and parameters (classes over ``tensors``)."""
    width = 0
    for t in tensors:
        for it in cg.items.get(t, []):
            if it.kind in ("row", "param"):
                v = it.node.inputs[1 if it.kind == "row" else it.index]
                shape = getattr(v, "shape", None) or ()
                width += int(np.prod(shape)) // max(cg.spaces[t].size, 1) + 1
    return width


def _summarize_chunk(cg: ChannelGraph, tensors: tuple[str, ...], mkeys: list[tuple], rows: _Rows) -> dict:
    """:func:`_summaries` of classes over ``tensors`` (sorted members ``mkeys``)."""
    n = len(mkeys)
    idx = np.array([[c for _t, c in m] for m in mkeys]).reshape(n, len(tensors))
    scaled, fixed = _source_matrices(cg, tensors, idx, rows)
    has_rows = scaled is not None
    scaled = scaled if scaled is not None else np.zeros((n, 0))
    fixed = fixed if fixed is not None else np.zeros((n, 0))
    norms = [float(np.linalg.norm(r)) for r in scaled]
    with np.errstate(divide="ignore", invalid="ignore"):
        unit = np.round(scaled / np.array(norms).reshape(-1, 1), 6)
    nonzero = np.any(scaled, axis=1)
    may = _may_be_constant_rows(cg, tensors, idx, rows) if has_rows else np.zeros(n, bool)
    out: dict[tuple, tuple] = {}
    for i, mkey in enumerate(mkeys):
        direction = _digest(unit[i], fixed[i]) if norms[i] > 0 else None
        constants = _constants(cg, list(mkey), rows) if may[i] else {}
        out[mkey] = (_digest(scaled[i], fixed[i]), direction, norms[i], scaled.shape[1], bool(nonzero[i]), constants)
    return out


def _source_matrices(
    cg: ChannelGraph, tensors: tuple[str, ...], idx: np.ndarray, rows: _Rows
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """:func:`_source_vectors` of classes over ``tensors`` (``idx[i, j]``: class i's channel in tensor j),
    one row per class (None where there is no part of that kind)."""
    scaled: list[np.ndarray] = []
    fixed: list[np.ndarray] = []
    n = len(idx)
    for j, t in enumerate(tensors):
        at = idx[:, j]
        for it in cg.items.get(t, []):
            if it.kind == "row":
                node = it.node
                part = [rows.get(node)[at].astype(np.float64)]
                bias = const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
                if bias is not None:
                    b = bias.reshape(-1).astype(np.float64)
                    part.append(b[at].reshape(n, 1) if b.size > 1 else np.broadcast_to(b, (n, 1)))
                scaled.append(np.concatenate(part, axis=1))
            elif it.kind == "param":
                v = np.asarray(const_value(it.node.inputs[it.index]))
                axis = param_axis(v, cg.spaces[t].size)
                fixed.append(np.moveaxis(np.take(v, at, axis=axis), axis, 0).reshape(n, -1).astype(np.float64))
    return (np.concatenate(scaled, axis=1) if scaled else None), (np.concatenate(fixed, axis=1) if fixed else None)


def _may_be_constant_rows(cg: ChannelGraph, tensors: tuple[str, ...], idx: np.ndarray, rows: _Rows) -> np.ndarray:
    """Per class over ``tensors`` (channels ``idx``): False when no member can hold a constant. A
    constant starts at zero padding, a layer row of zero weights, or a node computing from constants
    alone; every other member derives from members."""
    may = np.zeros(len(idx), bool)
    members = set(tensors)
    for j, t in enumerate(tensors):
        at = idx[:, j]
        for it in cg.items.get(t, []):
            if it.kind == "zero":
                may |= (it.lo <= at) & (at < it.hi)
        n = cg.producer(t)
        if n is None:
            continue
        if _plain_layer(n):
            may |= rows.zero(n)[at]
        elif not any(x.name in members for x in n.inputs if x.name):
            may[:] = True
    return may


def _constants(cg: ChannelGraph, members: list[tuple[str, int]], rows: _Rows | None = None) -> dict[str, float | None]:
    """The constant value of the channel in each member tensor (None where it varies).

    A layer row with zero weights makes its bias a constant channel; element-wise ops map
    constants to constants. Spatial zero padding breaks a non-zero constant at the borders.
    """
    at = dict(members)
    if not _may_be_constant(cg, at, rows):
        return {}  # no source can be constant: every member varies (most classes of a trained net)
    order = cg.node_order()
    value: dict[str, float | None] = {}
    for t in sorted(at, key=lambda name: order.get(id(cg.producer(name)), -1)):
        value[t] = _const_of(cg, t, at[t], value, at, rows)
    return value


def _padded(cg: ChannelGraph, t: str, c: int) -> bool:
    """Whether channel ``c`` of ``t`` is zero padding."""
    return any(it.kind == "zero" and it.lo <= c < it.hi for it in cg.items.get(t, []))


def _plain_layer(n: gs.Node) -> bool:
    """A layer whose output channel is its own row of weights (not grouped)."""
    return n.op in ("Conv", "ConvTranspose", "Gemm", "MatMul") and int(n.attrs.get("group", 1)) == 1


def _zero_row(n: gs.Node, c: int, rows: _Rows | None) -> bool:
    return bool((rows.zero(n) if rows is not None else zero_rows(n))[c])


def _may_be_constant(cg: ChannelGraph, at: dict[str, int], rows: _Rows | None) -> bool:
    """:func:`_may_be_constant_rows` of one class (members ``at``)."""
    return bool(_may_be_constant_rows(cg, tuple(at), np.array([list(at.values())]), rows or _Rows())[0])


def _const_of(
    cg: ChannelGraph, t: str, c: int, value: dict[str, float | None], at: dict[str, int], rows: _Rows | None
) -> float | None:
    if _padded(cg, t, c):
        return 0.0
    n = cg.producer(t)
    if n is None:
        return None
    if _plain_layer(n):
        if not _zero_row(n, c, rows):
            return None  # weights that read the input: not a constant
        bias = const_value(n.inputs[2]) if len(n.inputs) > 2 and n.inputs[2].name else None
        if bias is None:
            return 0.0
        b = bias.reshape(-1)
        return float(b[c] if b.size > 1 else b[0])
    ins = [value.get(x.name) if x.name in at else _scalar_param(cg, n, x, t, c) for x in n.inputs if x.name]
    if not ins or (ins[0] is None and n.op not in ("Add", "Sub", "Mul", "Div", "Max", "Min")):
        return None
    return _eval(n, ins, c)


def _scalar_param(cg: ChannelGraph, n: gs.Node, x: gs.Tensor, t: str, c: int) -> float | None:
    v = const_value(x)
    if v is None:
        return None
    if v.size == 1:
        return float(v.reshape(-1)[0])
    if v.size == cg.spaces[t].size or cg.spaces[t].size in v.shape:
        return float(_channel_slice(np.asarray(v), param_axis(v, cg.spaces[t].size), c)[0])
    return None


def _eval(n: gs.Node, ins: list[float | None], c: int) -> float | None:
    x = ins[0]
    op = n.op
    if op in ("Identity", "Dropout", "Cast", "MaxPool", "GlobalAveragePool", "GlobalMaxPool", "Resize",
              "Upsample", "Concat", "Split", "Slice", "Transpose", "ReduceMean", "ReduceMax", "ReduceMin"):  # fmt: skip
        if op in ("MaxPool", "AveragePool") and x != 0 and any(int(p) for p in n.attrs.get("pads", [0])):
            return None if op == "AveragePool" else x
        return x
    if op == "Pad":
        return x if x == 0 else None
    if op == "Relu":
        return max(x, 0.0)
    if op == "LeakyRelu":
        return x if x >= 0 else x * float(n.attrs.get("alpha", 0.01))
    if op == "Clip":
        lo = ins[1] if len(ins) > 1 and ins[1] is not None else n.attrs.get("min", -np.inf)
        hi = ins[2] if len(ins) > 2 and ins[2] is not None else n.attrs.get("max", np.inf)
        return float(np.clip(x, lo, hi))
    if op == "Sigmoid":
        return float(1 / (1 + np.exp(-x)))
    if op == "Tanh":
        return float(np.tanh(x))
    if op == "Erf":  # GELU's erf form: 0.5 x (1 + erf(x / sqrt 2))
        return float(math.erf(x))
    if op == "Pow" and len(ins) == 2 and ins[1] is not None:  # GELU's tanh form: x^3
        return float(x ** ins[1]) if x > 0 or float(ins[1]).is_integer() else None
    if op == "HardSigmoid":
        return float(np.clip(float(n.attrs.get("alpha", 0.2)) * x + float(n.attrs.get("beta", 0.5)), 0, 1))
    if op == "HardSwish":
        return float(x * np.clip(x / 6 + 0.5, 0, 1))
    if op in ("Add", "Sub", "Mul", "Div", "Max", "Min") and len(ins) == 2:
        a, b = ins
        if a is None or b is None or (op == "Div" and b == 0):
            return None
        return {"Add": a + b, "Sub": a - b, "Mul": a * b, "Div": a / b if b else 0.0, "Max": max(a, b),
                "Min": min(a, b)}[op]  # fmt: skip
    if op == "PRelu" and len(ins) == 2 and ins[1] is not None:
        return x if x >= 0 else x * ins[1]
    if op == "BatchNormalization" and all(v is not None for v in ins[1:5]):
        g, b, m, var = ins[1:5]
        return float((x - m) * g / np.sqrt(var + float(n.attrs.get("epsilon", 1e-5))) + b)
    if op == "Conv":  # depthwise
        pads = any(int(p) for p in n.attrs.get("pads", [0]))
        w = float(np.sum(np.asarray(n.inputs[1].values)[c], dtype=np.float64))
        b = ins[2] if len(ins) > 2 and ins[2] is not None else 0.0
        return b if x == 0 else (None if pads else x * w + b)
    return None


def _param_keeps_zero(it: Item, cg: ChannelGraph, t: str, c: int, keeps: dict[tuple, np.ndarray] | None = None) -> bool:
    """Does this per-channel parameter map a zero channel c to zero? (``keeps``: the answer for
    every channel of the parameter, worked out once.)"""
    key = (id(it.node), it.index, t)
    per = keeps.get(key) if keeps is not None else None
    if per is None:
        per = _keeps_zero(it, cg.spaces[t].size)
        if keeps is not None:
            keeps[key] = per
    return bool(per[c])


def _keeps_zero(it: Item, size: int) -> np.ndarray:
    """Per channel of a tensor of ``size`` channels: does this parameter map a zero channel to zero?"""
    node = it.node
    v = np.asarray(const_value(node.inputs[it.index]), np.float64)
    axis = param_axis(v, size)
    at = np.moveaxis(v, axis, 0).reshape(v.shape[axis], -1)  # row c: the parameter's values at channel c
    if node.op in ("Mul", "PRelu"):
        return np.ones(len(at), bool)
    if node.op == "Div":
        return np.all(at != 0, axis=1) & (it.index == 1)
    if node.op in ("Add", "Sub"):
        return ~np.any(at, axis=1)
    if node.op == "Conv":  # depthwise: the kernel is fine, the bias must be zero
        return np.ones(len(at), bool) if it.index == 1 else ~np.any(at, axis=1)
    if node.op == "BatchNormalization":
        p = [np.asarray(const_value(node.inputs[i]), np.float64).reshape(-1) for i in range(1, 5)]
        eps = float(node.attrs.get("epsilon", 1e-5))
        return p[1] - p[2] * p[0] / np.sqrt(p[3] + eps) == 0
    return np.zeros(len(at), bool)


def _op_keeps_zero(n: gs.Node) -> bool:
    if n.op in ("Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "PRelu"):
        return True  # their parameters are checked per channel
    if n.op == "Clip":
        return clip_has_zero(n)
    if n.op not in ZERO_SAFE:
        return False
    if n.op in ("Add", "Sub", "Max", "Min"):
        return not any(isinstance(t, gs.Constant) and t.values.size == 1 and np.any(t.values) for t in n.inputs)
    if n.op == "Div":
        return not isinstance(n.inputs[0], gs.Constant)
    return True


def parallel_groups(infos: dict[int, ClassInfo]) -> dict[tuple, list[ClassInfo]]:
    groups: dict[tuple, list[ClassInfo]] = defaultdict(list)
    for info in infos.values():
        groups[info.key].append(info)
    return groups


def sink_columns(it: Item, c: int) -> np.ndarray:
    w = np.asarray(it.node.inputs[1].values)
    idx = it.features[c] if it.features is not None else [c]
    return np.take(w, idx, axis=in_axis(it.node)).astype(np.float64)


def in_axis(node: gs.Node) -> int:
    if node.op == "Conv":
        return 1
    if node.op == "Gemm":
        return 1 if int(node.attrs.get("transB", 0)) else 0
    return 0  # ConvTranspose weight [C_in, ...], MatMul weight [K, M]


def clip_has_zero(n: gs.Node) -> bool:
    lo = const_value(n.inputs[1]) if len(n.inputs) > 1 and n.inputs[1].name else n.attrs.get("min")
    hi = const_value(n.inputs[2]) if len(n.inputs) > 2 and n.inputs[2].name else n.attrs.get("max")
    return (lo is None or float(np.min(lo)) <= 0) and (hi is None or float(np.max(hi)) >= 0)
