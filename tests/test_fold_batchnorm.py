"""fold-batchnorm: every fold checked numerically against onnxruntime on the original graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import Builder
from conftest import MODELS, assert_equivalent, shared_model

from redonnx.io.files import load_model
from redonnx.measure.runtime import session
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


def _bn_with(b: Builder, x: str, var: np.ndarray, mean: np.ndarray, gamma: float = 1.0) -> str:
    """A BatchNormalization with chosen running statistics (the extreme ones of PP-OCRv4 det)."""
    c = len(var)
    params = [np.full(c, gamma, np.float32) * (b.rng.random(c) + 0.5).astype(np.float32),
              b.rng.standard_normal(c).astype(np.float32), mean.astype(np.float32), var.astype(np.float32)]  # fmt: skip
    return b.op("BatchNormalization", [x, *[b.const(p, "bn") for p in params]], epsilon=1e-5)


def ppocr_det_like() -> tuple[onnx.ModelProto, str]:
    """The folds of PP-OCRv4 det (rapidocr's ch_PP-OCRv4_det_infer.onnx) with its scales: a stem conv and
    BN (variances 0.85..120) before a conv; convs with a learnable scalar Mul + Add after them; a conv whose
    BN has running variances 1e7..1e8 and means of hundreds (scale ~1e-4); a ConvTranspose + bias Add +
    BN with variances 0.03..0.1 (scale ~12); a BN after a residual Add folded forward into an unpadded
    1x1 conv; and a final ConvTranspose + Add whose logits (~-10 on noise) saturate a Sigmoid."""
    b = Builder(seed=3)
    r = b.rng
    y = b.op("Conv", ["x", b.rand(16, 3, 3, 3)], pads=[1] * 4, strides=[2, 2], kernel_shape=[3, 3])
    y = _bn_with(b, y, r.uniform(0.85, 120, 16), r.uniform(-3, 3, 16))
    y = b.op("Conv", [y, b.rand(32, 16, 1, 1)], kernel_shape=[1, 1])
    y = b.op("Add", [b.op("Mul", [y, b.const(np.array([0.362], np.float32))]), b.const(np.array([3.4e-4], np.float32))])
    z = b.op("Relu", [y])
    y = b.op("Conv", [z, b.rand(32, 32, 3, 3), b.rand(32)], pads=[1] * 4, kernel_shape=[3, 3])
    y = _bn_with(b, b.op("Add", [y, z]), r.uniform(1e-6, 1e-4, 32), r.uniform(-0.1, 0.1, 32), gamma=0.05)
    y = b.op("Conv", [y, b.rand(32, 32, 1, 1)], kernel_shape=[1, 1])  # forward fold: s ~ 5..50
    y = b.op("Conv", [b.op("Relu", [y]), b.rand(24, 32, 3, 3, scale=300.0)], pads=[1] * 4, kernel_shape=[3, 3])
    y = b.op("Relu", [_bn_with(b, y, r.uniform(1e7, 1e8, 24), r.uniform(-560, 560, 24))])
    y = b.op("ConvTranspose", [y, b.rand(24, 24, 2, 2)], strides=[2, 2], kernel_shape=[2, 2])
    y = b.op("Add", [y, b.rand(1, 24, 1, 1, scale=0.1)])
    y = b.op("Relu", [_bn_with(b, y, r.uniform(0.026, 0.1, 24), r.uniform(-0.16, 0.16, 24), gamma=2.4)])
    y = b.op("ConvTranspose", [y, b.rand(24, 1, 2, 2, scale=0.0003)], strides=[2, 2], kernel_shape=[2, 2])
    logits = b.op("Add", [y, b.const(np.full((1, 1, 1, 1), -14.0, np.float32))])
    return b.model([("x", ["n", 3, "h", "w"])], [b.op("Sigmoid", [logits]), logits]), logits


def test_ppocr_det_like_folds_stay_exact_on_standard_normal_inputs() -> None:
    """Issue 20 item 3: every fold of that pattern keeps the logits within float32 round-off (1e-4 of
    max|ref|) on N(0, 1) inputs; the saturated Sigmoid output then differs by no more than its own
    float32 resolution (~1e-7 absolute: 1e-3 of a max|ref| of 1e-4, which is what was reported)."""
    m, _ = ppocr_det_like()
    out, res = fold(m)
    assert res.counts == {"BatchNormalization folded": 3, "Mul folded": 1, "Add folded": 3,
                          "BatchNormalization folded forward": 1}  # fmt: skip
    assert ops(out).count("BatchNormalization") == ops(out).count("Mul") == 0
    ref, cand = session(m), session(out)
    rng = np.random.default_rng(0)
    for _ in range(4):
        x = rng.standard_normal((1, 3, 96, 96)).astype(np.float32)
        (p_ref, z_ref), (p_out, z_out) = ref.run(None, {"x": x}), cand.run(None, {"x": x})
        assert np.abs(z_ref).max() > 5  # logits of the size that saturates the Sigmoid
        assert np.abs(z_out - z_ref.astype(np.float64)).max() <= 1e-4 * np.abs(z_ref).max()
        assert np.abs(p_out - p_ref.astype(np.float64)).max() <= 1e-6 + 1e-4 * np.abs(p_ref).max()
    assert_equivalent(m, out, shapes={"x": [1, 3, 96, 96]}, samples=4)
