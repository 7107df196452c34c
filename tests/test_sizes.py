"""Dynamic dimensions: sizes chosen without hints, verification at two sizes, shape-free exact passes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import Builder
from onnx import TensorProto, helper

from redonnx import pipeline
from redonnx.cli import main
from redonnx.errors import RedonnxError
from redonnx.inputs.sizes import total_stride
from redonnx.pipeline import prune


def pyramid(stride: int = 64) -> onnx.ModelProto:
    """A feature pyramid: downsample by ``stride`` in steps of 2, upsample the deepest map back one
    level and concatenate it with the level above: only sides the stride divides run."""
    b = Builder(5)
    x, levels = "x", []
    for _ in range(int(np.log2(stride))):
        x = b.op("Relu", [b.op("Conv", [x, b.rand(4, 4 if levels else 3, 3, 3), b.rand(4)], pads=[1] * 4,
                                kernel_shape=[3, 3], strides=[2, 2])])  # fmt: skip
        levels.append(x)
    up = b.op("Resize", [levels[-1], "", b.const(np.array([1, 1, 2, 2], np.float32))], mode="nearest")
    y = b.op("Concat", [levels[-2], up], axis=1)
    return b.model([("x", ["N", 3, "H", "W"])], [b.op("GlobalAveragePool", [y])])


def test_spatial_size_must_be_a_multiple_of_the_stride() -> None:
    """Acceptance: a size the feature pyramid's stride divides is found without hints."""
    model = pyramid(64)
    assert total_stride(model) == 64
    res = prune(model, exact=True)
    side = res.before.input_shapes["x"][2]
    assert side % 64 == 0 and side >= 4 * 64 and res.before.input_shapes["x"][3] == side
    second = res.verification.outputs[1]
    assert res.verification and "(at H=320, W=320)" in second.name  # pooled outputs: same shape, other size


def scaled_by_width(baked: bool) -> onnx.ModelProto:
    """y = x * width (read from the shape at run time), or the same with the width baked in at 32."""
    nodes = [helper.make_node("Mul", ["x", "k"], ["y"])]
    inits = []
    if baked:
        inits.append(helper.make_tensor("k", TensorProto.FLOAT, [], [32.0]))
    else:
        inits.append(helper.make_tensor("three", TensorProto.INT64, [1], [3]))
        nodes[:0] = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "three"], ["w"]),
                     helper.make_node("Cast", ["w"], ["k"], to=TensorProto.FLOAT)]  # fmt: skip
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)  # fmt: skip
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_a_rewrite_valid_at_one_size_only_is_caught(monkeypatch) -> None:
    """A pass that folds a shape into a constant agrees at the size it was folded at and not at the
    second size: verification fails there, nothing would be written."""
    original, baked = scaled_by_width(False), scaled_by_width(True)
    monkeypatch.setattr(pipeline, "run_passes", lambda model, passes, exact, ctx=None: (baked, []))
    res = prune(original, exact=True)
    first = [o for o in res.verification.outputs if "(at" not in o.name]
    second = [o for o in res.verification.outputs if "(at" in o.name]
    assert first and all(o.passed for o in first)  # the size it was baked at: identical
    assert second and not any(o.passed for o in second) and not res.verification


def test_no_size_refused_once_but_exact_no_verify_writes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    b = Builder(2)
    h = b.op("Relu", [b.bn(b.conv("x", 3, 4), 4)])
    model = b.model([("x", [1, 3, "h", "w"])], [b.op("Reshape", [h, b.const(np.array([1, 37], np.int64))])])
    with pytest.raises(RedonnxError, match=r"no size for the dynamic dimensions of x .*then 1 to 64"):
        prune(model, exact=True)
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(model, src)
    assert main(["prune", str(src), "-o", str(out), "--exact", "--no-verify"]) == 0
    assert "BatchNormalization" not in [n.op_type for n in onnx.load(out).graph.node]
    assert main(["prune", str(src), "-o", str(tmp_path / "p.onnx")]) == 2
    assert "no size for the dynamic dimensions" in capsys.readouterr().err


def test_a_size_only_a_fixed_reshape_allows_is_found() -> None:
    """No ladder size runs (the features must flatten to 36 values): 3x3 is found."""
    b = Builder(3)
    h = b.op("Relu", [b.conv("x", 3, 4)])
    model = b.model([("x", [1, 3, "h", "w"])], [b.op("Reshape", [h, b.const(np.array([1, 36], np.int64))])])
    res = prune(model, exact=True)
    assert res.before.input_shapes["x"] == [1, 3, 3, 3] and res.verification


def test_conv3d_encoder_verified_at_two_sizes() -> None:
    """A Conv3D encoder with dynamic depth, height and width: sizes chosen, checked at two."""
    b = Builder(6)
    conv = b.op("Conv", ["x", b.rand(8, 1, 3, 3, 3, scale=0.3)], pads=[1] * 6, strides=[2, 2, 2])
    h = b.op("Relu", [b.bn(conv, 8)])
    y = b.op("Conv", [h, b.rand(4, 8, 3, 3, 3, scale=0.3)], pads=[1] * 6)
    model = b.model([("x", ["N", 1, "D", "H", "W"])], [y])
    res = prune(model, exact=True)
    assert res.verification and len(res.verification.outputs) == 2
    assert res.verification.outputs[1].shape[2:] != res.verification.outputs[0].shape[2:]


