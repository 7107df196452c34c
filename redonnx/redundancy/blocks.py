"""Channel counts and what a channel saves: the channels that remain stay in the runtime's block
(``channel_multiple``): exact merges and relaxed steps that would take an aligned count off it
are undone (unless the cost model times the step faster), and each coupled group's saving per
channel is measured (cost model milliseconds) or counted (MACs).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from redonnx.channels.coupling import ChannelGraph
from redonnx.redundancy.classes import ClassInfo, Plan, in_axis, out_axis

CHANNEL_MULTIPLE = 1  # 8 keeps onnxruntime CPU convs on their blocked fast path


def channel_multiple(target: str, cost_model: Any = None, requested: int | None = None) -> int:
    """Channels are removed in multiples of this: the runtime's channel block (``target``), or
    ``channel_multiple``; 1 for ``target=macs`` or when neither is set."""
    if target == "ort-cpu" and cost_model is not None:
        return int(cost_model.block())
    return {"trt": 8, "trt-int8": 16}.get(target, int(requested or CHANNEL_MULTIPLE))


def align(
    plan: Plan,
    groups: dict[tuple, list[ClassInfo]],
    chosen: list[ClassInfo],
    multiple: int,
    cost_model: Any = None,
) -> list[ClassInfo]:
    """Per coupled group, keep the channels that *remain* in the runtime's block: the group's
    removals (exact merges first, then ``chosen``, cheapest first) go as far as allowed, the
    costliest picks going back first, then exact merges. A step is allowed when it ends on the
    block, returns nothing, or starts off the block already (a widened 21 goes back to 16, or to
    18 at worst); one that leaves the block (64 -> 61) goes only if the cost model measures it
    faster (never without one). A count like 61 leaves onnxruntime's blocked kernels: 62 channels
    run a depthwise conv 2.3x slower than 64 (benchmarks/speed.py), so a channel more or less matters.
    Groups sharing a tensor (a Pad's or Concat's output) are counted together, in key order."""
    if multiple <= 1:
        return chosen
    key_of = {i.root: key for key, members in groups.items() for i in members}
    picks: dict[tuple, list[ClassInfo]] = defaultdict(list)
    for info in chosen:
        picks[info.key].append(info)
    exact: dict[tuple, list[int]] = defaultdict(list)
    for root in plan.exact:
        exact[key_of[root]].append(root)
    removed: dict[str, int] = defaultdict(int)  # channels each tensor lost to the groups already aligned
    kept: list[ClassInfo] = []
    undo: set[int] = set()
    for key in sorted(set(picks) | set(exact), key=str):
        counts = _counts(groups[key], removed)
        k = _allowed_removals(groups[key][0].cg, counts, len(exact[key]) + len(picks[key]), multiple, cost_model)
        kept += picks[key][: max(0, k - len(exact[key]))]
        undo.update(exact[key][k:])
        for t in counts:
            removed[t] += k
    plan.undo(undo)
    order = {i.root: k for k, i in enumerate(chosen)}
    return sorted(kept, key=lambda i: order[i.root])


def _counts(members: list[ClassInfo], removed: dict[str, int]) -> dict[str, int]:
    """Channels of each tensor of a coupled group now (its size less what other groups removed)."""
    cg = members[0].cg
    return {t: cg.spaces[t].size - removed[t] for t, _c in members[0].members}


def _allowed_removals(cg: ChannelGraph, counts: dict[str, int], wanted: int, multiple: int, cost_model: Any) -> int:
    """How many of ``wanted`` channels a group may lose: all of them when no tensor leaves the
    block (or the cost model measures the step faster), else the most that end on it, else none."""
    if wanted == 0 or all(_stays(n, n - wanted, multiple) for n in counts.values()):
        return wanted
    if cost_model is not None and _measured_faster(cg, counts, wanted, cost_model):
        return wanted
    for k in range(wanted - 1, 0, -1):
        if all(_stays(n, n - k, multiple) for n in counts.values()):
            return k
    return 0


def _stays(start: int, end: int, multiple: int) -> bool:
    """A count may go from ``start`` to ``end`` unless that leaves the block it was on."""
    return end % multiple == 0 or start % multiple != 0


def _measured_faster(cg: ChannelGraph, counts: dict[str, int], k: int, cost_model: Any) -> bool:
    """Do the layers the group's tensors touch run faster, by the cost model, with ``k`` channels fewer?"""
    saved = 0.0
    for node, role, per, t in _touched(cg, list(counts)):
        shape = cost_model.layer(node)
        if shape is None:
            continue
        gone = cg.spaces[t].size - counts[t]
        now, then = _fewer(shape, role, gone * per), _fewer(shape, role, (gone + k) * per)
        if now is None or then is None:
            continue
        saved += cost_model.saved(now, then)
    return saved > 0


