"""shortcut-conv: option-A shortcuts (strided Slice + channel zero Pad) as a strided 1x1 conv."""

from __future__ import annotations

import numpy as np
from builders import Builder
from conftest import assert_equivalent, shared_model

from redonnx.io.files import load_model
from redonnx.pipeline import run_passes


def shortcut_block(pad_value: float = 0.0, channel_pads: tuple[int, int] = (2, 2)) -> tuple:
    b = Builder(9)
    x = b.op("Relu", [b.conv("x", 3, 4)])
    y = b.op("Conv", [x, b.rand(8, 4, 3, 3), b.rand(8)], pads=[1] * 4, kernel_shape=[3, 3], strides=[2, 2])
    s = b.op("Slice", [x, b.const(np.array([0, 0], np.int64)), b.const(np.array([2**62, 2**62], np.int64)),
                       b.const(np.array([2, 3], np.int64)), b.const(np.array([2, 2], np.int64))])  # fmt: skip
    pads = np.array([0, channel_pads[0], 0, 0, 0, channel_pads[1], 0, 0], np.int64)
    p = b.op("Pad", [s, b.const(pads), b.const(np.array(pad_value, np.float32))])
    return b.model([("x", ["N", 3, 8, 8])], [b.op("Relu", [b.op("Add", [y, p])])])


def test_slice_and_zero_pad_become_a_strided_conv() -> None:
    model = shortcut_block()
    out, (res,) = run_passes(model, ["shortcut-conv"], exact=True)
    assert res.counts == {"shortcuts as 1x1 conv": 1}
    ops = [n.op_type for n in out.graph.node]
    assert "Pad" not in ops and "Slice" not in ops and ops.count("Conv") == 3
    assert_equivalent(model, out, rtol=1e-6)


def test_other_pads_are_left_alone() -> None:
    _, (res,) = run_passes(shortcut_block(pad_value=1.0), ["shortcut-conv"], exact=True)
    assert not res.modified and "non-zero" in res.declined[0].reason


def test_resnet20_shortcuts_rewritten_exactly() -> None:
    src = load_model(shared_model("cifar10/resnet20_bn.onnx")).model
    out, results = run_passes(src, ["fold-constants", "fold-batchnorm", "shortcut-conv", "cleanup"], exact=True)
    assert results[2].counts == {"shortcuts as 1x1 conv": 2}
    assert "Pad" not in [n.op_type for n in out.graph.node]
    assert_equivalent(src, out, rtol=1e-5)


def test_the_summary_says_the_shortcut_conv_added_parameters_and_macs() -> None:
    """The 1x1 conv has weights the Slice and Pad had not: the summary says "added", not "-x% removed"."""
    from redonnx.pipeline import prune

    res = prune(shortcut_block(), passes=["shortcut-conv"], exact=True, shapes={"x": [1, 3, 8, 8]}, target="macs")
    line = next(ln for ln in res.summary().splitlines() if ln.startswith("parameters"))
    assert res.after.params > res.before.params and res.after.macs > res.before.macs, line
    assert "% added" in line and "-" not in line.split("(")[1].split(")")[0], line
