"""fold-batchnorm: every fold checked numerically against onnxruntime on the original graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import Builder
from conftest import MODELS, assert_equivalent, shared_model

from redonnx.io import load_model
from redonnx.pipeline import run_passes


def fold(model: onnx.ModelProto):
    out, results = run_passes(model, ["fold-batchnorm", "cleanup"], exact=True)
    return out, results[0]


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("bias", [True, False])
def test_conv_bn_folds_exactly(bias: bool) -> None:
    b = Builder()
    y = b.bn(b.conv("x", 3, 8, bias=bias), 8)
    m = b.model([("x", [2, 3, 8, 8])], [b.op("Relu", [y])])
    out, res = fold(m)
    assert ops(out) == ["Conv", "Relu"]
    assert res.counts["BatchNormalization folded"] == 1
    assert_equivalent(m, out)


def test_grouped_conv_transpose_bn() -> None:
    b = Builder()
    w = b.rand(4, 3, 3, 3)  # [C_in, C_out/group, k, k] with group 2 -> 6 output channels
    y = b.op("ConvTranspose", ["x", w, b.rand(6)], group=2, strides=[2, 2])
    m = b.model([("x", [1, 4, 5, 5])], [b.bn(y, 6)])
    out, _ = fold(m)
    assert ops(out) == ["ConvTranspose"]
    assert_equivalent(m, out)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_bn_with_alpha_beta(trans_b: int) -> None:
    b = Builder()
    w = b.rand(*((5, 7) if trans_b else (7, 5)))
    y = b.op("Gemm", ["x", w, b.rand(5)], transB=trans_b, alpha=0.7, beta=1.3)
    m = b.model([("x", [3, 7])], [b.bn(y, 5)])
    out, _ = fold(m)
    assert ops(out) == ["Gemm"]
    assert_equivalent(m, out)


def test_matmul_bias_mul_add_chain_like_tf2onnx() -> None:
    b = Builder()
    y = b.op("MatMul", ["x", b.rand(6, 4)])
    y = b.op("Add", [y, b.rand(4)])
    y = b.op("Mul", [y, b.rand(4)])
    y = b.op("Add", [b.rand(4), y])  # constant first: Add is commutative
    y = b.op("Sub", [y, b.rand(1)])
    y = b.op("Div", [y, b.const(np.full(4, 1.7, np.float32))])
    m = b.model([("x", [3, 6])], [b.op("Relu", [y])])
    out, res = fold(m)
    assert ops(out) == ["MatMul", "Add", "Relu"]
    assert res.counts["Mul folded"] == 1 and res.counts["Add folded"] == 2
    assert_equivalent(m, out)


def test_matmul_bn_declined_for_rank3_activations() -> None:
    """BN normalises axis 1; a [N, T, K] MatMul's channels are the last axis: not foldable."""
    b = Builder()
    y = b.op("MatMul", ["x", b.rand(6, 4)])
    m = b.model([("x", [2, 4, 6])], [b.bn(y, 4)])
    out, res = fold(m)
    assert "BatchNormalization" in ops(out)
    assert res.declined and res.declined[0].op == "BatchNormalization"
    assert_equivalent(m, out)


def test_per_channel_mul_on_wrong_axis_not_folded() -> None:
    b = Builder()
    y = b.conv("x", 3, 4)
    y = b.op("Mul", [y, b.rand(1, 1, 1, 6)])  # varies along W, not channels
    m = b.model([("x", [1, 3, 6, 6])], [y])
    out, res = fold(m)
    assert ops(out) == ["Conv", "Mul"] and not res.modified
    assert_equivalent(m, out)


def test_bn_forward_into_unpadded_conv_gemm_and_matmul() -> None:
    b = Builder()
    c = b.conv(b.bn("x", 3), 3, 4, k=3, pad=0)
    flat = b.op("Flatten", [b.op("GlobalAveragePool", [b.op("Relu", [c])])])
    h = b.bn(flat, 4)  # BatchNorm1d before a classifier: folds into both readers
    g = b.op("Gemm", [h, b.rand(4, 5), b.rand(5)], alpha=0.5, beta=2.0)
    mm = b.op("MatMul", [h, b.rand(4, 3)])
    m = b.model([("x", [2, 3, 6, 6])], [g, mm])
    out, res = fold(m)
    assert "BatchNormalization" not in ops(out)
    assert res.counts["BatchNormalization folded forward"] == 2
    assert_equivalent(m, out)