def _fewer(shape: Any, role: str, n: int) -> Any:
    """The layer with ``n`` output (role "out") or input channels fewer; None below one channel."""
    smaller = shape.with_channels(cout=shape.cout - n) if role == "out" else shape.with_channels(cin=shape.cin - n)
    return smaller if min(smaller.cin, smaller.cout) >= 1 else None


def _touched(cg: ChannelGraph, tensors: list[str]) -> list[tuple[gs.Node, str, int, str]]:
    """Each layer that indexes channels of ``tensors``, once per role: "out" (its rows), "in" (it
    reads them, ``per`` inputs per channel after a Flatten) or "dw" (a depthwise kernel)."""
    out = []
    seen: set[tuple[int, str]] = set()
    for t in tensors:
        for it in cg.items.get(t, []):
            role = "out" if it.kind == "row" else "in" if it.kind == "sink" else "dw" if (
                it.kind == "param" and it.node.op == "Conv" and it.index == 1) else None  # fmt: skip
            if role is None or (id(it.node), role) in seen:
                continue
            seen.add((id(it.node), role))
            per = len(it.features[0]) if it.kind == "sink" and it.features is not None else 1
            out.append((it.node, role, per, t))
    return out


def savings(
    cg: ChannelGraph,
    cands: list[ClassInfo],
    cost_model: Any,
    multiple: int,
    memo: dict | None = None,
) -> dict[int, float]:
    """What removing one channel of each candidate saves: measured milliseconds with a cost model
    (per group: the touched layers' latency at the current count minus at ``multiple`` fewer,
    per channel), else multiply-accumulates. ``memo``: per group and step, kept between the budget
    search's trials (every trial starts from the same graph, so a group's layers are the same)."""
    if cost_model is None:
        return {i.root: _channel_macs(cg, i) for i in cands}
    by_group: dict[tuple, float] = memo if memo is not None else {}
    out = {}
    for info in cands:
        key = (info.key, multiple)
        if key not in by_group:
            by_group[key] = _group_ms_saved(cg, info, cost_model, multiple)
        out[info.root] = by_group[key]
    return out


def _group_ms_saved(cg: ChannelGraph, info: ClassInfo, cost_model: Any, step: int) -> float:
    """Milliseconds per channel saved by removing channels of this class's tensors, from the cost
    model's timings of every layer they touch (0 when a layer cannot be timed). The slope is taken
    over a quarter of the channels (whole steps, at least one): one step of 8 in 1024 channels
    saves less than timing noise."""
    n = cg.spaces[info.members[0][0]].size
    step = max(step, (n // 4) // step * step)
    saved = 0.0
    for node, role, per, _t in _touched(cg, [t for t, _c in info.members]):
        shape = cost_model.layer(node)
        if shape is None:
            continue
        smaller = _fewer(shape, role, step * per)
        if smaller is not None:
            saved += cost_model.saved(shape, smaller)
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
            axis = in_axis(node) if it.kind == "sink" else (0 if depthwise_kernel else out_axis(node))
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
