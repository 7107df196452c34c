"""merge-channels: merge redundant output channels (RED step 2, neuron merging).

A *class* of coupled channels (see :mod:`redonnx.channels`) is defined by its *sources*: the rows
(weights and bias) of every layer writing it, per-channel parameters on the way (PRelu slopes,
per-channel Mul/Add constants, depthwise kernels), zero padding. It is read by its *sinks*:
columns of the layers reading it. Two parallel classes a and b (same sources, same tensors):

- identical sources: every tensor holds the same values in channel b as in channel a, so
  channel b is dropped everywhere and each sink gets col_a += col_b (exact, paper eq. 2);
- sources that are a positive multiple, r_b = s r_a with s > 0, through positively homogeneous
  ops only (ReLU, LeakyReLU, PRelu, max/avg pooling, Add of coupled branches): channel b = s
  channel a, so col_a += s col_b (exact; beyond the paper);
- identically zero: every source is zero and every op maps 0 to 0: the channel is dropped and
  its columns with it (exact).

``alpha > 0`` relaxes this (lossy): within each set of parallel classes, the alpha fraction of
channels (per-layer alpha from ``alpha_strategy``: constant, or the paper's block rule by thirds
of depth: max(2a-1, 0), a, min(2a, 1)) is merged greedily by increasing cost, each merged group
taking the mean of its sources. ``merge_criterion=paper`` ranks pairs by the Euclidean distance
of their sources; ``output`` (default) by the distance times the norm of the removed channel's
sink columns, i.e. the size of the change the merge makes in the consumers' outputs, and takes
the importance-weighted mean.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from redonnx import reconstruct as R
from redonnx.channels import ChannelGraph, Item, analyze
from redonnx.errors import RedonnxError
from redonnx.graph import add_to_bias, const_value, set_input_values
from redonnx.passes.base import Decline, PassContext, PassResult
from redonnx.shapes import annotate_graph

name = "merge-channels"
exact = True  # with alpha = 0; see is_exact

ZERO_SAFE = {
    "Relu", "LeakyRelu", "PRelu", "Tanh", "HardSwish", "Identity", "Dropout", "Cast", "Neg", "Abs", "Elu",
    "Selu", "Gelu", "Mish", "Erf", "Sign", "Softsign", "MaxPool", "AveragePool", "GlobalAveragePool",
    "GlobalMaxPool", "Concat", "Split", "Slice", "Pad", "Transpose", "ReduceMean", "ReduceMax", "ReduceSum",
    "ReduceMin", "Resize", "Upsample", "Add", "Sub", "Mul", "Div", "Max", "Min", "Sum",
}  # fmt: skip
CHANNEL_MULTIPLE = 1  # 8 keeps onnxruntime CPU convs on their blocked fast path
HOMOGENEOUS = {
    "Relu", "LeakyRelu", "PRelu", "Identity", "Dropout", "MaxPool", "AveragePool", "GlobalAveragePool",
    "GlobalMaxPool", "Concat", "Split", "Slice", "Pad", "Transpose", "ReduceMean", "ReduceMax", "ReduceSum",
    "Add", "Sub", "Sum", "Mul", "Div",
}  # fmt: skip


def is_exact(options: dict[str, Any]) -> bool:
    return float(options.get("alpha", 0.0)) == 0.0 and not float(options.get("error_budget") or 0.0)


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


def run(graph: gs.Graph, ctx: PassContext) -> PassResult:
    res = PassResult(name)
    alpha = float(ctx.options.get("alpha", 0.0))
    if not 0.0 <= alpha < 1.0:
        raise RedonnxError("--alpha must be in [0, 1)")
    annotate_graph(graph)
    cg = analyze(graph)
    cache = ctx.options.get("stats_cache")  # the budget search: every trial starts from the same model
    infos, pinned = _class_infos(cg, cache.setdefault("class_sources", {}) if cache is not None else None)
    _report_pins(res, pinned)
    groups = _parallel_groups(infos)
    plan = Plan()
    for _key, members in groups.items():
        _exact_merges(cg, members, plan)
    multiple = channel_multiple(ctx.options)
    budget = ctx.options.get("error_budget")
    if alpha > 0 or budget:
        criterion = ctx.options.get("merge_criterion", "reconstruct")
        if criterion == "paper":
            _paper_merges(groups, plan, res, alpha, ctx.options)
        elif criterion == "reconstruct":
            _relaxed_removals(graph, cg, groups, plan, res, alpha, ctx.options, multiple, budget)
        else:
            raise RedonnxError("--merge-criterion must be reconstruct or paper")
    else:
        _align(plan, groups, [], multiple)
    for kind in plan.exact.values():
        res.count(kind)
    if plan.merges:
        res.kept = _apply(cg, infos, plan)
        graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=False)
    return res


# ------------------------------------------------------------------ sources of a class


def _channel_slice(values: np.ndarray, axis: int, c: int) -> np.ndarray:
    """Channel ``c`` along ``axis``, flattened, in float64 (slicing first: weights can be large)."""
    return np.take(values, c, axis=axis).reshape(-1).astype(np.float64)


class _Rows:
    """Output-channel rows of the last layer read, channel-major (columns of a MatMul weight
    are strided: slicing them one at a time is slow on large layers)."""

    def __init__(self) -> None:
        self._cache: dict[int, np.ndarray] = {}

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


def _row(node: gs.Node, c: int, rows: _Rows | None = None) -> np.ndarray:
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


def _param_axis(values: np.ndarray, size: int) -> int:
    axes = [i for i, d in enumerate(values.shape) if d == size]
    return axes[-1] if axes else 0


def _class_infos(cg: ChannelGraph, memo: dict | None = None) -> tuple[dict[int, ClassInfo], dict[int, str]]:
    """Every unpinned class, summarized; ``memo`` keeps the row summaries between budget trials."""
    pinned = cg.pinned_roots()
    infos: dict[int, ClassInfo] = {}
    rows = _Rows()
    for root, members in cg.classes().items():
        if root in pinned:
            continue
        tensors = [t for t, _ in members]
        if len(set(tensors)) != len(tensors):
            pinned[root] = f"{tensors[0]}: a class holds two channels of one tensor"
            continue
        infos[root] = _class_info(cg, root, members, rows, memo)
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
                scaled.append(_row(it.node, c, rows))
            elif it.kind == "param":
                v = const_value(it.node.inputs[it.index])
                fixed.append(_channel_slice(v, _param_axis(v, cg.spaces[t].size), c))
    return (np.concatenate(scaled) if scaled else np.zeros(0)), (np.concatenate(fixed) if fixed else np.zeros(0))


def _digest(*parts: np.ndarray) -> bytes:
    h = hashlib.sha1()
    for p in parts:
        h.update(np.ascontiguousarray(p).tobytes())
        h.update(b"|")
    return h.digest()


def _class_info(
    cg: ChannelGraph, root: int, members: list[tuple[str, int]], rows: _Rows, memo: dict | None = None
) -> ClassInfo:
    """A class summarized; ``memo`` (the budget search: every trial starts from the same graph)
    keeps everything but the node references between trials."""
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
                    zero_ok = zero_ok and _param_keeps_zero(it, cg, t, c)
                elif it.kind == "zero" and it.lo <= c < it.hi:
                    key.append(("zero", it.node.name))
                    zero_item = True
        has_rows = any(k[0] == "row" for k in key)
        summary = _summarize_sources(cg, members, rows, has_rows)
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


def _summarize_sources(cg: ChannelGraph, members: list[tuple[str, int]], rows: _Rows, has_rows: bool) -> tuple:
    """Hashes, norm, size and non-zeroness of a class's rows, and its constant values."""
    scaled, fixed = _source_vectors(cg, members, rows)
    norm = float(np.linalg.norm(scaled))
    direction = _digest(np.round(scaled / norm, 6), fixed) if norm > 0 else None
    constants = _constants(cg, members, rows) if has_rows else {}
    return _digest(scaled, fixed), direction, norm, scaled.size, bool(np.any(scaled)), constants