def test_the_planner_checks_every_trial_at_both_sizes(monkeypatch) -> None:
    """The planner's reference holds the second size too: a candidate that is right at the first
    size only is over the budget in the search, not refused after it (the search then writes less)."""
    from redonnx import planner
    from redonnx.measure.verify import AtTwoSizes, Tolerance

    original, baked = scaled_by_width(False), scaled_by_width(True)
    seen = []
    real_plan = planner.Planner.plan

    def spy(self, source, passes, feeds=None):
        seen.append(self.reference)
        return real_plan(self, source, passes, feeds)

    monkeypatch.setattr(planner.Planner, "plan", spy)
    prune(original, target="macs")
    (reference,) = seen
    assert isinstance(reference, AtTwoSizes)
    tol = Tolerance(1e-6, 1e-4, 0.99)
    assert reference.check(original, tol) and not reference.check(baked, tol)
    assert reference.first.check(baked, tol)  # the first size alone would have let it through


def rate_chunked(state: bool = False) -> onnx.ModelProto:
    """silero-vad's shape of problem: the 16 kHz branch (sr == 16000) reads its signal in frames of 64
    samples, the other in frames of 256 (Reshape to [-1, frame]); with ``state``, a state [2, ?, 4]
    whose batch has no name and must be 1 (silero-vad's) is added to the output."""
    frames = {}
    for branch, frame in (("then", 64), ("else", 256)):
        shape = helper.make_tensor(f"frame_{branch}", TensorProto.INT64, [2], [-1, frame])
        nodes = [helper.make_node("Constant", [], [f"f_{branch}"], value=shape),
                 helper.make_node("Reshape", ["x", f"f_{branch}"], [f"r_{branch}"]),
                 helper.make_node("ReduceSum", [f"r_{branch}"], [f"y_{branch}"], keepdims=0)]  # fmt: skip
        out = helper.make_tensor_value_info(f"y_{branch}", TensorProto.FLOAT, None)
        frames[branch] = helper.make_graph(nodes, branch, [], [out])
    branches = {"then_branch": frames["then"], "else_branch": frames["else"]}
    nodes = [helper.make_node("Equal", ["sr", "rate"], ["cond"]), helper.make_node("If", ["cond"], ["y"], **branches)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n"]),
              helper.make_tensor_value_info("sr", TensorProto.INT64, [])]  # fmt: skip
    inits = [helper.make_tensor("rate", TensorProto.INT64, [], [16000]),
             helper.make_tensor("two_by_four", TensorProto.INT64, [2], [2, 4])]  # fmt: skip
    if state:
        inputs.append(helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "", 4]))
        nodes += [helper.make_node("Reshape", ["state", "two_by_four"], ["s"]),
                  helper.make_node("ReduceSum", ["s"], ["t"], keepdims=0),
                  helper.make_node("Add", ["y", "t"], ["z"])]  # fmt: skip
    result = helper.make_tensor_value_info("z" if state else "y", TensorProto.FLOAT, None)
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, [result], inits),
                          opset_imports=[helper.make_opsetid("", 17)])  # fmt: skip
    m.ir_version = 8
    return m


@pytest.mark.parametrize("state", [False, True])
def test_a_size_must_run_with_every_compared_value(state: bool) -> None:
    """64 samples run at 16000 only; the size chosen (256) runs at 8000 too, and both are verified;
    a state whose unnamed batch must be 1 is held at 1 once nothing else runs."""
    res = prune(rate_chunked(state), exact=True)
    assert res.before.input_shapes["x"] == [1, 256]
    assert not state or res.before.input_shapes["state"] == [2, 1, 4]
    assert res.verification and "sr = 16000 on 4, 8000 on 4" in res.verification.inputs


def test_settled_inputs_draw_what_each_caller_drew() -> None:
    """The inputs settled once draw, at any batch, the arrays the input model drew at the hints
    (batch-leading images, a fixed-batch model, token ids at chosen sequence sizes, given arrays)."""
    from conftest import MODELS

    from redonnx.inputs import model as input_model
    from redonnx.inputs.sizes import settle_inputs
    from redonnx.redundancy.statistics import draw_stats_inputs, stats_feeds

    fixtures = Path(__file__).parent / "fixtures"
    bert = onnx.load(fixtures / "bert_tiny.onnx")
    given = str(fixtures / "bert_tiny_inputs.npz")
    fixed = scaled_by_width(True)
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2  # a batch the model fixes
    for model, inputs, hints in [
        (onnx.load(MODELS / "digits_resnet.onnx"), None, None),
        (bert, None, None),
        (bert, given, None),
        (fixed, None, {"x": [2, 3, 8, 8]}),
        (pyramid(8), None, None),
    ]:
        settled = settle_inputs(model, inputs, hints)
        assert settled.shapes is not None and settled.hints is not None
        for batch, seed, white in [(1, 0, False), (5, 3, True), (64, 100_003, False)]:
            want = settled.input_model.draw(model, settled.hints, batch=batch, seed=seed, white=white)
            got = settled.draw(batch, seed, white)
            assert want.keys() == got.keys()
            assert all(np.array_equal(want[k], got[k]) and want[k].dtype == got[k].dtype for k in want)
        old = draw_stats_inputs(model, settled.hints, settled.input_model, batch=32, seed=1)
        new = stats_feeds(settled, batch=32, seed=1)
        assert all(np.array_equal(old[k], new[k]) for k in old)
    assert input_model.infer(bert, None).describe() == settle_inputs(bert, None, None).input_model.describe()


def test_unsettled_sizes_fail_when_drawn_only() -> None:
    """--exact --no-verify settles what it can: sizes no ladder finds are an error only when drawn."""
    from redonnx.inputs.sizes import settle_inputs

    model = scaled_by_width(True)
    model.graph.input[0].type.tensor_type.ClearField("shape")  # no declared shape, no hint
    settled = settle_inputs(model, None, None, lenient=True)
    assert settled.shapes is None
    with pytest.raises(RedonnxError, match="no declared shape"):
        settled.draw(1, 0)
