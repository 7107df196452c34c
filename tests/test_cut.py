"""Layers' INT8 form cut from the model with every layer in INT8 is the library's build of those
layers alone: the same ops, and the same outputs bit for bit with graph optimizations on and off."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import shared_model
from onnx import TensorProto, helper, numpy_helper

from redonnx.measure.runtime import run, session
from redonnx.quantize import calibration as C
from redonnx.quantize.cut import Cutter
from redonnx.quantize.quantizer import TRT_OPS, Quantizer, Scheme, activation_matmuls, for_scheme, layers, prepare

STATIC = Scheme("static", reduce_range=True)
TRT = Scheme("static", symmetric=True, op_types=TRT_OPS)
DYNAMIC = Scheme("dynamic", reduce_range=True)


def _residual_cnn(weights_as_inputs: bool = False, shared_bias: bool = False) -> onnx.ModelProto:
    """conv -> relu -> conv -> add(relu) -> relu -> conv (a graph output): the relu's tensor is read by
    a layer and by the Add; older exports list the weights among the graph inputs; ``shared_bias``:
    the second conv reads the first one's bias (equal biases, which cleanup shares)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) / 3, n)
             for n, s in (("w1", (8, 3, 3, 3)), ("b1", (8,)), ("w2", (8, 8, 3, 3)), ("b2", (8,)),
                          ("w3", (4, 8, 1, 1)), ("b3", (4,)))]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b1" if shared_bias else "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["y"], name="conv3"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])]
    if weights_as_inputs:
        inputs += [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in inits]
    g = helper.make_graph(nodes, "residual", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          inits)  # fmt: skip
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 7
    return m