def test_bn_forward_through_flatten_declined() -> None:
    b = Builder()
    y = b.op("Flatten", [b.bn("x", 3)])
    m = b.model([("x", [2, 3, 2, 2])], [b.op("Gemm", [y, b.rand(12, 5)])])
    out, res = fold(m)
    assert "BatchNormalization" in ops(out)
    assert "Flatten" in res.declined[0].reason
    assert_equivalent(m, out)


def test_bn_forward_into_grouped_unpadded_conv() -> None:
    b = Builder()
    y = b.bn("x", 4)
    m = b.model([("x", [1, 4, 5, 5])], [b.conv(y, 4, 6, k=3, pad=0, group=2)])
    out, _ = fold(m)
    assert ops(out) == ["Conv"]
    assert_equivalent(m, out)


def test_bn_before_zero_padded_conv_declined() -> None:
    b = Builder()
    y = b.bn("x", 3)
    m = b.model([("x", [1, 3, 6, 6])], [b.conv(y, 3, 4, k=3, pad=1)])
    out, res = fold(m)
    assert "BatchNormalization" in ops(out)
    assert "zero-padded" in res.declined[0].reason
    assert_equivalent(m, out)


def test_shared_weight_declined() -> None:
    b = Builder()
    w = b.rand(4, 3, 3, 3)
    y1 = b.op("Conv", ["x", w], pads=[1, 1, 1, 1])
    y2 = b.op("Conv", ["x", w], pads=[1, 1, 1, 1])
    m = b.model([("x", [1, 3, 5, 5])], [b.bn(y1, 4), y2])
    out, res = fold(m)
    assert "BatchNormalization" in ops(out)
    assert any("shared" in d.reason for d in res.declined)
    assert_equivalent(m, out)


def test_producer_with_other_readers_declined() -> None:
    b = Builder()
    y = b.conv("x", 3, 4)
    m = b.model([("x", [1, 3, 5, 5])], [b.bn(y, 4), b.op("Relu", [y])])
    out, res = fold(m)
    assert "BatchNormalization" in ops(out)
    assert any("other readers" in d.reason for d in res.declined)
    assert_equivalent(m, out)


def test_bn_output_as_graph_output_keeps_its_name() -> None:
    b = Builder()
    y = b.bn(b.conv("x", 3, 4), 4)
    m = b.model([("x", [1, 3, 5, 5])], [y])
    out, _ = fold(m)
    assert [o.name for o in out.graph.output] == [y]
    assert_equivalent(m, out)


@pytest.mark.parametrize("name", ["digits_resnet.onnx", "digits_mlp.onnx", "digits_mobile.onnx"])
def test_bundled_models_lose_every_batchnorm(name: str) -> None:
    src = load_model(MODELS / name).model
    out, _results = run_passes(src, None, exact=True)
    assert "BatchNormalization" not in ops(out)
    assert_equivalent(src, out)


SHARED_WITH_BN = [
    ("cifar10/resnet20_bn.onnx", None),
    ("imagenet/mobilenetv2_features_bn.onnx", None),
    ("paddle/ppocr_mobile_v2_cls.onnx", {"x": [1, 3, 48, 192]}),
]


@pytest.mark.parametrize(("rel", "shapes"), SHARED_WITH_BN)
def test_real_models_lose_every_batchnorm(rel: str, shapes) -> None:
    src = load_model(shared_model(rel)).model
    n_bn = ops(src).count("BatchNormalization")
    out, results = run_passes(src, None, exact=True)
    assert n_bn > 0 and "BatchNormalization" not in ops(out)
    folded = next(r for r in results if r.name == "fold-batchnorm")
    assert folded.counts["BatchNormalization folded"] == n_bn
    assert_equivalent(src, out, shapes=shapes, samples=2)


def test_tf2onnx_mul_add_batchnorm_folded() -> None:
    src = load_model(shared_model("tf/mlperf_tiny_fc_autoencoder.onnx")).model
    out, _results = run_passes(src, None, exact=True)
    assert ops(src).count("Mul") == 9 and ops(out).count("Mul") == 0
    assert ops(out).count("Add") == ops(out).count("MatMul") == 10
    assert_equivalent(src, out)
