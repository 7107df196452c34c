"""More hostile inputs: wrong weight shapes, NaN weights, custom-domain ops. One line or a result."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from builders import Builder
from conftest import assert_equivalent
from onnx import helper
from test_io import assert_clean_failure, cli

from redonnx.io.files import load_model


def save(m: onnx.ModelProto, path: Path) -> Path:
    onnx.save(m, path)
    return path


def test_weights_of_the_wrong_shape(tmp_path: Path) -> None:
    b = Builder()
    m = b.model([("x", [1, 3, 8, 8])], [b.op("Conv", ["x", b.rand(4, 5, 3, 3)], pads=[1, 1, 1, 1])])
    proc = cli("prune", str(save(m, tmp_path / "m.onnx")), "-o", str(tmp_path / "o.onnx"))
    assert_clean_failure(proc)
    assert "Input channels C is not equal to kernel channels" in proc.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_nan_weights_give_a_result_or_a_clean_refusal(tmp_path: Path) -> None:
    b = Builder()
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    w[1, 0, 0, 0] = np.nan
    y = b.op("Relu", [b.op("Conv", ["x", b.const(w), b.rand(4)], pads=[1, 1, 1, 1])])
    m = b.model([("x", [1, 3, 6, 6])], [b.conv(y, 4, 2)])
    out = tmp_path / "o.onnx"
    for extra in ([], ["--exact"]):
        proc = cli("prune", str(save(m, tmp_path / "m.onnx")), "-o", str(out), *extra)
        assert "Traceback" not in proc.stderr
        if proc.returncode == 0:
            assert_equivalent(m, load_model(out).model)
        else:
            assert_clean_failure(proc, proc.returncode)


def custom_op_model() -> onnx.ModelProto:
    b = Builder()
    y = b.op("Relu", [b.bn(b.conv("x", 3, 4), 4)])
    b.nodes.append(helper.make_node("MyOp", [y], ["z"], domain="com.example", name="custom"))
    m = b.model([("x", [1, 3, 6, 6])], ["z"])
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    return m


def test_custom_op_refused_clearly_unless_no_verify(tmp_path: Path) -> None:
    src = save(custom_op_model(), tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    proc = cli("prune", str(src), "-o", str(out))
    assert_clean_failure(proc)
    assert "onnxruntime cannot load the reference model" in proc.stderr and not out.exists()
    assert_clean_failure(cli("prune", str(src), "-o", str(out), "--no-verify"))  # lossy needs verification
    proc = cli("prune", str(src), "-o", str(out), "--exact", "--no-verify")
    assert proc.returncode == 0, proc.stderr
    assert "NOT verified" in proc.stdout
    m = onnx.load(out)
    ops = [n.op_type for n in m.graph.node]
    assert "MyOp" in ops and "BatchNormalization" not in ops  # folded around the custom op, which stays
    assert [(o.domain, o.version) for o in m.opset_import] == [("", 17), ("com.example", 1)]
