"""inspect: parameter and MAC counts agree with an independent count."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from builders import Builder
from conftest import MODELS, shared_model
from onnx import numpy_helper

from redonnx.cli import main
from redonnx.io.files import load_model
from redonnx.measure.cost import model_cost
from redonnx.measure.runtime import random_inputs, run, session


def test_hand_counted_small_graph() -> None:
    b = Builder()
    y = b.conv("x", 3, 8, k=3, pad=1)  # 8*3*9 + 8 params; 8*16*16 outputs * 27 MACs
    y = b.conv(y, 8, 8, k=3, pad=0, group=8, strides=[2, 2])  # depthwise: 8*9 + 8; 8*7*7 * 9
    y = b.op("ConvTranspose", [y, b.rand(8, 2, 2, 2)], strides=[2, 2], group=2)  # 8*2*2*2, C_out 4
    flat = b.op("Flatten", [b.op("GlobalAveragePool", [y])])
    g = b.op("Gemm", [flat, b.rand(5, 4), b.rand(5)], transB=1)  # 20 + 5; 1*5*4
    m = b.model([("x", ["batch", 3, 16, 16])], [b.op("MatMul", [g, b.rand(5, 7)])])  # 35; 7*5
    cost = model_cost(m)
    by_op = {layer.op + str(i): layer for i, layer in enumerate(cost.layers)}
    assert [layer.params for layer in cost.layers] == [224, 80, 64, 25, 35]
    conv_t_macs = 8 * 7 * 7 * 2 * 2 * 2  # prod(input) * C_out/group * k*k
    assert [layer.macs for layer in cost.layers] == [8 * 256 * 27, 8 * 49 * 9, conv_t_macs, 20, 35]
    assert by_op["Conv1"].note == "depthwise"
    assert cost.params == 224 + 80 + 64 + 25 + 35
    assert model_cost(m, {"x": [4, 3, 16, 16]}).macs == 4 * cost.macs


def independent_count(model: onnx.ModelProto, feeds: dict) -> tuple[int, int]:
    """Params from the initializers; MACs from shapes onnxruntime really produces."""
    params = sum(
        int(np.prod(t.dims))
        for t in model.graph.initializer
        if numpy_helper.to_array(t).dtype.kind == "f" and np.prod(t.dims) > 1
    )
    for node in model.graph.node:
        if node.op_type == "Constant":
            arr = numpy_helper.to_array(node.attribute[0].t)
            params += arr.size if arr.dtype.kind == "f" and arr.size > 1 else 0
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    layers = [n for n in exposed.graph.node if n.op_type in ("Conv", "Gemm")]
    for n in layers:
        exposed.graph.output.append(onnx.helper.make_empty_tensor_value_info(n.output[0]))
    outs = run(session(exposed), feeds)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    macs = 0
    for n in layers:
        w = inits[n.input[1]]
        macs += outs[n.output[0]].size * int(np.prod(w.shape[1:]))
    return params, macs


@pytest.mark.parametrize("path", ["resnet20", "digits_resnet", "digits_mobile"])
def test_agrees_with_independent_count(path: str) -> None:
    p = shared_model("cifar10/resnet20_bn.onnx") if path == "resnet20" else MODELS / f"{path}.onnx"
    model = load_model(p).model
    params, macs = independent_count(model, random_inputs(model, batch=1))
    cost = model_cost(model)
    assert cost.macs == macs
    assert cost.params == params
    if path == "resnet20":
        assert cost.macs == 40_551_040  # the known ~40.6 M MACs of ResNet-20


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(MODELS / "digits_mlp.onnx"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["params"] == sum(layer["params"] for layer in data["layers"]) + 4 * (128 + 64)
    assert data["ops"]["Gemm"] == 3
    assert all(layer["candidate"] for layer in data["layers"])


def test_a_qdq_layer_counts_the_quantized_weights_a_dequantize_reads() -> None:
    """In a QDQ model a layer reads its weights and bias through DequantizeLinear: the layer's
    weight shape and parameters are those of the stored int8 and int32 constants (they read "-" and
    0 before: `inspect` of a written INT8 model), and the layer is still no pruning candidate."""
    from redonnx.pipeline import prune

    model = load_model(MODELS / "digits_resnet.onnx").model
    flt = prune(model, precision="fp32", target="macs").model
    q = prune(model, precision="int8", target="macs")
    assert q.precision.chosen is not None and q.precision.chosen.int8_layers
    before = {lay.name: lay for lay in model_cost(flt).layers}
    after = model_cost(q.model).layers
    quantized = [lay for lay in after if "int8 weights" in lay.note]
    assert len(quantized) == q.precision.chosen.int8_layers
    for lay in after:
        assert (lay.weight_shape, lay.params, lay.macs) == (before[lay.name].weight_shape, before[lay.name].params,
                                                            before[lay.name].macs)  # fmt: skip
    assert not any(lay.candidate for lay in quantized)
