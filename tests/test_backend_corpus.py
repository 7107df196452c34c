"""onnx's own backend test corpus (installed with onnx): about 120 small PyTorch exports (IR 3,
Conv1d/2d/3d, grouped and depthwise convs with multipliers, ConvTranspose, BatchNorm 1d/2d/3d,
PRelu, pads, pooling, Embedding, ...), each with an input and the expected output.

Most are opset 6, older than onnxruntime (and redonnx) accept; they are upgraded to opset 9 with
onnx's version converter first. Every one is then pruned with the exact pipeline: either refused
with a clear error or written, and the written model reproduces the expected output on the
corpus's own input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper, version_converter

from redonnx.errors import RedonnxError
from redonnx.io.files import MIN_OPSET, default_opset
from redonnx.measure.runtime import run, session
from redonnx.pipeline import prune

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
CASES = sorted(
    p.parent for folder in ("pytorch-converted", "pytorch-operator") for p in (DATA / folder).glob("*/model.onnx")
)


def _tensors(case: Path, kind: str) -> list[np.ndarray]:
    files = sorted((case / "test_data_set_0").glob(f"{kind}_*.pb"), key=lambda p: int(p.stem.split("_")[1]))
    return [numpy_helper.to_array(onnx.load_tensor(str(f))) for f in files]


def test_corpus_is_there() -> None:
    assert len(CASES) > 100


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_exact_prune_keeps_the_expected_outputs(case: Path) -> None:
    inputs, expected = _tensors(case, "input"), _tensors(case, "output")
    model = onnx.load(case / "model.onnx")
    if default_opset(model) < MIN_OPSET:
        model = version_converter.convert_version(model, 9)
    names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    feeds = dict(zip(names, inputs, strict=True))
    try:
        run(session(model), feeds)
    except Exception:  # onnxruntime's own exception types
        pytest.skip("the converted model itself does not run in onnxruntime (opset 6 PRelu slopes)")
    try:
        res = prune(model, exact=True)
    except RedonnxError as exc:  # random inputs can be invalid (PRelu slopes, Embedding indices)
        assert str(exc).strip() and "\n" not in str(exc) and "--inputs" in str(exc)
        res = prune(model, exact=True, inputs=feeds)  # what the message tells the user to do
    assert res.verification, res.verification.summary()
    got = run(session(res.model), feeds)
    for want, name in zip(expected, [o.name for o in res.model.graph.output], strict=True):
        np.testing.assert_allclose(got[name], want, rtol=1e-3, atol=1e-5)