def _constants(cg: ChannelGraph, members: list[tuple[str, int]], rows: _Rows | None = None) -> dict[str, float | None]:
    """The constant value of the channel in each member tensor (None where it varies).

    A layer row with zero weights makes its bias a constant channel; element-wise ops map
    constants to constants. Spatial zero padding breaks a non-zero constant at the borders.
    """
    at = dict(members)
    order = {id(n): i for i, n in enumerate(cg.graph.nodes)}
    value: dict[str, float | None] = {}
    for t in sorted(at, key=lambda name: order.get(id(cg.producer(name)), -1)):
        value[t] = _const_of(cg, t, at[t], value, at, rows)
    return value


def _const_of(
    cg: ChannelGraph, t: str, c: int, value: dict[str, float | None], at: dict[str, int], rows: _Rows | None
) -> float | None:
    for it in cg.items.get(t, []):
        if it.kind == "zero" and it.lo <= c < it.hi:
            return 0.0
    n = cg.producer(t)
    if n is None:
        return None
    if n.op in ("Conv", "ConvTranspose", "Gemm", "MatMul") and int(n.attrs.get("group", 1)) == 1:
        row = _row(n, c, rows)
        nw = np.asarray(n.inputs[1].values).size // cg.spaces[t].size
        return float(row[nw]) if not np.any(row[:nw]) and row.size > nw else (0.0 if not np.any(row) else None)
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
        return float(_channel_slice(np.asarray(v), _param_axis(v, cg.spaces[t].size), c)[0])
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


def _param_keeps_zero(it: Item, cg: ChannelGraph, t: str, c: int) -> bool:
    """Does this per-channel parameter map a zero channel c to zero?"""
    node = it.node
    v = np.asarray(const_value(node.inputs[it.index]), np.float64)
    at = _channel_slice(v, _param_axis(v, cg.spaces[t].size), c)
    if node.op in ("Mul", "PRelu"):
        return True
    if node.op == "Div":
        return it.index == 1 and bool(np.all(at != 0))
    if node.op in ("Add", "Sub"):
        return not np.any(at)
    if node.op == "Conv":  # depthwise: the kernel is fine, the bias must be zero
        return it.index == 1 or not np.any(at)
    if node.op == "BatchNormalization":
        p = [np.asarray(const_value(node.inputs[i]), np.float64).reshape(-1)[c] for i in range(1, 5)]
        eps = float(node.attrs.get("epsilon", 1e-5))
        return bool(p[1] - p[2] * p[0] / np.sqrt(p[3] + eps) == 0)
    return False


