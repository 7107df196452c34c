"""Shared fixtures: paths to bundled and shared real models, and a numerical equivalence check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from redonnx.measure.verify import verify

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
SHARED = ROOT.parent / "shared" / "models"


def shared_model(rel: str) -> Path:
    """Path of a model in ../shared/models, skipping the test when it is absent."""
    p = SHARED / rel
    if not p.exists():
        pytest.skip(f"../shared/models/{rel} not available")
    return p


def assert_equivalent(ref: onnx.ModelProto, cand: onnx.ModelProto, rtol: float = 1e-4, **kw) -> None:
    """Outputs equal within rtol of max|ref| on seeded random inputs (onnxruntime, no optimizations)."""
    res = verify(ref, cand, rtol=rtol, **kw)
    assert res.passed, res.summary()


def cifar_batch(n: int = 1017) -> tuple[np.ndarray, np.ndarray]:
    """The shared CIFAR-10 test images, normalized NCHW float32, and labels."""
    data = np.load(shared_model("cifar10/cifar10_test_1017.npz"))
    mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
    std = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)
    x = (data["x"][:n].astype(np.float32) / 255.0 - mean) / std
    return x.astype(np.float32), data["y"][:n].astype(np.int64)
