"""shortcut-conv: a residual shortcut that subsamples and zero-pads channels becomes a 1x1 conv.

ResNets with "option A" shortcuts (He et al. 2016; the CIFAR ResNets) compute the shortcut of a
downsampling block as x[:, :, ::s, ::s] (Slice) followed by zero channels on both sides (Pad).
Both are exact as one convolution with a 1x1 kernel and stride s whose weight places input
channel c at output channel b + c:

    W[b + c, c, 0, 0] = 1, every other weight 0;   Conv(x, W, strides=s) = Pad(Slice(x))

(a 1x1 kernel with stride s and no padding reads positions 0, s, 2s, ... exactly as the Slice
does). The rewrite is for onnxruntime's CPU kernels: its convolutions run in a blocked channel
layout, and a Slice or Pad between them forces a reorder out of that layout and back; as a conv
the shortcut stays blocked and the Add after it fuses into the conv. Measured on the shared CIFAR
ResNet-20: 1.06x faster, outputs identical. Only the shortcut form is rewritten: the Slice chain
must start at 0 with steps only on spatial axes and no other reader, the Pad must add constant
zeros on the channel axis only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from redonnx.channels.coupling import slice_params
from redonnx.inputs.shapes import annotate_graph
from redonnx.io.graph import const_value
from redonnx.passes.base import Pass, PassContext, PassResult

BIG = 2**31 - 1


@dataclass
class ShortcutConv(Pass):
    """Rewrites option-A shortcuts (strided Slice + channel zero Pad) as one strided 1x1 conv (exact)."""

    name: ClassVar[str] = "shortcut-conv"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        res = self.result()
        annotate_graph(graph)
        for pad in [n for n in graph.nodes if n.op == "Pad"]:
            plan = _match(pad)
            if isinstance(plan, str):
                if plan:
                    res.decline(pad, plan)
                continue
            _rewrite(graph, pad, *plan)
            res.count("shortcuts as 1x1 conv")
        if res.modified:
            graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=False).toposort()
        return res


def _channel_pads(pad: gs.Node) -> tuple[int, int] | str:
    """(before, after) zeros on the channel axis of a 4-D tensor, or why this Pad is not that."""
    mode = pad.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    pads = pad.attrs.get("pads") if "pads" in pad.attrs else const_value(pad.inputs[1]) if len(pad.inputs) > 1 else None
    if mode != "constant" or pads is None or len(pads) != 8:
        return ""
    value = const_value(pad.inputs[2]) if len(pad.inputs) > 2 and pad.inputs[2].name else pad.attrs.get("value", 0.0)
    if value is None or np.any(np.asarray(value) != 0):
        return "pads with a non-zero value"
    if len(pad.inputs) > 3 and pad.inputs[3].name:
        return ""  # explicit axes: not the exporters' shortcut form
    p = [int(v) for v in pads]
    if any(p[i] for i in (0, 2, 3, 4, 6, 7)) or min(p) < 0:
        return ""
    return p[1], p[5]


def _match(pad: gs.Node) -> tuple[gs.Tensor, int, int, list[int], int] | str:
    """(source, before, after, strides, channels) or "" (not a shortcut) or a reason."""
    pads = _channel_pads(pad)
    if isinstance(pads, str):
        return pads
    strides = [1, 1]
    x = pad.inputs[0]
    while x.inputs and x.inputs[0].op == "Slice" and len(x.outputs) == 1:
        sl = x.inputs[0]
        p = slice_params(sl)
        if p is None:
            return "a Slice with computed parameters"
        for start, end, axis, step in zip(*p, strict=True):
            axis = axis + 4 if axis < 0 else axis
            if axis not in (2, 3) or start != 0 or end < BIG or step < 1:
                return ""
            strides[axis - 2] *= step
        x = sl.inputs[0]
    if strides == [1, 1]:
        return ""  # a channel Pad alone: no gain measured
    channels = x.shape[1] if x.shape is not None and len(x.shape) == 4 else None
    if not isinstance(channels, int) or channels <= 0 or x.dtype is None or np.dtype(x.dtype).kind != "f":
        return "shortcut input with unknown channels or dtype"
    return x, pads[0], pads[1], strides, channels


def _rewrite(
    graph: gs.Graph, pad: gs.Node, x: gs.Tensor, before: int, after: int, strides: list[int], cin: int
) -> None:
    w = np.zeros((before + cin + after, cin, 1, 1), dtype=x.dtype)
    w[before + np.arange(cin), np.arange(cin)] = 1
    weight = gs.Constant(f"{pad.name or pad.outputs[0].name}_shortcut_w", w)
    out = pad.outputs[0]
    pad.outputs.clear()
    conv = gs.Node("Conv", name=f"{pad.name or out.name}_conv", inputs=[x, weight], outputs=[out],
                   attrs={"kernel_shape": [1, 1], "strides": strides})  # fmt: skip
    graph.nodes.append(conv)
