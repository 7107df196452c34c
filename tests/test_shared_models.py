"""Acceptance on real exported models from five frameworks: --exact is equivalent and BN-free."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import cifar_batch, shared_model

from redonnx.cli import main
from redonnx.io.files import load_model
from redonnx.measure.runtime import run, session
from redonnx.measure.verify import verify

CASES = [
    ("cifar10/resnet20_bn.onnx", []),
    ("cifar10/resnet20_dynamo/model.onnx", []),
    ("imagenet/mobilenetv2_features_bn.onnx", []),
    ("tf/mlperf_tiny_resnet8_cifar10.onnx", []),
    ("tf/mlperf_tiny_fc_autoencoder.onnx", []),
    ("paddle/ppocr_mobile_v2_cls.onnx", ["--shape", "x=1,3,48,192"]),
    ("cntk/mnist_8.onnx", []),
    ("pytorch/mtcnn_rnet.onnx", []),
    ("pytorch/super_resolution_10.onnx", []),
]


@pytest.mark.parametrize(("rel", "extra"), CASES, ids=[c[0].split("/")[-1] for c in CASES])
def test_exact_prune_equivalent_and_bn_free(tmp_path: Path, rel: str, extra: list[str]) -> None:
    src = shared_model(rel)
    out = tmp_path / "out.onnx"
    assert main(["prune", str(src), "-o", str(out), "--exact", "--samples", "4", *extra]) == 0
    ref, cand = load_model(src).model, load_model(out).model
    assert "BatchNormalization" not in [n.op_type for n in cand.graph.node]
    shapes = {extra[1].split("=")[0]: [int(d) for d in extra[1].split("=")[1].split(",")]} if extra else None
    res = verify(ref, cand, shapes=shapes, samples=4, rtol=1e-4)
    assert res.passed, res.summary()
    for o in res.outputs:
        assert o.top1_agreement in (None, 1.0)
    onnx.checker.check_model(str(out))  # the file: its external data is checked too


def test_resnet20_top1_unchanged_on_real_images(tmp_path: Path) -> None:
    src = shared_model("cifar10/resnet20_bn.onnx")
    out = tmp_path / "r.onnx"
    assert main(["prune", str(src), "-o", str(out), "--exact"]) == 0
    x, y = cifar_batch()
    before = run(session(load_model(src).model), {"input": x})["logits"]
    after = run(session(load_model(out).model), {"input": x})["logits"]
    acc = float(np.mean(before.argmax(1) == y))
    assert acc == pytest.approx(0.916, abs=0.002)
    assert np.array_equal(before.argmax(1), after.argmax(1))
    assert np.max(np.abs(before - after)) <= 1e-4 * np.max(np.abs(before))