def _mlp(residual: bool = False, tied: bool = False) -> onnx.ModelProto:
    """x -> fc1 -> relu -> fc2 (+ the relu's output: pre-processing fuses them into a Gemm) -> fc3;
    ``tied``: a fourth layer before fc3 reads fc2's weight."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) / 4, n)
             for n, s in (("w1", (16, 32)), ("w2", (32, 32)), ("w3", (32, 10)))]  # fmt: skip
    second = helper.make_node("Add", ["m2", "h1"], ["h2"]) if residual else helper.make_node("Relu", ["m2"], ["h2"])
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="fc1"), helper.make_node("Relu", ["m1"], ["h1"]),
             helper.make_node("MatMul", ["h1", "w2"], ["m2"], name="fc2"), second,
             helper.make_node("MatMul", ["h2", "w3"], ["y"], name="fc3")]  # fmt: skip
    if tied:
        nodes[-1:] = [helper.make_node("MatMul", ["h2", "w2"], ["t"], name="fc2b"),
                      helper.make_node("Relu", ["t"], ["h3"]),
                      helper.make_node("MatMul", ["h3", "w3"], ["y"], name="fc3")]  # fmt: skip
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])], inits)  # fmt: skip
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _feeds(model: onnx.ModelProto, n: int, seed: int) -> dict[str, np.ndarray]:
    inits = {t.name for t in model.graph.initializer}
    out = {}
    for vi in model.graph.input:
        if vi.name not in inits:
            dims = [d.dim_value or n for d in vi.type.tensor_type.shape.dim]
            out[vi.name] = np.random.default_rng(seed).standard_normal(dims).astype(np.float32)
    return out


def _quantized(model: onnx.ModelProto, scheme: Scheme, tmp: Path) -> tuple[onnx.ModelProto, Quantizer, Path | None,
                                                                          Cutter]:  # fmt: skip
    """The prepared model, its quantizer, MinMax ranges (static) and the cutter of its all-INT8 model."""
    prepared = for_scheme(prepare(model, tmp), scheme)
    cache = None
    if scheme.mode == "static":
        cache = C.write_cache(C.tensor_ranges(prepared, [_feeds(prepared, 16, 1)], "MinMax", tmp), tmp / "r.json")
    q = Quantizer(prepared, scheme, tmp, frozenset(activation_matmuls(prepared)))
    cutter = Cutter(prepared, q.build(frozenset(), None, cache, "MinMax", True), scheme.output_pairs)
    return prepared, q, cache, cutter


def _assert_cuts_are_builds(model: onnx.ModelProto, scheme: Scheme, tmp: Path) -> int:
    prepared, q, cache, cutter = _quantized(model, scheme, tmp)
    x = _feeds(prepared, 4, 2)
    names = [lay.name for lay in layers(prepared)]
    sets = [[name] for name in names] + [names[::2], names[1::2], names]  # alone, then several together
    for int8 in sets:
        built = q.build(frozenset(names) - frozenset(int8), None, cache, "MinMax", True)
        cut = cutter.alone(int8[0]) if len(int8) == 1 else cutter.cut(int8)
        assert cut is not None, int8
        assert sorted(n.op_type for n in cut.graph.node) == sorted(n.op_type for n in built.graph.node), int8
        for optimize in (False, True):
            want, got = run(session(built, optimize=optimize), x), run(session(cut, optimize=optimize), x)
            assert all(np.array_equal(want[k], got[k]) for k in want), (int8, optimize)
    return len(names)


@pytest.mark.parametrize("scheme", [STATIC, TRT], ids=["static", "tensorrt"])
@pytest.mark.parametrize("weights_as_inputs", [False, True], ids=["initializers", "weights-as-inputs"])
def test_a_cut_layer_is_the_library_build_of_it_alone(tmp_path: Path, scheme: Scheme, weights_as_inputs: bool) -> None:
    assert _assert_cuts_are_builds(_residual_cnn(weights_as_inputs), scheme, tmp_path) == 3


def test_a_cut_dynamic_layer_is_the_library_build_of_it_alone(tmp_path: Path) -> None:
    assert _assert_cuts_are_builds(_mlp(), DYNAMIC, tmp_path) == 3
    (tmp_path / "residual").mkdir()  # fc2 and its Add: a Gemm, which the dynamic quantizer writes as a MatMul
    assert _assert_cuts_are_builds(_mlp(residual=True), DYNAMIC, tmp_path / "residual") == 3


def test_layers_sharing_a_weight_or_bias_are_cut_as_the_library_builds_them(tmp_path: Path) -> None:
    """A bias two convolutions read (cleanup shares equal initializers) and a weight two MatMuls read
    (tied): each layer gets its own copy before quantizing, so a layer kept float reads its float
    weights, not the INT8 layer's dequantized ones, and the cuts are the library's builds."""
    prepared = prepare(_residual_cnn(shared_bias=True), tmp_path)
    biases = [n.input[2] for n in prepared.graph.node if n.op_type == "Conv"]
    assert len(set(biases)) == 3 and "b1" not in {t.name for t in prepared.graph.initializer}
    assert _assert_cuts_are_builds(_residual_cnn(shared_bias=True), STATIC, tmp_path) == 3
    for scheme, sub in ((STATIC, "static"), (DYNAMIC, "dynamic")):
        (tmp_path / sub).mkdir()
        assert _assert_cuts_are_builds(_mlp(tied=True), scheme, tmp_path / sub) == 4
    (tmp_path / "float").mkdir()
    prepared, q, cache, _ = _quantized(_residual_cnn(shared_bias=True), STATIC, tmp_path / "float")
    built = q.build(frozenset({"conv2", "conv3"}), None, cache, "MinMax", True)  # conv1 alone in INT8
    conv2 = next(n for n in built.graph.node if n.name == "conv2")
    floats = {t.name: numpy_helper.to_array(t) for t in built.graph.initializer}
    assert conv2.input[2] in floats  # an initializer, not a DequantizeLinear's output
    b1 = next(t for t in _residual_cnn().graph.initializer if t.name == "b1")
    np.testing.assert_array_equal(floats[conv2.input[2]], numpy_helper.to_array(b1))  # float, not dequantized


def test_cut_layers_of_resnet20_are_the_library_builds(tmp_path: Path) -> None:
    model = onnx.load(str(shared_model("cifar10/resnet20_bn.onnx")))
    assert _assert_cuts_are_builds(model, STATIC, tmp_path) == 20


def test_a_layer_the_full_model_left_float_cuts_to_the_float_model(tmp_path: Path) -> None:
    prepared = for_scheme(prepare(_mlp(residual=True), tmp_path), DYNAMIC)
    q = Quantizer(prepared, DYNAMIC, tmp_path)
    fc2 = next(lay.name for lay in layers(prepared) if lay.name.startswith("fc2"))
    full = q.build(frozenset({fc2}), None, None, "MinMax", True)  # fc2 left float there
    cutter = Cutter(prepared, full, False)
    same = cutter.alone(fc2)  # its float node, as the full model holds it
    assert same is not None and sorted(n.op_type for n in same.graph.node) == sorted(
        n.op_type for n in prepared.graph.node)  # fmt: skip
    assert cutter.alone("no such node") is None


def test_the_search_builds_only_its_first_trials_and_its_choice_with_the_library(monkeypatch) -> None:
    """Sensitivity and bisection trials are cuts: the library builds each method's first trial and
    the model written, however many layers the search scores."""
    from test_quantize import _outlier_mlp

    from redonnx.pipeline import prune

    calls: list[tuple] = []
    real = Quantizer._build

    def counted(self, exclude, only, *args):
        calls.append((self.scheme.mode, only))
        return real(self, exclude, only, *args)

    monkeypatch.setattr(Quantizer, "_build", counted)
    res = prune(_outlier_mlp(), passes=["cleanup"], precision="int8", target="macs")
    for proposal in res.precision.proposals:
        assert proposal.model is not None and any(c.precision == "float" for c in proposal.layers)
        assert proposal.trials >= len(proposal.layers) + 2  # each layer alone, then the bisection's
    assert all(only is None for _, only in calls)
    assert sum(mode == "static" for mode, _ in calls) <= 4  # every op, layers with MinMax, Percentile; the choice
    assert sum(mode == "dynamic" for mode, _ in calls) <= 2


def _resumed_against_whole_checks(model: onnx.ModelProto, scheme: Scheme, tmp: Path, second_size: bool) -> int:
    """Every layer's resumed score against the whole check of its cut model (two references where
    ``second_size``: the check's leaves)."""
    from redonnx.measure.verify import AtTwoSizes, Reference, Tolerance
    from redonnx.quantize.resumed import worst_cosines

    prepared, _q, _cache, cutter = _quantized(model, scheme, tmp)
    checker = Reference(model, inputs=_feeds(prepared, 4, 2))
    if second_size:
        checker = AtTwoSizes(checker, Reference(model, inputs=_feeds(prepared, 6, 3)), {"n": 6})
    names = [lay.name for lay in layers(prepared)]
    scores = worst_cosines(prepared, cutter, names, checker, batched=True)
    assert set(scores) == set(names)  # every layer resumed
    for name in names:
        whole = checker.check(cutter.alone(name), Tolerance()).worst_cosine
        assert abs(scores[name] - whole) <= 1e-6, (name, scores[name], whole)
    return len(names)


