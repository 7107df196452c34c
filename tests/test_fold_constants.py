"""fold-constants: shape arithmetic folds, dynamic dimensions stay dynamic, big results stay."""

from __future__ import annotations

import numpy as np
import onnx
from builders import Builder
from conftest import MODELS, assert_equivalent, shared_model

from redonnx.io.files import load_model
from redonnx.measure.runtime import random_inputs, run, session
from redonnx.passes import FoldConstants
from redonnx.pipeline import run_passes


def reshape_by_shape_arithmetic(dims: list) -> onnx.ModelProto:
    """x -> Reshape(x, Concat(Gather(Shape(x), 0), [-1])): the pattern exporters emit."""
    b = Builder()
    shape = b.op("Shape", ["x"])
    n = b.op(
        "Unsqueeze", [b.op("Gather", [shape, b.const(np.array(0, np.int64))], axis=0), b.const(np.array([0], np.int64))]
    )
    target = b.op("Concat", [n, b.const(np.array([-1], np.int64))], axis=0)
    y = b.op("Reshape", ["x", target])
    return b.model([("x", dims)], [b.op("MatMul", [y, b.rand(12, 2)])])


def test_static_shape_arithmetic_folds() -> None:
    m = reshape_by_shape_arithmetic([2, 3, 4])
    out, (res,) = run_passes(m, ["fold-constants"], exact=True)
    assert [n.op_type for n in out.graph.node] == ["Reshape", "MatMul"]
    assert res.counts["nodes folded"] == 4  # Shape, Gather, Unsqueeze, Concat
    assert_equivalent(m, out)


def test_dynamic_batch_is_not_fixed() -> None:
    m = reshape_by_shape_arithmetic(["batch", 3, 4])
    out, _ = run_passes(m, ["fold-constants"], exact=True)
    assert "Shape" in [n.op_type for n in out.graph.node]
    sess = session(out)
    for batch in (1, 5):
        assert run(sess, random_inputs(out, batch=batch))[out.graph.output[0].name].shape == (batch, 2)


def test_large_results_not_folded() -> None:
    b = Builder()
    big = b.op("Tile", [b.const(np.ones((1, 4), np.float32)), b.const(np.array([2000, 1], np.int64))])
    m = b.model([("x", [2000, 4])], [b.op("Add", ["x", big])])
    out, _ = run_passes(m, ["fold-constants"], exact=True)
    assert "Tile" not in [n.op_type for n in out.graph.node]  # 32 kB: below the default limit
    out2, _ = run_passes(m, [FoldConstants(size_limit=1024)], exact=True)
    assert "Tile" in [n.op_type for n in out2.graph.node]
    assert_equivalent(m, out2)


def test_small_results_folded() -> None:
    b = Builder()
    c = b.op("Mul", [b.const(np.ones(4, np.float32)), b.const(np.full(4, 3.0, np.float32))])
    m = b.model([("x", [2, 4])], [b.op("Add", ["x", c])])
    out, _ = run_passes(m, ["fold-constants"], exact=True)
    assert [n.op_type for n in out.graph.node] == ["Add"]
    assert_equivalent(m, out)


def test_real_models_fold_their_constant_nodes() -> None:
    src = load_model(shared_model("cifar10/resnet20_bn.onnx")).model
    out, (_res,) = run_passes(src, ["fold-constants"], exact=True)
    assert not any(n.op_type == "Constant" for n in out.graph.node)
    assert len(out.graph.node) < len(src.graph.node)
    assert_equivalent(src, out)
    mobile = load_model(MODELS / "digits_mobile.onnx").model
    out, _ = run_passes(mobile, ["fold-constants"], exact=True)
    assert not any(n.op_type == "Constant" for n in out.graph.node)
    assert_equivalent(mobile, out)


def test_one_unevaluable_constant_node_does_not_stop_the_rest() -> None:
    """A custom-domain op on constants cannot run in onnxruntime; the other constant arithmetic
    still folds (the partitioned fallback), and the custom op is left as it is."""
    b = Builder()
    odd = b.op("Mystery", [b.const(np.ones(4, np.float32))], domain="custom.example")
    shape = b.op("Concat", [b.const(np.array([2], np.int64)), b.const(np.array([-1], np.int64))], axis=0)
    y = b.op("Reshape", ["x", shape])
    model = b.model([("x", [2, 4])], [y, odd])
    model.opset_import.append(onnx.helper.make_opsetid("custom.example", 1))
    graph_out, _ = run_passes(model, ["fold-constants"], exact=True)
    ops = [n.op_type for n in graph_out.graph.node]
    assert "Concat" not in ops and "Mystery" in ops


def test_a_graph_with_nothing_to_fold_skips_the_evaluation(monkeypatch) -> None:
    """gs copies the whole graph before it finds nothing: the pass proves there is nothing first,
    and the graphs that have something still fold (shape arithmetic, constants, a Cast)."""
    import onnx_graphsurgeon as gs

    from redonnx.io.graph import to_graph
    from redonnx.passes import fold_constants as F

    b = Builder()
    h = b.op("Relu", [b.op("MatMul", ["x", b.rand(4, 4)])])
    plain = b.model([("x", [2, 4])], [b.op("Add", [h, b.rand(4)])])
    calls = []
    real = gs.Graph.fold_constants
    monkeypatch.setattr(gs.Graph, "fold_constants", lambda self, **kw: calls.append(1) or real(self, **kw))
    out, (res,) = run_passes(plain, ["fold-constants"], exact=True)
    assert not calls and not res.modified
    assert_equivalent(plain, out)
    assert not F._may_fold(to_graph(plain))
    cast = Builder()
    m = cast.model([("x", [2, 4])], [cast.op("Cast", [cast.op("Relu", ["x"])], to=onnx.TensorProto.FLOAT)])
    for model in (reshape_by_shape_arithmetic([2, 3, 4]), m):
        assert F._may_fold(to_graph(model))
    out, _ = run_passes(reshape_by_shape_arithmetic([2, 3, 4]), ["fold-constants"], exact=True)
    assert calls and "Shape" not in [n.op_type for n in out.graph.node]