def _op_keeps_zero(n: gs.Node) -> bool:
    if n.op in ("Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "PRelu"):
        return True  # their parameters are checked per channel
    if n.op == "Clip":
        return _clip_has_zero(n)
    if n.op not in ZERO_SAFE:
        return False
    if n.op in ("Add", "Sub", "Max", "Min"):
        return not any(isinstance(t, gs.Constant) and t.values.size == 1 and np.any(t.values) for t in n.inputs)
    if n.op == "Div":
        return not isinstance(n.inputs[0], gs.Constant)
    return True


def _report_pins(res: PassResult, pinned: dict[int, str]) -> None:
    counts: dict[str, int] = defaultdict(int)
    for reason in pinned.values():
        counts[reason] += 1
    for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        res.declined.append(Decline("<channels>", "", f"{n} channel(s) left alone: {reason}"))


def _parallel_groups(infos: dict[int, ClassInfo]) -> dict[tuple, list[ClassInfo]]:
    groups: dict[tuple, list[ClassInfo]] = defaultdict(list)
    for info in infos.values():
        groups[info.key].append(info)
    return groups


# ------------------------------------------------------------------ exact merging


def _clip_has_zero(n: gs.Node) -> bool:
    lo = const_value(n.inputs[1]) if len(n.inputs) > 1 and n.inputs[1].name else n.attrs.get("min")
    hi = const_value(n.inputs[2]) if len(n.inputs) > 2 and n.inputs[2].name else n.attrs.get("max")
    return (lo is None or float(np.min(lo)) <= 0) and (hi is None or float(np.max(hi)) >= 0)


def _homogeneous(info: ClassInfo) -> bool:
    """Does scaling the class's layer rows by s > 0 scale its values everywhere by s?"""
    for n in info.nodes:
        if n.op in ("Conv", "ConvTranspose") and int(n.attrs.get("group", 1)) > 1:
            return False  # depthwise: its bias would not scale
        if n.op in ("Conv", "ConvTranspose", "Gemm", "MatMul", "Concat", "Split", "Slice", "Pad"):
            continue
        if n.op not in HOMOGENEOUS:
            return False
        n_act = sum(isinstance(t, gs.Variable) for t in n.inputs)
        if n.op in ("Mul", "Div") and n_act > 1:
            return False
        if n.op in ("Add", "Sub", "Sum") and n_act < sum(1 for t in n.inputs if t.name):
            return False  # adds a constant: affine, not homogeneous
    return True


def _constant_removal(cg: ChannelGraph, info: ClassInfo) -> list[tuple[Item, int, float]] | None:
    """Sink bias updates that remove a constant channel exactly, or None when it cannot go."""
    if info.zero_ok:
        return []
    updates = []
    for t, c in info.members:
        for it in cg.items.get(t, []):
            if it.kind != "sink":
                continue
            k = info.constants.get(t)
            if k is None:
                return None
            if k != 0:
                if not _absorbs(it.node):
                    return None
                updates.append((it, c, k))
    return updates


def _absorbs(node: gs.Node) -> bool:
    """Can a layer take a constant input channel into its bias exactly (no zero padding)?"""
    if node.op in ("Gemm", "MatMul"):
        return True
    if node.op == "Conv":
        pads = any(int(p) for p in node.attrs.get("pads", [0]))
        return not pads and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")
    return False


def _exact_merges(cg: ChannelGraph, members: list[ClassInfo], plan: Plan) -> None:
    keep_by_sig: dict[bytes, ClassInfo] = {}
    for info in sorted(members, key=lambda i: i.root):
        if not info.sourced:
            continue
        absorb = _constant_removal(cg, info)
        if absorb is not None:
            plan.merges.append((info.root, None, 0.0))
            plan.absorb[info.root] = absorb
            plan.exact[info.root] = "constant channels removed" if absorb else "zero channels removed"
            continue
        keep = keep_by_sig.get(info.sig)
        if keep is not None and _same_vectors(keep, info):
            plan.merges.append((info.root, keep.root, 1.0))
            plan.exact[info.root] = "identical channels merged"
            continue
        keep_by_sig.setdefault(info.sig, info)
    _scaled_merges(list(keep_by_sig.values()), plan)


def _same_vectors(a: ClassInfo, b: ClassInfo) -> bool:
    """Confirm a hash match: equal rows and parameters."""
    return all(np.array_equal(x, y) for x, y in zip(a.vectors(), b.vectors(), strict=True))


def _scaled_merges(infos: list[ClassInfo], plan: Plan) -> None:
    """Channels whose rows are positive multiples of another's, through homogeneous ops only.

    Candidates meet on their unit-norm rows rounded to 6 decimals (linear time, where comparing
    all pairs would cost C^2 d); each pair is then confirmed to 1e-6."""
    by_dir: dict[bytes, ClassInfo] = {}
    for info in infos:
        if info.direction is None or not _homogeneous(info):
            continue
        keep = by_dir.setdefault(info.direction, info)
        if keep is info:
            continue
        s = info.norm / keep.norm
        (a, fa), (b, fb) = info.vectors(), keep.vectors()
        if np.allclose(a, s * b, rtol=1e-6, atol=1e-9 * info.norm) and np.array_equal(fa, fb):
            plan.merges.append((info.root, keep.root, float(s)))
            plan.exact[info.root] = "scaled channels merged"


# ------------------------------------------------------------------ relaxed merging


def _layer_alphas(groups: dict[tuple, list[ClassInfo]], alpha: float, strategy: str) -> dict[tuple, float]:
    keys = list(groups)
    if strategy == "constant":
        return dict.fromkeys(keys, alpha)
    if strategy != "block":
        raise RedonnxError("--alpha-strategy must be constant or block")
    n = len(keys)
    third = [max(2 * alpha - 1, 0.0), alpha, min(2 * alpha, 0.95)]
    return {k: third[min(3 * i // max(n, 1), 2)] for i, k in enumerate(keys)}


def _sink_columns(it: Item, c: int) -> np.ndarray:
    w = np.asarray(it.node.inputs[1].values)
    idx = it.features[c] if it.features is not None else [c]
    return np.take(w, idx, axis=_in_axis(it.node)).astype(np.float64)


def _in_axis(node: gs.Node) -> int:
    if node.op == "Conv":
        return 1
    if node.op == "Gemm":
        return 1 if int(node.attrs.get("transB", 0)) else 0
    return 0  # ConvTranspose weight [C_in, ...], MatMul weight [K, M]


def _paper_merges(
    groups: dict[tuple, list[ClassInfo]], plan: Plan, res: PassResult, alpha: float, options: dict[str, Any]
) -> None:
    """The paper's relaxed merging: per group, merge the closest rows (alpha of them), mean rows."""
    alphas = _layer_alphas(groups, alpha, options.get("alpha_strategy", "constant"))
    gone = {m[0] for m in plan.merges}
    for key, members in groups.items():
        alive = [i for i in members if i.root not in gone and i.sourced and not i.zero_item]
        n_merge = round(alphas[key] * len(alive))
        if n_merge < 1 or len(alive) < 2:
            continue
        vecs = np.stack([np.concatenate(i.vectors()) for i in alive])
        for comp in _greedy_components(vecs, n_merge):
            _merge_component([alive[k] for k in comp], vecs[comp], plan)
            res.count("similar channels merged", len(comp) - 1)


def _greedy_components(vecs: np.ndarray, n_merge: int) -> list[list[int]]:
    """Merge ``n_merge`` channels, closest pair first (paper: Euclidean distance of the sources)."""
    n = len(vecs)
    cost = np.sqrt(np.maximum(((vecs[:, None, :] - vecs[None, :, :]) ** 2).sum(-1), 0))
    iu = np.triu_indices(n, 1)
    order = np.argsort(cost[iu], kind="stable")
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    merged = 0
    for k in order:
        a, b = find(int(iu[0][k])), find(int(iu[1][k]))
        if a == b:
            continue
        parent[max(a, b)] = min(a, b)
        merged += 1
        if merged >= n_merge:
            break
    comps: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        comps[find(i)].append(i)
    return [c for c in comps.values() if len(c) > 1]


def _merge_component(infos: list[ClassInfo], vecs: np.ndarray, plan: Plan) -> None:
    keep = infos[0]
    plan.new_sources[keep.root] = vecs.mean(0)
    for other in infos[1:]:
        plan.merges.append((other.root, keep.root, 1.0))


def _relaxed_removals(
    graph: gs.Graph,
    cg: ChannelGraph,
    groups: dict[tuple, list[ClassInfo]],
    plan: Plan,
    res: PassResult,
    alpha: float,
    options: dict[str, Any],
    multiple: int = 1,
    budget: float | None = None,
) -> None:
    """Remove the channels whose loss the remaining channels best reconstruct: the alpha fraction
    of them, or (``budget``) as many as keep the summed relative reconstruction error within it."""
    gone = {m[0] for m in plan.merges}
    cands = [i for g in groups.values() for i in g if i.root not in gone and i.sourced and not i.zero_item]
    sinks = {t for i in cands for t, _ in i.members if any(it.kind == "sink" for it in cg.items.get(t, []))}
    cands = [i for i in cands if any(t in sinks for t, _ in i.members)]
    target = len(cands) if budget else round(alpha * len(cands))
    if target < 1 or not sinks:
        return
    axes = {t: cg.spaces[t].axis for t in sorted(sinks)}  # a set's order varies between processes
    cache = options.get("stats_cache")
    key = tuple(sorted(axes.items()))
    stats = cache.get(key) if cache is not None else None
    if stats is None:
        stats = R.channel_stats(graph, axes, options.get("calibration"), options.get("shapes"),
                                input_model=options.get("input_model"), corrections=options.get("corrections"))
        if cache is not None:
            cache[key] = stats
    energy = {t: _column_energy(cg, t) for t in sinks}
    prec = {t: stats[t].precision() for t in sinks}
    for drop, _keep, _s in plan.merges:  # exact merges already took these channels away
        for t, c in cg.members_of(drop):
            if t in prec and np.isfinite(prec[t][c, c]):
                prec[t] = R.remove_from_precision(prec[t], c)
    total = {t: float(energy[t] @ stats[t].second_moment) or 1.0 for t in sinks}
    saving = _savings(cg, cands, options.get("cost_model"), multiple)
    all_cands = cands
    cands = [i for i in cands if saving[i.root] > 0]
    key_of = {i.root: k for k, members in groups.items() for i in members}
    exact_done = Counter(key_of[r] for r in plan.exact)
    chosen = _lazy_greedy(cands, target, prec, energy, total, _group_caps(groups, cands), saving, multiple,
                          exact_done, budget)  # fmt: skip
    chosen = _align(plan, groups, chosen, multiple)
    _record_groups(res, cg, all_cands, chosen, saving, multiple, options.get("cost_model") is not None)
    if not chosen:
        return
    removed: dict[str, list[int]] = defaultdict(list)
    for info in chosen:
        plan.merges.append((info.root, None, 0.0))
        for t, c in info.members:
            if t in sinks:
                removed[t].append(c)
    dropped = {t: {c for d, _k, _s in plan.merges for tt, c in cg.members_of(d) if tt == t} for t in removed}
    for t, r in removed.items():
        kept = [c for c in range(cg.spaces[t].size) if c not in dropped[t]]
        b, c0 = R.regression(stats[t], sorted(r), kept)
        plan.recon.append((t, sorted(r), kept, b, c0))
    res.count("channels removed with reconstruction", len(chosen))


def _record_groups(
    res: PassResult, cg: ChannelGraph, cands: list[ClassInfo], chosen: list[ClassInfo], saving: dict[int, float],
    step: int, measured: bool,
) -> None:  # fmt: skip
    """Per coupled group: the layers it touches, its channels, how many went and why (the report)."""
    by_key: dict[tuple, list[ClassInfo]] = defaultdict(list)
    for info in cands:
        by_key[info.key].append(info)
    gone = Counter(i.key for i in chosen)
    unit = "ms" if measured else "MACs"
    for key, infos in by_key.items():
        tensors = sorted({t for t, _ in infos[0].members})
        layers = sorted({it.node.name for t in tensors for it in cg.items.get(t, []) if it.kind in ("row", "sink")})
        per = saving[infos[0].root]
        if gone[key]:
            why = f"removed in steps of {step}: saves {per:.3g} {unit} per channel"
        elif per <= 0:
            why = f"kept: removing {step} channels saves no time (cost model)"
        else:
            why = "kept: no step fits the fidelity budget"
        res.layers.append({"layers": layers, "channels": len(infos), "removed": gone[key], "why": why})


def channel_multiple(options: dict[str, Any]) -> int:
    """Channels are removed in multiples of this: the runtime's channel block (``target``), or
    ``channel_multiple``; 1 for ``target=macs`` or when neither is set."""
    target = options.get("target", "macs")
    if target == "ort-cpu" and options.get("cost_model") is not None:
        return int(options["cost_model"].block())
    return {"trt": 8, "trt-int8": 16}.get(target, int(options.get("channel_multiple") or CHANNEL_MULTIPLE))


def _align(plan: Plan, groups: dict[tuple, list[ClassInfo]], chosen: list[ClassInfo], multiple: int) -> list[ClassInfo]:
    """Per coupled group, make the channels removed (exact and chosen) a multiple of ``multiple``:
    the costliest picks go back first (``chosen`` is cheapest first), then exact merges are
    undone. A count like 61 leaves onnxruntime's blocked kernels: 62 channels run a depthwise
    conv 2.3x slower than 64 (benchmarks/speed.py), so a channel more or less matters."""
    if multiple <= 1:
        return chosen
    key_of = {i.root: key for key, members in groups.items() for i in members}
    picks: dict[tuple, list[ClassInfo]] = defaultdict(list)
    for info in chosen:
        picks[info.key].append(info)
    exact: dict[tuple, list[int]] = defaultdict(list)
    for root in plan.exact:
        exact[key_of[root]].append(root)
    kept: list[ClassInfo] = []
    undo: set[int] = set()
    for key in sorted(set(picks) | set(exact), key=str):
        allowed = (len(picks[key]) + len(exact[key])) // multiple * multiple
        if allowed >= len(exact[key]):
            kept += picks[key][: allowed - len(exact[key])]
        else:
            undo.update(exact[key][allowed:])
    plan.undo(undo)
    order = {i.root: k for k, i in enumerate(chosen)}
    return sorted(kept, key=lambda i: order[i.root])


def _savings(
    cg: ChannelGraph,
    cands: list[ClassInfo],
    cost_model: Any,
    multiple: int,
) -> dict[int, float]:
    """What removing one channel of each candidate saves: measured milliseconds with a cost model
    (per group: the touched layers' latency at the current count minus at ``multiple`` fewer,
    per channel), else multiply-accumulates."""
    if cost_model is None:
        return {i.root: _channel_macs(cg, i) for i in cands}
    by_group: dict[tuple, float] = {}
    out = {}
    for info in cands:
        if info.key not in by_group:
            by_group[info.key] = _group_ms_saved(cg, info, cost_model, multiple)
        out[info.root] = by_group[info.key]
    return out


def _group_ms_saved(cg: ChannelGraph, info: ClassInfo, cost_model: Any, step: int) -> float:
    """Milliseconds per channel saved by removing channels of this class's tensors, from the cost
    model's timings of every layer they touch (0 when a layer cannot be timed). The slope is taken
    over a quarter of the channels (whole steps, at least one): one step of 8 in 1024 channels
    saves less than timing noise."""
    n = cg.spaces[info.members[0][0]].size
    step = max(step, (n // 4) // step * step)
    saved = 0.0
    seen: set[tuple[int, str]] = set()
    for t, _c in info.members:
        for it in cg.items.get(t, []):
            role = "out" if it.kind == "row" else "in" if it.kind == "sink" else "dw" if (
                it.kind == "param" and it.node.op == "Conv" and it.index == 1) else None  # fmt: skip
            if role is None or (id(it.node), role) in seen:
                continue
            seen.add((id(it.node), role))
            shape = cost_model.layer(it.node)
            if shape is None:
                continue
            per = len(it.features[0]) if it.kind == "sink" and it.features is not None else 1
            if role == "out":
                smaller = shape.with_channels(cout=shape.cout - step)
            else:
                smaller = shape.with_channels(cin=shape.cin - step * per)
            if min(smaller.cin, smaller.cout) < 1:
                continue
            saved += cost_model.ms(shape) - cost_model.ms(smaller)
    return saved / step


def _channel_macs(cg: ChannelGraph, info: ClassInfo) -> float:
    """Multiply-accumulates per sample that removing this channel saves (rows, sinks, depthwise)."""
    total = 0.0
    for t, c in info.members:
        for it in cg.items.get(t, []):
            node = it.node
            depthwise_kernel = it.kind == "param" and it.index == 1 and node.op == "Conv"
            if it.kind not in ("row", "sink") and not depthwise_kernel:
                continue
            w = np.asarray(node.inputs[1].values)
            axis = _in_axis(node) if it.kind == "sink" else (0 if depthwise_kernel else out_axis(node))
            per_feature = _positions(node) * w.size / max(w.shape[axis], 1)
            features = len(it.features[c]) if it.kind == "sink" and it.features is not None else 1
            total += per_feature * features
    return total


def _positions(node: gs.Node) -> float:
    """Output positions per sample (spatial size for convs, leading dims for MatMul)."""
    shape = node.outputs[0].shape
    if not shape:
        return 1.0
    dims = shape[2:] if node.op in ("Conv", "ConvTranspose") else shape[1:-1]
    return float(np.prod([d for d in dims if isinstance(d, int) and d > 0]))


def _column_energy(cg: ChannelGraph, t: str) -> np.ndarray:
    """Sum of squared consumer weights reading each channel of ``t``."""
    e = np.zeros(cg.spaces[t].size)
    for it in cg.items.get(t, []):
        if it.kind == "sink":
            for c in range(len(e)):
                e[c] += float(np.sum(_sink_columns(it, c) ** 2))
    return e


def _group_caps(groups: dict[tuple, list[ClassInfo]], cands: list[ClassInfo]) -> dict[int, tuple[tuple, int]]:
    """Each candidate's group and how many of that group may go (at most 3/4, keeping one)."""
    alive = {i.root for i in cands}
    caps = {}
    for key, members in groups.items():
        n = sum(i.root in alive for i in members)
        for i in members:
            caps[i.root] = (key, max(0, min(n - 1, (3 * n) // 4)))
    return caps


class _Group:
    """A coupled group's remaining candidates, with their channel index in each tensor (vectorized costs)."""

    def __init__(self, infos: list[ClassInfo], saving: dict[int, float], floor: float, prec: dict[str, np.ndarray]):
        self.infos = list(infos)
        tensors = sorted({t for t, _ in infos[0].members if t in prec})
        at = [dict(i.members) for i in infos]
        self.cidx = {t: np.array([a[t] for a in at]) for t in tensors}
        self.saving = np.maximum(np.array([saving[i.root] for i in infos]), floor)
        self.alive = np.ones(len(infos), bool)
        self.taken = 0

    def errors(self, prec: dict[str, np.ndarray], energy: dict[str, np.ndarray], total: dict[str, float]) -> np.ndarray:
        err = np.zeros(len(self.infos))
        for t, idx in self.cidx.items():
            d = np.diagonal(prec[t])[idx]
            ok = (d > 0) & np.isfinite(d)
            err[ok] += energy[t][idx[ok]] / d[ok] / total[t]
        return np.where(self.alive, err, np.inf)


def _lazy_greedy(
    cands: list[ClassInfo],
    target: int,
    prec: dict[str, np.ndarray],
    energy: dict[str, np.ndarray],
    total: dict[str, float],
    caps: dict[int, tuple[tuple, int]],
    saving: dict[int, float],
    step: int = 1,
    done: dict[tuple, int] | None = None,
    budget: float | None = None,
) -> list[ClassInfo]:
    """Pick about ``target`` channels by increasing relative reconstruction error per unit saved
    (MACs or milliseconds: the layers that lose least per unit of cost give most).

    Channels go in steps of ``step`` per coupled group (the runtime's channel block: a group's
    first step completes the block its ``done`` exact merges began), so that removals gather where
    they pay instead of spreading thin and being rounded away. A step costs the sum of its
    channels' current costs; costs only grow as channels go, so stale heap entries are refreshed
    lazily. With a ``budget`` on the summed error, a step that would exceed it is skipped (and
    its group closed) while cheaper steps elsewhere still go: the most efficient step may be too
    big to fit (half of a 16-channel layer), smaller ones are not."""
    floor = min((v for v in saving.values() if v > 0), default=1.0) * 1e-3
    by_key: dict[tuple, list[ClassInfo]] = defaultdict(list)
    for info in cands:
        by_key[info.key].append(info)
    groups = {key: _Group(infos, saving, floor, prec) for key, infos in by_key.items()}
    done = done or {}

    def size(key: tuple) -> int:
        return step - (done.get(key, 0) + groups[key].taken) % step

    def step_of(key: tuple) -> tuple[float, float]:
        """(cost, error) of the group's next step; inf when it cannot take one."""
        g, k = groups[key], size(key)
        if int(g.alive.sum()) < k or g.taken + k > caps[g.infos[0].root][1]:
            return np.inf, np.inf
        err = g.errors(prec, energy, total)
        picks = np.argpartition(err / g.saving, k - 1)[:k]
        return float(np.sum(err[picks] / g.saving[picks])), float(np.sum(err[picks]))

    order = {key: n for n, key in enumerate(groups)}
    heap = [(c, order[key], key) for key in groups if np.isfinite(c := step_of(key)[0])]
    heapq.heapify(heap)
    chosen: list[ClassInfo] = []
    spent = 0.0
    while heap and len(chosen) < target:
        _c, n, key = heapq.heappop(heap)
        fresh, step_error = step_of(key)
        if not np.isfinite(fresh):
            continue
        if heap and fresh > heap[0][0] * (1 + 1e-12) + 1e-15:
            heapq.heappush(heap, (fresh, n, key))
            continue
        if budget is not None:
            if spent + step_error > budget:
                continue  # too big for what is left of the budget: this group is done
            spent += step_error
        g = groups[key]
        for _ in range(size(key)):  # the step's channels one by one, each priced after the last went
            i = int(np.argmin(g.errors(prec, energy, total) / g.saving))
            g.alive[i] = False
            g.taken += 1
            chosen.append(g.infos[i])
            for t, ch in g.infos[i].members:
                if t in prec:
                    prec[t] = R.remove_from_precision(prec[t], ch)
        nxt = step_of(key)[0]
        if np.isfinite(nxt):
            heapq.heappush(heap, (nxt, n, key))
    return chosen


# ------------------------------------------------------------------ rewriting


def _apply(cg: ChannelGraph, infos: dict[int, ClassInfo], plan: Plan) -> dict[str, list[int]]:
    """Drop merged channels from every tensor and rewrite every item that indexes them; returns
    the channels each cut tensor keeps (indices into its channels before the cut)."""
    target: dict[str, dict[int, tuple[int | None, float]]] = defaultdict(dict)
    for drop, keep, s in plan.merges:
        keep_at = {t: c for t, c in infos[keep].members} if keep is not None else {}
        for t, c in infos[drop].members:
            target[t][c] = (keep_at.get(t), s)
    if plan.new_sources:
        _write_sources(cg, infos, plan.new_sources)
    biases = _Biases()
    for absorbed in plan.absorb.values():
        for it, c, k in absorbed:
            _absorb_constant(it, c, k, biases)
    for t, removed, kept, b, c0 in plan.recon:
        for it in cg.items.get(t, []):
            if it.kind == "sink":
                _compensate(it, removed, kept, b, c0, biases)
    keeps = {t: [c for c in range(cg.spaces[t].size) if c not in target[t]] for t in target}
    done: set[tuple[int, str, int]] = set()
    for t in target:
        for it in cg.items.get(t, []):
            mark = (id(it.node), it.kind, it.index)
            if it.kind != "sink" and mark in done:
                continue
            done.add(mark)
            _rewrite(cg, it, keeps, target)
    biases.apply(cg.graph, keeps)  # after the cuts: a new MatMul bias Add is not in the channel graph
    for t in target:  # shapes are stale now; onnxruntime infers them again
        cg.spaces[t].tensor.shape = None
    return keeps


class _Biases:
    """Bias changes of layers, added once their own output channels have been cut."""

    def __init__(self) -> None:
        self._deltas: dict[int, tuple[gs.Node, np.ndarray]] = {}

    def add(self, node: gs.Node, delta: np.ndarray) -> None:
        prev = self._deltas.get(id(node))
        self._deltas[id(node)] = (node, delta if prev is None else prev[1] + delta)

    def apply(self, graph: gs.Graph, keeps: dict[str, list[int]]) -> None:
        for node, delta in self._deltas.values():
            keep = keeps.get(node.outputs[0].name)
            add_to_bias(graph, node, delta[keep] if keep is not None else delta)


def _write_sources(cg: ChannelGraph, infos: dict[int, ClassInfo], sources: dict[int, np.ndarray]) -> None:
    """Relaxed merging: the kept channel takes the averaged sources, read back in _class_info's order."""
    for root, vec in sources.items():
        info = infos[root]
        scaled_vec, fixed_vec = vec[: info.scaled_size], vec[info.scaled_size :]
        spos = fpos = 0
        for t, c in sorted(info.members):
            for it in cg.items.get(t, []):
                if it.kind == "row":
                    size = _row(it.node, c).size
                    _set_row(it.node, c, scaled_vec[spos : spos + size])
                    spos += size
                elif it.kind == "param":
                    v = np.array(const_value(it.node.inputs[it.index]), copy=True)
                    idx = [slice(None)] * v.ndim
                    idx[_param_axis(v, cg.spaces[t].size)] = c
                    size = v[tuple(idx)].size
                    v[tuple(idx)] = fixed_vec[fpos : fpos + size].reshape(v[tuple(idx)].shape)
                    fpos += size
                    set_input_values(it.node, it.index, v)


def _compensate(it: Item, removed: list[int], kept: list[int], b: np.ndarray, c0: np.ndarray, biases: _Biases) -> None:
    """The layer reads B a_kept + c in place of the removed channels: W_K += W_R B, bias += W_R c."""
    node = it.node
    w = np.array(node.inputs[1].values, dtype=np.float64)
    axis = _in_axis(node)
    wm = np.moveaxis(w, axis, 0)
    if it.features is not None:  # rows per channel: [channels, positions, outputs]
        cols = wm[it.features[removed]]
        wm[it.features[kept]] += np.einsum("rk,rp...->kp...", b, cols)
        delta = np.einsum("r,rp...->...", c0, cols)
    else:  # Conv [C_in, outputs, taps...] or Gemm/MatMul [K, outputs]
        cols = wm[removed]
        wm[kept] += np.tensordot(b.T, cols, axes=1)
        per_out = cols.reshape(len(removed), cols.shape[1], -1).sum(2) if cols.ndim > 2 else cols
        delta = c0 @ per_out
    set_input_values(node, 1, np.moveaxis(wm, 0, axis).astype(node.inputs[1].values.dtype))
    if node.op in ("Conv", "Gemm", "MatMul") and np.any(delta):
        biases.add(node, delta)


def _absorb_constant(it: Item, c: int, k: float, biases: _Biases) -> None:
    """A constant input channel c of value k adds k * sum of its columns to the layer's bias."""
    cols = np.moveaxis(_sink_columns(it, c), _in_axis(it.node), 0)
    per_out = cols.sum(0) if it.features is not None else cols[0]
    biases.add(it.node, k * (per_out.reshape(per_out.shape[0], -1).sum(1) if per_out.ndim > 1 else per_out))


def _set_row(node: gs.Node, c: int, vec: np.ndarray) -> None:
    w = np.array(node.inputs[1].values, copy=True)
    axis = out_axis(node)
    idx = [slice(None)] * w.ndim
    idx[axis] = c
    n = w[tuple(idx)].size
    w[tuple(idx)] = vec[:n].reshape(w[tuple(idx)].shape).astype(w.dtype)
    set_input_values(node, 1, w)
    if len(node.inputs) > 2 and node.inputs[2].name and vec.size > n:
        b = np.array(node.inputs[2].values, copy=True)
        if b.size > 1:
            b.reshape(-1)[c] = vec[n]
            set_input_values(node, 2, b)


def _rewrite(
    cg: ChannelGraph, it: Item, keeps: dict[str, list[int]], target: dict[str, dict[int, tuple[int | None, float]]]
) -> None:
    node, keep = it.node, keeps[it.tensor]
    if it.kind == "row":
        _take(node, 1, keep, out_axis(node))
        if len(node.inputs) > 2 and node.inputs[2].name and const_value(node.inputs[2]).size > 1:
            _take(node, 2, keep, 0, flat=True)
    elif it.kind == "param":
        v = np.asarray(const_value(node.inputs[it.index]))
        _take(node, it.index, keep, _param_axis(v, cg.spaces[it.tensor].size))
    elif it.kind == "sink":
        _fold_columns(it, keep, target[it.tensor])
    elif it.kind == "op":
        _rewrite_op(cg, node, keeps)


def _take(node: gs.Node, index: int, keep: list[int], axis: int, flat: bool = False) -> None:
    v = np.asarray(node.inputs[index].values)
    if flat:
        v, axis = v.reshape(-1), 0
    set_input_values(node, index, np.take(v, keep, axis=axis))


def _fold_columns(it: Item, keep: list[int], moves: dict[int, tuple[int | None, float]]) -> None:
    """Drop the merged input columns of a consumer; a merged channel's columns (times its factor)
    are added to its target's, in float64, one target at a time (weights can be large)."""
    node = it.node
    orig = np.asarray(node.inputs[1].values)
    axis = _in_axis(node)
    feats = it.features
    cols = (lambda c: list(feats[c])) if feats is not None else (lambda c: [c])
    kept = np.sort(np.concatenate([feats[c] for c in keep])) if feats is not None else np.array(keep)
    out = np.take(orig, kept, axis=axis)
    om, outm = np.moveaxis(orig, axis, 0), np.moveaxis(out, axis, 0)
    where = {int(k): i for i, k in enumerate(kept)}
    into: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for drop, (to, s) in moves.items():
        for _ in range(len(moves)):  # the target was merged on: follow it
            if to is None or to not in moves:
                break
            to, s2 = moves[to]
            s *= s2
        if to is not None:
            into[to].append((drop, s))
    for to, sources in into.items():
        dst = cols(to)
        acc = om[dst].astype(np.float64)
        for drop, s in sources:
            acc += om[cols(drop)].astype(np.float64) * s
        outm[[where[d] for d in dst]] = acc.astype(orig.dtype)
    set_input_values(node, 1, out)


def _rewrite_op(cg: ChannelGraph, node: gs.Node, keeps: dict[str, list[int]]) -> None:
    if node.op == "Conv":  # depthwise: one group per channel
        node.attrs["group"] = len(keeps.get(node.outputs[0].name, [])) or node.attrs["group"]
    elif node.op == "Split":
        sizes = [len(keeps[o.name]) if o.name in keeps else cg.spaces[o.name].size for o in node.outputs]
        if "split" in node.attrs:
            node.attrs["split"] = sizes
        elif len(node.inputs) > 1 and node.inputs[1].name:
            set_input_values(node, 1, np.array(sizes, np.int64))
    elif node.op == "Slice":
        _rewrite_slice(cg, node, keeps)
    elif node.op == "Pad":
        _rewrite_pad(cg, node, keeps)
    elif node.op == "Reshape":
        t = const_value(node.inputs[1])
        if t is not None and int(t[1]) != -1 and int(t[0]) != -1:
            set_input_values(node, 1, np.array([t[0], -1], dtype=t.dtype))
        elif t is not None and int(t[1]) != -1:
            sp = cg.spaces[node.inputs[0].name]
            per_channel = int(t[1]) // sp.size
            set_input_values(node, 1, np.array([-1, per_channel * len(keeps[sp.tensor.name])], dtype=t.dtype))


def _kept_before(keep: list[int], pos: int) -> int:
    return int(np.searchsorted(np.array(keep), pos))


def _rewrite_slice(cg: ChannelGraph, node: gs.Node, keeps: dict[str, list[int]]) -> None:
    src = node.inputs[0].name
    sp = cg.spaces[src]
    keep = keeps.get(src, list(range(sp.size)))
    from redonnx.channels import slice_params

    starts, ends, axes, steps = slice_params(node)
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    axes_n = [a + rank if a < 0 and rank else a for a in axes]
    i = axes_n.index(sp.axis)
    s, e, _ = slice(starts[i], ends[i], steps[i]).indices(sp.size)
    starts[i], ends[i] = _kept_before(keep, s), _kept_before(keep, e)
    if "starts" in node.attrs:
        node.attrs["starts"], node.attrs["ends"] = starts, ends
    else:
        set_input_values(node, 1, np.array(starts, np.int64))
        set_input_values(node, 2, np.array(ends, np.int64))


def _rewrite_pad(cg: ChannelGraph, node: gs.Node, keeps: dict[str, list[int]]) -> None:
    out = node.outputs[0].name
    sp, xs = cg.spaces[out], cg.spaces[node.inputs[0].name]
    keep = keeps.get(out, list(range(sp.size)))
    rank = len(node.inputs[0].shape)
    pads = list(node.attrs["pads"]) if "pads" in node.attrs else [int(v) for v in const_value(node.inputs[1])]
    before = pads[sp.axis]
    kept_x = len(keeps.get(xs.tensor.name, range(xs.size)))
    new_before = _kept_before(keep, before)
    pads[sp.axis], pads[sp.axis + rank] = new_before, len(keep) - new_before - kept_x
    if "pads" in node.attrs:
        node.attrs["pads"] = pads
    else:
        set_input_values(node, 1, np.array(pads, np.int64))
