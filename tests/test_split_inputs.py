"""split-inputs: exact gather-and-sum form of hashed Gemm/MatMul layers, kept only when faster."""

from __future__ import annotations

import numpy as np
from builders import Builder
from conftest import assert_equivalent, shared_model

from redonnx.io.files import load_model
from redonnx.passes import SplitInputs
from redonnx.passes.split_inputs import codebook
from redonnx.pipeline import run_passes


def hashed(shape: tuple[int, int], levels: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(levels).astype(np.float32)
    return values[rng.integers(0, levels, size=shape)]


def test_codebook_round_trip() -> None:
    w = hashed((5, 40), 4)
    v, codes, d = codebook(w)
    assert v.shape == (5, 4) and max(d) <= 4
    assert np.array_equal(v.reshape(-1)[codes].T, w)


def test_gemm_and_matmul_split_exactly() -> None:
    b = Builder()
    w1 = hashed((16, 64), 5, 1)
    g = b.op("Gemm", ["x", b.const(w1.T.copy()), b.rand(64)], transB=1, alpha=0.5, beta=2.0)
    y = b.op("MatMul", [b.op("Relu", [g]), b.const(hashed((64, 48), 3, 2))])
    m = b.model([("x", [3, 16])], [y])
    out, (res, _) = run_passes(m, [SplitInputs(check_latency=False), "cleanup"], exact=True)
    assert res.counts["layers split"] == 2
    assert res.counts["multiplications removed per sample"] == 16 * 64 - sum(codebook(w1)[2]) + 64 * 48 - sum(
        codebook(hashed((64, 48), 3, 2))[2]
    )
    assert "Gather" in [n.op_type for n in out.graph.node]
    assert_equivalent(m, out)


def test_latency_check_keeps_only_faster_layers() -> None:
    b = Builder()
    m = b.model([("x", [2, 64])], [b.op("MatMul", ["x", b.const(hashed((64, 64), 4))])])
    out, (res, _) = run_passes(m, ["split-inputs", "cleanup"], exact=True)
    (layer,) = res.layers
    assert layer["mults_after"] < layer["mults_before"]
    assert layer["kept"] == (layer["split_over_original_latency"] < 1.0)
    if not layer["kept"]:
        assert "slower in onnxruntime" in res.declined[0].reason
    assert_equivalent(m, out)


def test_unhashed_weights_declined() -> None:
    b = Builder()
    m = b.model([("x", [2, 8])], [b.op("MatMul", ["x", b.rand(8, 4)])])
    _, (res, _) = run_passes(m, ["split-inputs", "cleanup"], exact=True)
    assert not res.modified and "no multiplication saved" in res.declined[0].reason


def test_hashed_autoencoder_split_is_exact() -> None:
    src = load_model(shared_model("tf/mlperf_tiny_fc_autoencoder.onnx")).model
    hashed_model, _ = run_passes(src, ["fold-batchnorm", "hash-weights"], exact=False)
    out, (res, _) = run_passes(hashed_model, [SplitInputs(check_latency=False), "cleanup"], exact=True)
    assert res.counts["layers split"] == 10
    assert_equivalent(hashed_model, out)
