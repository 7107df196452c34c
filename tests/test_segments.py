"""Piecewise runs: the same outputs as one session; replacements at stops propagate."""

from __future__ import annotations

import numpy as np
from builders import Builder
from conftest import cifar_batch, shared_model
from onnx import TensorProto, helper

from redonnx.io.files import load_model
from redonnx.measure.runtime import run, session
from redonnx.measure.segments import Stepper


def test_piecewise_run_equals_one_session() -> None:
    model = load_model(shared_model("cifar10/resnet20_bn.onnx")).model
    stops = [n.output[0] for n in model.graph.node if n.op_type == "BatchNormalization"]
    x, _ = cifar_batch(4)
    ref = run(session(model), {"input": x})["logits"]
    seen = []
    out = Stepper(model, stops).run({"input": x}, lambda name, v: seen.append(name))
    assert np.array_equal(out["logits"], ref) and seen == stops


def test_replacement_propagates_and_subgraphs_read_outer_values() -> None:
    """Zeroing a stop changes what later pieces see, also inside an If branch reading an outer value."""
    b = Builder(1)
    h = b.op("Relu", [b.conv("x", 2, 3)])
    then = helper.make_graph([helper.make_node("Add", [h, h], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])  # fmt: skip
    other = helper.make_graph([helper.make_node("Neg", [h], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])  # fmt: skip
    cond = b.const(np.array(True))
    b.nodes.append(helper.make_node("If", [cond], ["y"], then_branch=then, else_branch=other))
    model = b.model([("x", [1, 2, 5, 5])], ["y"])
    x = np.random.default_rng(0).standard_normal((1, 2, 5, 5)).astype(np.float32)
    stepper = Stepper(model, [h])
    assert np.allclose(stepper.run({"x": x})["y"], run(session(model), {"x": x})["y"])
    assert not stepper.run({"x": x}, lambda name, v: np.zeros_like(v))["y"].any()
    half = stepper.run({"x": x}, lambda name, v: v / 2, until=h)
    assert list(half) == [h]


def test_resumed_runs_equal_whole_runs() -> None:
    """Replacing one stop at a time, resumed from the reference run's states, gives bit for bit the
    outputs of whole runs, and runs only the pieces from that stop on."""
    model = load_model(shared_model("cifar10/resnet20_bn.onnx")).model
    stops = [n.output[0] for n in model.graph.node if n.op_type == "BatchNormalization"]
    x, _ = cifar_batch(2)
    stepper = Stepper(model, stops)
    states: list = []
    ref = stepper.run({"input": x}, keep=states)
    assert len(states) == len(stepper._pieces)
    for stop in (stops[0], stops[len(stops) // 2], stops[-1]):

        def zero(name: str, v: np.ndarray, stop=stop) -> np.ndarray | None:
            return np.zeros_like(v) if name == stop else None

        seen: list[str] = []
        whole = stepper.run({"input": x}, zero)
        spy = lambda n, v, zero=zero, seen=seen: seen.append(n) or zero(n, v)  # noqa: E731
        resumed = stepper.run({"input": x}, spy, keep=states, resume=stop)
        assert np.array_equal(whole["logits"], resumed["logits"])
        assert not np.array_equal(whole["logits"], ref["logits"])
        assert seen == stops[stops.index(stop) :]
    assert len(states) == len(stepper._pieces)  # resumed runs leave the reference states alone
