"""How each op is cut once the channels to drop are chosen: the table :data:`CUTTERS` says, per
item kind (layer rows, per-channel parameters, consumer columns) and per op carrying channel
attributes (depthwise group, Split sizes, Slice bounds, Pad amounts, Reshape targets), how the
tensor or attribute loses the dropped channels; merged channels' columns are summed into their
targets and bias changes are applied after the cuts.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_graphsurgeon as gs

from redonnx.channels.coupling import ChannelGraph, Item
from redonnx.io.graph import add_to_bias, const_value, set_input_values
from redonnx.redundancy.classes import (
    ClassInfo,
    Plan,
    channel_row,
    in_axis,
    out_axis,
    param_axis,
    sink_columns,
)


def apply_plan(cg: ChannelGraph, infos: dict[int, ClassInfo], plan: Plan) -> dict[str, list[int]]:
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
    """Relaxed merging: the kept channel takes the averaged sources, read back in class_info's order."""
    for root, vec in sources.items():
        info = infos[root]
        scaled_vec, fixed_vec = vec[: info.scaled_size], vec[info.scaled_size :]
        spos = fpos = 0
        for t, c in sorted(info.members):
            for it in cg.items.get(t, []):
                if it.kind == "row":
                    size = channel_row(it.node, c).size
                    _set_row(it.node, c, scaled_vec[spos : spos + size])
                    spos += size
                elif it.kind == "param":
                    v = np.array(const_value(it.node.inputs[it.index]), copy=True)
                    idx = [slice(None)] * v.ndim
                    idx[param_axis(v, cg.spaces[t].size)] = c
                    size = v[tuple(idx)].size
                    v[tuple(idx)] = fixed_vec[fpos : fpos + size].reshape(v[tuple(idx)].shape)
                    fpos += size
                    set_input_values(it.node, it.index, v)


def _compensate(it: Item, removed: list[int], kept: list[int], b: np.ndarray, c0: np.ndarray, biases: _Biases) -> None:
    """The layer reads B a_kept + c in place of the removed channels: W_K += W_R B, bias += W_R c."""
    node = it.node
    w = np.array(node.inputs[1].values, dtype=np.float64)
    axis = in_axis(node)
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
    cols = np.moveaxis(sink_columns(it, c), in_axis(it.node), 0)
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
    if it.kind == "sink":
        _fold_columns(it, keeps[it.tensor], target[it.tensor])
    elif it.kind == "op":
        cutter = CUTTERS.get(it.node.op)
        if cutter is None:  # the channel graph made an op item no cutter knows: a bug, never a guess
            raise AssertionError(f"no channel cutter for {it.node.op} ({it.node.name})")
        cutter(cg, it.node, keeps)
    else:
        ITEM_CUTTERS[it.kind](cg, it, keeps)


def _cut_rows(cg: ChannelGraph, it: Item, keeps: dict[str, list[int]]) -> None:
    """A layer writing the channels: its output rows and per-channel bias."""
    node, keep = it.node, keeps[it.tensor]
    _take(node, 1, keep, out_axis(node))
    if len(node.inputs) > 2 and node.inputs[2].name and const_value(node.inputs[2]).size > 1:
        _take(node, 2, keep, 0, flat=True)


def _cut_param(cg: ChannelGraph, it: Item, keeps: dict[str, list[int]]) -> None:
    """A per-channel parameter on the way (PRelu slope, Mul/Add constant, depthwise kernel)."""
    v = np.asarray(const_value(it.node.inputs[it.index]))
    _take(it.node, it.index, keeps[it.tensor], param_axis(v, cg.spaces[it.tensor].size))


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
    axis = in_axis(node)
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


def _cut_depthwise(cg: ChannelGraph, node: gs.Node, keeps: dict[str, list[int]]) -> None:
    node.attrs["group"] = len(keeps.get(node.outputs[0].name, [])) or node.attrs["group"]  # one group per channel


def _cut_split(cg: ChannelGraph, node: gs.Node, keeps: dict[str, list[int]]) -> None:
    sizes = [len(keeps[o.name]) if o.name in keeps else cg.spaces[o.name].size for o in node.outputs]
    if "split" in node.attrs:
        node.attrs["split"] = sizes
    elif len(node.inputs) > 1 and node.inputs[1].name:
        set_input_values(node, 1, np.array(sizes, np.int64))


def _cut_reshape(cg: ChannelGraph, node: gs.Node, keeps: dict[str, list[int]]) -> None:
    """Flattening Reshape [N, C*P] (or [-1, C*P]): the feature count follows the channels."""
    t = const_value(node.inputs[1])
    if t is not None and int(t[1]) != -1 and int(t[0]) != -1:
        set_input_values(node, 1, np.array([t[0], -1], dtype=t.dtype))
    elif t is not None and int(t[1]) != -1:
        sp = cg.spaces[node.inputs[0].name]
        per_channel = int(t[1]) // sp.size
        set_input_values(node, 1, np.array([-1, per_channel * len(keeps[sp.tensor.name])], dtype=t.dtype))


def _unchanged(cg: ChannelGraph, node: gs.Node, keeps: dict[str, list[int]]) -> None:
    """Concat and Flatten carry no channel count: their inputs' cuts are enough."""


def _kept_before(keep: list[int], pos: int) -> int:
    return int(np.searchsorted(np.array(keep), pos))


def _cut_slice(cg: ChannelGraph, node: gs.Node, keeps: dict[str, list[int]]) -> None:
    src = node.inputs[0].name
    sp = cg.spaces[src]
    keep = keeps.get(src, list(range(sp.size)))
    from redonnx.channels.coupling import slice_params

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


def _cut_pad(cg: ChannelGraph, node: gs.Node, keeps: dict[str, list[int]]) -> None:
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


def _no_cut(cg: ChannelGraph, it: Item, keeps: dict[str, list[int]]) -> None:
    """Zero padding channels: the Pad's own op item rewrites its amounts."""


#: How each item kind that indexes channels loses the dropped ones (sinks fold their columns).
ITEM_CUTTERS = {"row": _cut_rows, "param": _cut_param, "zero": _no_cut}
#: How each op carrying a channel count in its attributes or inputs is rewritten ("op" items).
CUTTERS = {
    "Conv": _cut_depthwise,
    "Split": _cut_split,
    "Slice": _cut_slice,
    "Pad": _cut_pad,
    "Reshape": _cut_reshape,
    "Concat": _unchanged,
    "Flatten": _unchanged,
}
