"""Channel rules of layers and element-wise ops: Conv/ConvTranspose/Gemm/MatMul (rows and sinks,
depthwise convs), pass-through ops, per-channel parameter ops and binary ops (see
:mod:`redonnx.channels.coupling`).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from redonnx.channels.graph import ChannelGraph, Item, Space
from redonnx.io.graph import const_value


def _rank(t: gs.Tensor) -> int | None:
    return len(t.shape) if t.shape is not None else None


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
