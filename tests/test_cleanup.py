"""cleanup: Identity/Dropout bypass, duplicate initializers, dead nodes; outputs unchanged."""

from __future__ import annotations

import numpy as np
import onnx
from builders import Builder
from conftest import assert_equivalent

from redonnx.pipeline import run_passes


def clean(m: onnx.ModelProto):
    out, (res,) = run_passes(m, ["cleanup"], exact=True)
    return out, res


def test_identity_and_dropout_removed() -> None:
    b = Builder()
    y = b.op("Identity", [b.op("MatMul", ["x", b.rand(4, 4)])])
    y = b.op("Dropout", [y, b.const(np.array(0.5, np.float32))])
    m = b.model([("x", [2, 4])], [b.op("Relu", [y])], opset=13)
    out, res = clean(m)
    assert [n.op_type for n in out.graph.node] == ["MatMul", "Relu"]
    assert res.counts["Identity removed"] == 1 and res.counts["Dropout removed"] == 1
    assert_equivalent(m, out)


def test_identity_feeding_graph_output_keeps_output_name() -> None:
    b = Builder()
    mm = b.op("MatMul", ["x", b.rand(4, 4)])
    y = b.op("Identity", [mm])
    m = b.model([("x", [2, 4])], [y])
    out, _ = clean(m)
    assert [n.op_type for n in out.graph.node] == ["MatMul"]
    assert out.graph.output[0].name == y
    assert_equivalent(m, out)


def test_identity_between_input_and_output_kept() -> None:
    b = Builder()
    y = b.op("Identity", ["x"])
    m = b.model([("x", [2, 4])], [y])
    out, res = clean(m)
    assert [n.op_type for n in out.graph.node] == ["Identity"]
    assert res.declined
    assert_equivalent(m, out)


def test_dropout_with_used_mask_kept() -> None:
    b = Builder()
    y, mask = b.op("Dropout", ["x"], n_out=2)
    m = b.model([("x", [2, 4])], [y])
    m.graph.output.append(onnx.helper.make_tensor_value_info(mask, onnx.TensorProto.BOOL, None))
    out, res = clean(m)
    assert [n.op_type for n in out.graph.node] == ["Dropout"]
    assert "mask" in res.declined[0].reason


def test_duplicate_initializers_shared_and_dead_nodes_removed() -> None:
    b = Builder()
    w = np.arange(16, dtype=np.float32).reshape(4, 4)
    y1 = b.op("MatMul", ["x", b.const(w)])
    y2 = b.op("MatMul", ["x", b.const(w.copy())])
    b.op("Relu", [y1])  # dead: nothing reads it
    m = b.model([("x", [2, 4])], [b.op("Add", [y1, y2])])
    out, res = clean(m)
    assert len(out.graph.initializer) == 1
    assert res.counts["duplicate initializers shared"] == 1
    assert res.counts["unused nodes removed"] == 1
    assert_equivalent(m, out)


def test_no_change_reports_unmodified() -> None:
    b = Builder()
    m = b.model([("x", [2, 4])], [b.op("MatMul", ["x", b.rand(4, 4)])])
    _, res = clean(m)
    assert not res.modified


def test_scalar_and_one_element_initializers_are_not_duplicates() -> None:
    """0 and [0] have the same bytes but different shapes (Unsqueeze/Slice care)."""
    b = Builder()
    scalar = b.const(np.array(0, np.int64))
    vector = b.const(np.array([0], np.int64))
    u = b.op("Unsqueeze", [scalar, vector])  # -> [0], a valid 1-D 'starts'
    y = b.op("Slice", ["x", u, b.const(np.array([2], np.int64)), vector])
    m = b.model([("x", [4, 3])], [y])
    out, res = clean(m)
    assert not res.counts.get("duplicate initializers shared")
    assert_equivalent(m, out)