@pytest.mark.parametrize("scheme", [STATIC, TRT], ids=["static", "tensorrt"])
def test_resumed_scores_are_the_whole_checks_of_the_cut_models(tmp_path: Path, scheme: Scheme) -> None:
    """The first layer pairs the graph input (a run from the start), the second's input is read by the
    Add too (its pair replaces it for both), the last writes the graph output."""
    assert _resumed_against_whole_checks(_residual_cnn(), scheme, tmp_path, second_size=True) == 3


def test_resumed_dynamic_scores_are_the_whole_checks(tmp_path: Path) -> None:
    assert _resumed_against_whole_checks(_mlp(residual=True), DYNAMIC, tmp_path, second_size=False) == 3


def test_resumed_scores_of_resnet20_are_the_whole_checks(tmp_path: Path) -> None:
    model = onnx.load(str(shared_model("cifar10/resnet20_bn.onnx")))
    assert _resumed_against_whole_checks(model, STATIC, tmp_path, second_size=False) == 20


def test_over_the_memory_bound_layers_are_checked_whole_to_the_same_model(monkeypatch) -> None:
    """Where the runs' kept activations would exceed the bound, no layer is resumed: the whole
    checks of the cut models choose the same layers, so the same model is written."""
    from test_quantize import _outlier_mlp

    from redonnx.pipeline import prune
    from redonnx.quantize import resumed

    calls: list[int] = []
    real = resumed.worst_cosines

    def counted(*args, **kwargs):
        calls.append(len(out := real(*args, **kwargs)))
        return out

    monkeypatch.setattr("redonnx.quantize.stage.worst_cosines", counted)
    first = prune(_outlier_mlp(), passes=["cleanup"], precision="int8", target="macs").model
    monkeypatch.setattr(resumed, "KEPT_BYTES", 64)
    second = prune(_outlier_mlp(), passes=["cleanup"], precision="int8", target="macs").model
    assert calls[0] > 0 and calls[-1] == 0  # resumed, then not
    assert first.SerializeToString() == second.SerializeToString()
