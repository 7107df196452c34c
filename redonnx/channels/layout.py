"""Channel rules of ops that move, cut, pad or flatten the channel axis: Concat, Split, Slice,
Pad, Transpose, Resize, reductions and Flatten/Reshape (see :mod:`redonnx.channels.coupling`).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from redonnx.channels.graph import ChannelGraph, Item
from redonnx.channels.rules import _pass_through, _rank, _space_of
from redonnx.io.graph import const_value


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
